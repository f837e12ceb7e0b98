"""reward_model.py: the judge, the pairs file, the reward model's contract and learning, the
commands end to end on a tiny model, and the report's metrics."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import DataError, save_atomic
from conftest import ROOT, SHARED, first_stories
from model import ModelArgs, Transformer
from reward_model import (END, WEIGHTS, RewardModel, bradley_terry_loss, distinct_n, encode_pairs, encode_story, evaluate,
                          judge, judge_components, load_reward_model, markdown_table, names, pad_right, pairwise_accuracy,
                          read_pairs, repetition, train_reward_model, write_pairs)
from tinystories import iter_batches
from tokenizer import Tokenizer

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=8, max_seq_len=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: more threads than free cores is 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "reward_model.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def real_story_parts(n, offset=0):
    """(prompt, rest) of real stories: the first sentence, then the next six (about 60 words)."""
    parts = []
    for story in first_stories(SHARED / "tinystories" / "train-000.txt", offset + n * 3)[offset:]:
        sents = [s.strip() for s in story.replace("\n", " ").split(". ") if s.strip()]
        if len(sents) >= 7 and all(len(s) > 20 for s in sents[:7]):
            parts.append((sents[0] + ".", " " + ". ".join(sents[1:7]).rstrip(".") + "."))
    return parts[:n]


# ---------------------------------------------------------------------------
# Bradley-Terry loss and pairwise accuracy

def test_bradley_terry_loss_and_pairwise_accuracy_on_a_hand_made_batch():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2  # margins +1 and -1
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected)  # 0.8133
    assert pairwise_accuracy(r_chosen, r_rejected) == 0.5
    tie = torch.tensor([1.0])
    assert bradley_terry_loss(tie, tie).item() == pytest.approx(math.log(2)) and pairwise_accuracy(tie, tie) == 0.0


# ---------------------------------------------------------------------------
# the judge

def test_a_story_that_ends_beats_the_same_story_cut_off_mid_sentence():
    for prompt, rest in real_story_parts(5):
        cut = rest[:len(rest) - 15]
        ended, cut_off = judge_components(prompt, rest + END), judge_components(prompt, cut)
        assert ended["ending"] == 1.0 and cut_off["ending"] == 0.0
        assert judge(prompt, rest + END) > judge(prompt, cut)
        assert judge_components(prompt, cut + END)["ending"] == 0.5  # ended, but on half a sentence
        assert judge_components(prompt, ' "Come back!" she said. "I will!"' + END)["ending"] == 1.0  # closing quote


def test_a_looped_sentence_lowers_the_repetition_component():
    for prompt, rest in real_story_parts(5):
        loop = rest + " She was happy." * 8
        assert judge_components(prompt, loop + END)["no_repetition"] < judge_components(prompt, rest + END)["no_repetition"] - 0.3
    # a loop without a full stop: 12 4-grams, the second copy's 4 repeat the first's
    assert repetition("the dog ran to the big tree and the dog ran to the big tree")["dup_4grams"] == pytest.approx(4 / 12)


def test_reusing_the_prompts_character_name_raises_that_component():
    prompt = "Once upon a time, there was a little girl named Lily. She had a dog called Max."
    both = judge_components(prompt, " Lily and Max went to the park. They played all day." + END)
    one = judge_components(prompt, " Lily went to the park. She played all day." + END)
    none = judge_components(prompt, " The girl went to the park. She played all day." + END)
    assert (both["names"], one["names"], none["names"]) == (1.0, 0.5, 0.0)
    assert judge(prompt, " Lily and Max went to the park." + END) > judge(prompt, " The girl went to the park." + END)
    assert judge_components("Once upon a time, there was a cat.", " It slept." + END)["names"] is None  # no name: left out
    parts = judge_components("Once upon a time, there was a cat.", " It slept." + END)
    applying = ("ending", "no_repetition", "substance")
    assert judge("Once upon a time, there was a cat.", " It slept." + END) == pytest.approx(
        sum(WEIGHTS[k] * parts[k] for k in applying) / sum(WEIGHTS[k] for k in applying))


def test_names_skip_sentence_openers_and_a_word_the_prompt_may_cut():
    assert names('One day, Tom met a dog. "Hello," said Sue. The end. Once there was Ma') == {"Tom", "Sue"}
    assert names('She said, "Wow, look!" "Come," Mom said. “Yes,” Ben said.') == {"Mom", "Ben"}


def test_keyword_component_only_when_a_keyword_is_given():
    prompt = "Once upon a time, there was a cat."
    assert judge_components(prompt, " It was kind." + END)["keyword"] is None
    assert judge_components(prompt, " It was Kind." + END, keyword="kind")["keyword"] == 1.0
    assert judge_components(prompt, " It was unkind." + END, keyword="kind")["keyword"] == 0.0


def test_real_complete_stories_score_near_the_top_of_the_judge():
    stories = first_stories(SHARED / "tinystories" / "train-000.txt", 200)
    parts = [judge_components(s[:60], s[60:] + END) for s in stories]
    assert sum(p["ending"] for p in parts) / len(parts) > 0.95
    assert sum(p["no_repetition"] for p in parts) / len(parts) > 0.95
    assert sum(p["substance"] for p in parts) / len(parts) > 0.9


def test_ending_at_once_is_not_a_top_score():
    prompt = "Once upon a time, there was a girl named Lily. She had a red ball."
    at_once = judge_components(prompt, " The end." + END)
    story = " Lily took her ball to the park. " * 1 + "She threw it high and her dog ran after it. " \
        "Then it started to rain, so they ran home. Mom made warm soup and Lily told her about the park. " \
        "Lily smiled and hugged her dog. It was the best day, and she played with her ball again the next morning." + END
    assert at_once["substance"] < 0.1 and judge_components(prompt, story)["substance"] == 1.0
    assert judge(prompt, story) > judge(prompt, " The end." + END) + 0.2


# ---------------------------------------------------------------------------
# the pairs file

def test_pairs_round_trip_through_jsonl(tmp_path):
    pairs = [{"prompt": "Once upon a time, Lily", "chosen": ' saw a "big" dog.\nThe end.' + END, "rejected": " saw a dog ü"},
             {"prompt": "Tom", "chosen": " ran.", "rejected": " ran ran ran", "chosen_judge": 1.0}]
    write_pairs(pairs, str(tmp_path / "sub" / "p.jsonl"))
    assert read_pairs(str(tmp_path / "sub" / "p.jsonl")) == pairs
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', ":2: not valid JSON"),
    ('{"prompt": "a", "good": "b", "bad": "c"}\n', ":1: expected string fields prompt, chosen, rejected; got prompt, good, bad"),
    ('{"prompt": "a", "chosen": 1, "rejected": "c"}\n', ":1: expected string fields"),
    ('["a", "b", "c"]\n', ":1: expected string fields prompt, chosen, rejected; got list"),
    ("\n\n", " holds no pairs"),
])
def test_malformed_pairs_are_a_data_error_naming_the_line(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        read_pairs(str(tmp_path / "p.jsonl"))


# ---------------------------------------------------------------------------
# the reward model's contract

def tiny_reward_model(seed=0):
    """A random tiny trunk with large weights and a random head, so that every token matters."""
    torch.manual_seed(seed)
    rm = RewardModel(Transformer(ModelArgs(**{**TINY, "vocab_size": 64})))
    with torch.no_grad():
        for p in rm.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else None
    return rm.eval()


def test_the_reward_is_read_at_the_last_real_token_so_padding_after_it_changes_nothing():
    rm = tiny_reward_model()
    seqs = [[1, 5, 9, 13, 2], [1, 7, 3], [1, 4, 4, 8, 12, 20, 33, 7]]
    tokens, lengths = pad_right(seqs)
    batched = rm.score(tokens, lengths)  # (3,)
    assert batched.shape == (3,)
    for i, s in enumerate(seqs):
        alone = rm.score(torch.tensor([s]), torch.tensor([len(s)]))
        junk = rm.score(torch.tensor([s + [63, 17, 5, 5, 40]]), torch.tensor([len(s)]))
        assert torch.allclose(alone, batched[i], atol=1e-5) and torch.allclose(junk, alone, atol=1e-5)
    # the score is the last real token's, not the last column's
    assert not torch.allclose(rm.score(tokens, lengths), rm.score(tokens, torch.full((3,), tokens.size(1))))


def test_the_reward_depends_on_the_content():
    rm = tiny_reward_model()
    a, b = torch.tensor([[1, 5, 9, 13, 2]]), torch.tensor([[1, 5, 30, 13, 2]])  # one earlier token differs
    assert abs(rm.score(a, torch.tensor([5])).item() - rm.score(b, torch.tensor([5])).item()) > 1e-3


def test_a_fresh_head_gives_every_story_reward_zero():
    rm = RewardModel(Transformer(ModelArgs(**TINY)))
    tokens, lengths = pad_right([[1, 5, 9], [1, 300, 7, 8]])
    assert rm.score(tokens, lengths).tolist() == [0.0, 0.0]


def test_encode_story_marks_an_ended_story_with_bos_and_keeps_the_context(small_data):
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    ids = encode_story(tok, "Once upon a time, Lily", " was happy." + END, 128)
    assert ids[0] == tok.bos_id and ids[-1] == tok.bos_id and tok.decode(ids[1:-1]) == "Once upon a time, Lily was happy."
    assert encode_story(tok, "Once upon a time, Lily", " was happy.", 128) == ids[:-1]
    assert len(encode_story(tok, "word " * 200, "", 128)) == 128


def test_training_on_judge_labelled_real_stories_beats_chance_on_held_out_pairs(small_data):
    """chosen: a real story's next sentences, ended; rejected: the same cut off mid-sentence, or
    ended after a looped sentence. A tiny random trunk learns both in a few seconds."""
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    pairs = []
    for i, (prompt, rest) in enumerate(real_story_parts(160, offset=300)):  # not the stories small_data trained on
        rejected = rest[:len(rest) * 2 // 3] if i % 2 else rest + (" " + rest.split(". ")[0] + ".") * 3 + END
        assert judge(prompt, rest + END) > judge(prompt, rejected)  # the labels are the judge's
        pairs.append({"prompt": prompt, "chosen": rest + END, "rejected": rejected})
    encoded = encode_pairs(tok, pairs, 256)
    train_set, eval_set = encoded[:112], encoded[112:]
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelArgs(**{**TINY, "max_seq_len": 256})))
    assert evaluate(rm, eval_set, 16)["accuracy"] == 0.0  # all ties before training
    history = train_reward_model(rm, train_set, eval_set, epochs=3, batch_size=16, learning_rate=3e-3)
    assert history[-1]["accuracy"] > 0.85 and history[-1]["loss"] < 0.5 * math.log(2), history
    assert evaluate(rm, eval_set[1::2], 16)["accuracy"] > 0.7  # cut off
    assert evaluate(rm, eval_set[0::2], 16)["accuracy"] > 0.7  # looped


# ---------------------------------------------------------------------------
# the commands, end to end on a tiny checkpoint

@pytest.fixture(scope="module")
def tiny_ckpt(small_data, tmp_path_factory):
    """A tiny model trained for a few seconds on small_data, saved as train.py saves."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = iter_batches(os.path.join(small_data, "tok512", "train.bin"), 16, 64)
    for _ in range(60):
        _, loss = model(*next(stream))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_atomic({"model": model.state_dict(), "model_args": TINY,
                 "tokenizer": {"tokenizer": os.path.join(small_data, "tok512.model"), "vocab_size": 512, "bos_id": 1}}, path)
    return path


def test_make_pairs_train_and_report_end_to_end(small_data, tiny_ckpt, tmp_path):
    train_pairs, eval_pairs, rm_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "rm.pt"
    p = run("make_pairs", f"--checkpoint={tiny_ckpt}", f"--data_dir={small_data}", f"--pairs={train_pairs}",
            f"--eval_pairs={eval_pairs}", "--num_pairs=24", "--num_eval_pairs=8", "--start_len=24", "--max_new_tokens=48")
    assert p.returncode == 0, p.stderr
    got = read_pairs(str(train_pairs))
    assert len(got) == 24 and len(read_pairs(str(eval_pairs))) == 8
    for pair in got:  # the labels are the judge's on the stored text
        assert judge(pair["prompt"], pair["chosen"]) == pytest.approx(pair["chosen_judge"], abs=1e-4)
        assert pair["chosen_judge"] > pair["rejected_judge"]

    write_pairs(got + [{"prompt": "Once upon a time", "chosen": " Lily ran." * 60 + END, "rejected": " Tom."}], str(train_pairs))
    p = run("train", f"--checkpoint={tiny_ckpt}", f"--pairs={train_pairs}", f"--eval_pairs={eval_pairs}",
            f"--out={rm_path}", "--epochs=1", "--batch_size=8")
    assert p.returncode == 0, p.stderr
    assert f"{train_pairs}: 1 of 50 stories are longer than the context; the reward model reads their first 128 tokens" in p.stdout
    assert "held-out pairwise accuracy" in p.stdout
    log = [json.loads(line) for line in open(tmp_path / "rm_log.jsonl")]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4] and "eval/accuracy" in log[-1]  # 25 pairs, 8 a step

    rm = load_reward_model(str(rm_path))
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    texts = [(q["prompt"], q["chosen"]) for q in got[:3]]
    tokens, lengths = pad_right([encode_story(rm.tokenizer, a, b, TINY["max_seq_len"]) for a, b in texts])
    assert rm.score_texts(texts) == pytest.approx(rm.score(tokens, lengths).tolist(), abs=1e-5)

    report = tmp_path / "reports" / "rlhf.md"
    p = run("report", f"--before={tiny_ckpt}", f"--after={tiny_ckpt}", f"--rm={rm_path}", f"--data_dir={small_data}",
            f"--report={report}", "--num_prompts=8", "--start_len=24", "--max_new_tokens=32", "--val_windows=16")
    assert p.returncode == 0, p.stderr
    md = report.read_text()
    # the same policy twice, with the same seed: the same samples, zero KL, no change anywhere
    lines = md.splitlines()
    start = lines.index("| metric | before | after | change |")
    table = [line.split(" | ") for line in lines[start + 2:lines.index("", start)]]
    kl = next(row for row in table if row[0].startswith("| KL"))
    assert abs(float(kl[2].split("±")[0])) < 1e-4
    assert len(table) >= 12 and all(row[1] == row[2] for row in table if row is not kl)
    assert "Stories side by side" in md and (tmp_path / "reports" / "rlhf.png").stat().st_size > 1000


def test_bad_input_on_the_command_line_is_one_error_line(small_data, tiny_ckpt, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    p = run("train", f"--checkpoint={tiny_ckpt}", f"--pairs={tmp_path / 'bad.jsonl'}", f"--out={tmp_path / 'rm.pt'}")
    assert p.returncode != 0 and p.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)"
    assert not os.path.exists(tmp_path / "rm.pt")
    p = run("evaluate")
    assert p.returncode != 0 and p.stderr.strip() == "error: the first argument must be a command: make_pairs, train, report"


def test_a_tokenizer_that_does_not_fit_the_model_is_named(small_data, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_atomic({"model": Transformer(ModelArgs(**{**TINY, "vocab_size": 64})).state_dict(),
                 "model_args": {**TINY, "vocab_size": 64}, "tokenizer": {"tokenizer": os.path.join(small_data, "tok512.model")}}, path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    p = run("train", f"--checkpoint={path}", f"--pairs={tmp_path / 'p.jsonl'}", f"--eval_pairs={tmp_path / 'p.jsonl'}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("error: tokenizer ") and "has 512 tokens, the model in" in p.stderr and "64" in p.stderr


# ---------------------------------------------------------------------------
# the report's metrics

def test_distinct_n_and_repetition_on_hand_examples():
    assert distinct_n(["The cat sat.", "the cat ran"], 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(["The cat sat.", "the cat ran"], 2) == pytest.approx(3 / 4)  # "the cat" twice; n-grams stay in a text
    assert distinct_n(["a"], 2) == 0.0
    rep = repetition("A b c d. A b c d. E f g h.")
    assert rep["dup_sentences"] == pytest.approx(1 / 3)  # 3 sentences, one a repeat
    assert rep["dup_4grams"] == pytest.approx(1 / 9)  # 12 words, 9 4-grams, "a b c d" twice
    assert repetition("") == {"dup_sentences": 0.0, "dup_4grams": 0.0}


def test_markdown_table_keeps_any_story_in_its_cell():
    table = markdown_table(["before", "after"], [['He said "a|b".\nThe <end> `x` *y*', 0.123456]])
    row = table.splitlines()[2]
    assert row == '| He said "a\\|b".<br>The &lt;end> \\`x\\` \\*y\\* | 0.1235 |'

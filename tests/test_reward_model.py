"""reward_model.py: the Bradley-Terry loss, the reward model's contract and learning, and its command line."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, real_story_parts

from common import save_atomic
from metrics import judge
from model import ModelArgs, Transformer
from prefs import encode_story, pad_right, write_pairs
from reward_model import (
    RewardModel,
    bradley_terry_loss,
    encode_pairs,
    evaluate,
    load_reward_model,
    pairwise_accuracy,
    train_reward_model,
)
from tinystories import SEPARATOR as END
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def run(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "reward_model.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


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
    assert (
        ids[0] == tok.bos_id and ids[-1] == tok.bos_id and tok.decode(ids[1:-1]) == "Once upon a time, Lily was happy."
    )
    assert encode_story(tok, "Once upon a time, Lily", " was happy.", 128) == ids[:-1]
    assert len(encode_story(tok, "word " * 200, "", 128)) == 128


def test_training_on_judge_labelled_real_stories_beats_chance_on_held_out_pairs(small_data):
    """chosen: a real story's next sentences, ended; rejected: the same cut off mid-sentence, or
    ended after a looped sentence. A tiny random trunk learns both in a few seconds."""
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    pairs = []
    for i, (prompt, rest) in enumerate(real_story_parts(160, offset=300)):  # not the stories small_data trained on
        rejected = rest[: len(rest) * 2 // 3] if i % 2 else rest + (" " + rest.split(". ")[0] + ".") * 3 + END
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
# the command line


def test_training_from_a_pairs_file_writes_a_reward_model_that_loads_and_scores(small_data, tiny_ckpt, tmp_path):
    pairs, rm_path = tmp_path / "train.jsonl", tmp_path / "rm.pt"
    got = [
        {"prompt": prompt, "chosen": rest[:120] + END, "rejected": rest[:60]} for prompt, rest in real_story_parts(24)
    ]
    write_pairs(
        got + [{"prompt": "Once upon a time", "chosen": " Lily ran." * 60 + END, "rejected": " Tom."}], str(pairs)
    )
    p = run(
        f"--checkpoint={tiny_ckpt}",
        f"--pairs={pairs}",
        f"--eval_pairs={pairs}",
        f"--rm_path={rm_path}",
        "--epochs=1",
        "--batch_size=8",
        "--device=cpu",
    )
    assert p.returncode == 0, p.stderr
    assert (
        f"{pairs}: 1 of 50 stories are longer than the context; the reward model reads their first 128 tokens"
        in p.stdout
    )
    assert "held-out pairwise accuracy" in p.stdout
    log = [json.loads(line) for line in open(tmp_path / "rm_log.jsonl")]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4] and "eval/accuracy" in log[
        -1
    ]  # 25 pairs, 8 a step

    rm = load_reward_model(str(rm_path))
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    texts = [(q["prompt"], q["chosen"]) for q in got[:3]]
    tokens, lengths = pad_right([encode_story(rm.tokenizer, a, b, TINY["max_seq_len"]) for a, b in texts])
    assert rm.score_texts(texts) == pytest.approx(rm.score(tokens, lengths).tolist(), abs=1e-5)


def test_bad_input_on_the_command_line_is_one_error_line(small_data, tiny_ckpt, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    p = run(f"--checkpoint={tiny_ckpt}", f"--pairs={tmp_path / 'bad.jsonl'}", f"--rm_path={tmp_path / 'rm.pt'}")
    assert (
        p.returncode != 0 and p.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)"
    )
    assert not os.path.exists(tmp_path / "rm.pt")


def test_a_tokenizer_that_does_not_fit_the_model_is_named(small_data, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_atomic(
        {
            "model": Transformer(ModelArgs(**{**TINY, "vocab_size": 64})).state_dict(),
            "model_args": {**TINY, "vocab_size": 64},
            "tokenizer": {"tokenizer": os.path.join(small_data, "tok512.model")},
        },
        path,
    )
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    p = run(f"--checkpoint={path}", f"--pairs={tmp_path / 'p.jsonl'}", f"--eval_pairs={tmp_path / 'p.jsonl'}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("error: tokenizer ") and "has 512 tokens, the model in" in p.stderr and "64" in p.stderr

"""prefs.py: the judge, the pairs file, distinct-n, and the command line."""
import os
import subprocess
import sys

import pytest

from common import DataError
from conftest import ROOT, SHARED, first_stories
from prefs import END, WEIGHTS, distinct_n, judge, judge_components, length_score, names, read_pairs, repetition, write_pairs
from tokenizer import Tokenizer


def real_story_parts(n, offset=0):
    """(prompt, rest) of real stories: the first sentence, then the next six (about 60 words)."""
    parts = []
    for story in first_stories(SHARED / "tinystories" / "train-000.txt", offset + n * 3)[offset:]:
        sents = [s.strip() for s in story.replace("\n", " ").split(". ") if s.strip()]
        if len(sents) >= 7 and all(len(s) > 20 for s in sents[:7]):
            parts.append((sents[0] + ".", " " + ". ".join(sents[1:7]).rstrip(".") + "."))
    return parts[:n]


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
             {"prompt": "Tom", "chosen": " ran.", "rejected": " ran ran ran", "chosen_score": 1.0}]
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


def test_distinct_n_and_repetition_on_hand_examples():
    assert distinct_n(["The cat sat.", "the cat ran"], 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(["The cat sat.", "the cat ran"], 2) == pytest.approx(3 / 4)  # "the cat" twice; n-grams stay in a text
    assert distinct_n(["a"], 2) == 0.0
    rep = repetition("A b c d. A b c d. E f g h.")
    assert rep["dup_sentences"] == pytest.approx(1 / 3)  # 3 sentences, one a repeat
    assert rep["dup_4grams"] == pytest.approx(1 / 9)  # 12 words, 9 4-grams, "a b c d" twice
    assert repetition("") == {"dup_sentences": 0.0, "dup_4grams": 0.0}


@pytest.mark.parametrize("label", ["judge", "length"])
def test_make_pairs_writes_labelled_pairs_from_the_models_own_samples(label, small_data, tiny_ckpt, tmp_path):
    train_pairs, eval_pairs = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "prefs.py"), f"--checkpoint={tiny_ckpt}", f"--data_dir={small_data}",
                        f"--pairs={train_pairs}", f"--eval_pairs={eval_pairs}", "--num_pairs=24", "--num_eval_pairs=8",
                        "--start_len=24", "--max_new_tokens=48", "--device=cpu", f"--label={label}", "--target_len=20"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    got = read_pairs(str(train_pairs))
    assert len(got) == 24 and len(read_pairs(str(eval_pairs))) == 8
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    for pair in got:  # the labels are the judge's, or the length reward's, on the stored text
        if label == "judge":
            assert judge(pair["prompt"], pair["chosen"]) == pytest.approx(pair["chosen_score"], abs=1e-4)
        else:
            ids = tok.encode(pair["prompt"] + pair["chosen"].removesuffix(END))[len(tok.encode(pair["prompt"])):]
            ended = pair["chosen"].endswith(END)
            assert -abs(len(ids) - 20) / 20 - (not ended) == pytest.approx(pair["chosen_score"], abs=0.11)  # +-2 tokens at the seam
        assert pair["chosen_score"] > pair["rejected_score"]


def test_length_score_is_the_rl_stages_length_reward():
    class Tok:
        bos_id, eos_id = 1, 2
    assert length_score(Tok, [5] * 20 + [1], 20) == 0.0  # 20 story tokens, then the story ended
    assert length_score(Tok, [5] * 10 + [2], 20) == -0.5
    assert length_score(Tok, [5] * 30, 20) == pytest.approx(-0.5 - 1.0)  # cut off at the cap: the missing-EOS penalty

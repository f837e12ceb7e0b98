"""prefs.py: the pairs file, labelling pairs by the judge or a task's reward, and the command line."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from common import DataError
from metrics import judge
from prefs import length_score, read_pairs, write_pairs
from tasks import length_reward
from tinystories import SEPARATOR as END
from tokenizer import Tokenizer

# ---------------------------------------------------------------------------
# the pairs file


def test_pairs_round_trip_through_jsonl(tmp_path):
    pairs = [
        {"prompt": "Once upon a time, Lily", "chosen": ' saw a "big" dog.\nThe end.' + END, "rejected": " saw a dog ü"},
        {"prompt": "Tom", "chosen": " ran.", "rejected": " ran ran ran", "chosen_score": 1.0},
    ]
    write_pairs(pairs, str(tmp_path / "sub" / "p.jsonl"))
    assert read_pairs(str(tmp_path / "sub" / "p.jsonl")) == pairs
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', ":2: not valid JSON"),
        (
            '{"prompt": "a", "good": "b", "bad": "c"}\n',
            ":1: no 'chosen' \\(expected prompt, chosen, rejected; got prompt, good, bad\\)",
        ),
        ('{"prompt": "a", "chosen": 1, "rejected": "c"}\n', ":1: 'chosen' is int, not a string"),
        ('["a", "b", "c"]\n', ":1: expected an object of prompt, chosen, rejected; got list"),
        ("\n\n", " holds no pairs"),
    ],
)
def test_malformed_pairs_are_a_data_error_naming_the_line(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        read_pairs(str(tmp_path / "p.jsonl"))


@pytest.mark.parametrize("label", ["judge", "length"])
def test_make_pairs_writes_labelled_pairs_from_the_models_own_samples(label, small_data, tiny_ckpt, tmp_path):
    train_pairs, eval_pairs = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prefs.py"),
            f"--checkpoint={tiny_ckpt}",
            f"--data_dir={small_data}",
            f"--pairs={train_pairs}",
            f"--eval_pairs={eval_pairs}",
            "--num_pairs=24",
            "--num_eval_pairs=8",
            "--start_len=24",
            "--max_new_tokens=48",
            "--device=cpu",
            f"--label={label}",
            "--target_len=20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    got = read_pairs(str(train_pairs))
    assert len(got) == 24 and len(read_pairs(str(eval_pairs))) == 8
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    for pair in got:  # the labels are the judge's, or the length reward's, on the stored text
        if label == "judge":
            assert judge(pair["prompt"], pair["chosen"]) == pytest.approx(pair["chosen_score"], abs=1e-4)
        else:
            ids = tok.encode(pair["prompt"] + pair["chosen"].removesuffix(END))[len(tok.encode(pair["prompt"])) :]
            ended = pair["chosen"].endswith(END)
            expected = float(length_reward(torch.tensor(float(len(ids))), 20)) - (not ended)
            assert expected == pytest.approx(pair["chosen_score"], abs=0.11)  # +-2 tokens at the seam
        assert pair["chosen_score"] > pair["rejected_score"]


def test_length_score_is_the_rl_stages_length_reward():
    class Tok:
        bos_id, eos_id = 1, 2

    assert length_score(Tok, [5] * 20 + [1], 20) == 0.0  # 20 story tokens, then the story ended
    assert length_score(Tok, [5] * 10 + [2], 20) == -0.5
    assert length_score(Tok, [5] * 30, 20) == pytest.approx(-0.5 - 1.0)  # cut off at the cap: the missing-EOS penalty

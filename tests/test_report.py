"""report.py: the one before/after report of every RL method, end to end on a tiny run."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_rl import rl_main

import checkpoint
from common import save_atomic
from model import ModelArgs, Transformer
from reward_model import RewardModel


def report(*flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "report.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def table(md):
    return {
        m[1]: (float(m[2]), float(m[3]))
        for m in re.finditer(r"^\| (.+?) \| ([-\d.e+]+|nan) \| ([-\d.e+]+|nan) \|$", md, re.M)
    }


@pytest.mark.parametrize("learning_rate", [1e-12, 1e-2])  # Adam's steps of 1e-12 change no fp32 weight: the same model
def test_the_report_compares_the_starting_model_with_the_trained_one(learning_rate, small_data, pretrained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rl_main(
        [
            f"--out_dir={out}",
            f"--data_dir={small_data}",
            "--rl=grpo",
            "--batch_size=4",
            "--num_mini_batches=2",
            "--group_size=4",
            "--max_new_tokens=8",
            "--target_len=4",
            "--device=cpu",
            "--dtype=float32",
            "--eval_prompts=4",
            "--max_iters=2",
            "--ptx_coef=0.5",
            f"--learning_rate={learning_rate}",
        ]
    )  # ptx: a move even where scores tie
    torch.set_num_threads(threads)
    ckpt = checkpoint.load(str(out / "grpo_ckpt.pt"))
    rm = RewardModel(Transformer(ModelArgs(**ckpt["model_args"])))  # an untrained head: every story scores 0
    save_atomic(
        {"model": rm.state_dict(), "model_args": ckpt["model_args"], "tokenizer": ckpt["tokenizer"]},
        str(tmp_path / "rm.pt"),
    )
    md_path = tmp_path / "reports" / "grpo.md"
    p = report(
        f"--checkpoint={out / 'grpo_ckpt.pt'}",
        f"--report_path={md_path}",
        f"--rm_path={tmp_path / 'rm.pt'}",
        "--report_prompts=8",
        "--val_windows=16",
        "--device=cpu",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    md = md_path.read_text()
    rows = table(md)
    for label in (
        "score (the reward the run trained on)",
        "reward model",
        "within ±10% of the target length",
        "judge (held out)",
        "KL to the starting model (nats/response)",
        "fluency: NLL ratio under the starting model (1 = as before)",
        "fluency: share of words found in the training text",
        "distinct-2",
        "validation perplexity",
    ):
        assert label in rows, label
    assert rows["KL to the starting model (nats/response)"][0] == 0.0
    assert rows["fluency: NLL ratio under the starting model (1 = as before)"][0] == 1.0
    assert rows["reward model"] == (0.0, 0.0)
    if learning_rate == 1e-12:  # the same model twice, the same seed: the same samples, no KL, no change anywhere
        assert all(b == pytest.approx(a, abs=1e-5) for b, a in rows.values()), rows
    else:
        kl, ratio = (
            rows["KL to the starting model (nats/response)"][1],
            rows["fluency: NLL ratio under the starting model (1 = as before)"][1],
        )
        assert kl != 0.0 and ratio != 1.0
    assert "2 iterations, 16 rollouts" in md and md.count("- *after*") == 3
    assert (tmp_path / "reports" / "grpo.png").stat().st_size > 1000


def test_a_checkpoint_that_no_rl_stage_wrote_is_named(pretrained):
    p = report(f"--checkpoint={pretrained / 'ckpt.pt'}")
    assert p.returncode != 0 and p.stderr.strip() == (
        f"error: {pretrained / 'ckpt.pt'} was written by train.py; "
        "this needs one written by an RL stage (train.py --rl=...)"
    )

"""train.py end to end on a tiny model: resume, DDP, checkpoints, the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, wandb_history

TINY = [
    "--dim=32",
    "--n_layers=2",
    "--n_heads=4",
    "--n_kv_heads=2",
    "--batch_size=4",
    "--max_seq_len=32",
    "--eval_iters=2",
    "--log_interval=1",
    "--compile=False",
    "--dtype=float32",
    "--device=cpu",
    "--warmup_iters=2",
    "--learning_rate=3e-3",
]


def train(small_data, out_dir, *flags, launcher=(sys.executable,)):
    p = subprocess.run(
        [*launcher, str(ROOT / "train.py"), f"--data_dir={small_data}", f"--out_dir={out_dir}", *TINY, *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return p


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_resume_continues_the_same_loss_curve(small_data, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    schedule = ["--eval_interval=4", "--lr_decay_iters=8"]
    assert train(small_data, whole, "--max_iters=8", *schedule).returncode == 0
    assert train(small_data, part, "--max_iters=4", *schedule).returncode == 0
    p = train(small_data, part, "--max_iters=8", "--init_from=resume", *schedule)
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stdout
    a, b = log_rows(whole), log_rows(part)
    steps_a = [(r["iter"], r["train/loss_step"], r["lr"]) for r in a if "train/loss_step" in r]
    steps_b = [(r["iter"], r["train/loss_step"], r["lr"]) for r in b if "train/loss_step" in r]
    assert [s[0] for s in steps_b] == list(range(1, 9))
    for (ia, la, lra), (ib, lb, lrb) in zip(steps_a, steps_b):
        assert ia == ib and lra == pytest.approx(lrb) and la == pytest.approx(lb, abs=1e-5)
    assert a[-1]["val/loss"] == pytest.approx(b[-1]["val/loss"], abs=1e-5)
    assert a[-1]["val/loss"] < a[0]["val/loss"]  # it learned something
    assert os.path.exists(whole / "ckpt.pt") and os.path.exists(whole / "loss.png")


def test_two_process_gloo_ddp_keeps_ranks_in_sync_on_different_data(small_data, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    p = train(
        small_data, tmp_path, "--max_iters=6", "--eval_interval=3", "--gradient_accumulation_steps=2", launcher=launcher
    )
    assert p.returncode == 0, p.stderr[-2000:]
    evals = [r for r in log_rows(tmp_path) if "ddp/param_sum" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert len(r["ddp/param_sum"]) == 2
        assert r["ddp/param_sum"][0] == r["ddp/param_sum"][1]
        assert r["ddp/batch_sum"][0] != r["ddp/batch_sum"][1]
    assert evals[-1]["ddp/param_sum"][0] != evals[0]["ddp/param_sum"][0]  # and they did train


def test_truncated_or_foreign_checkpoint_is_a_one_line_error(small_data, tmp_path):
    assert train(small_data, tmp_path, "--max_iters=2", "--eval_interval=2").returncode == 0
    ckpt = tmp_path / "ckpt.pt"
    data = ckpt.read_bytes()
    for bad in (data[: len(data) // 2], b"garbage", b""):
        ckpt.write_bytes(bad)
        os.remove(tmp_path / "last.pt") if os.path.exists(tmp_path / "last.pt") else None
        p = train(small_data, tmp_path, "--max_iters=4", "--init_from=resume")
        assert p.returncode != 0
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "ckpt.pt" in p.stderr, p.stderr
        p = subprocess.run(
            [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={ckpt}"], capture_output=True, text=True
        )
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "ckpt.pt" in p.stderr, p.stderr
    torch.save({"something": 1}, ckpt)
    p = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={ckpt}"], capture_output=True, text=True
    )
    assert p.stderr.strip() == f"error: {ckpt} is not a checkpoint written by this project"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--no_such_key=1", "error: unknown config key --no_such_key"),
        ("--batch_size=abc", "error: --batch_size expects int, got 'abc'"),
        ("--compile=maybe", "error: --compile expects True or False, got 'maybe'"),
        ("--preset=7B", "error: unknown --preset=7B"),
        ("--dtype=float64", "error: --dtype=float64: must be one of auto, float32, bfloat16, float16"),
        pytest.param(
            "--device=cuda",
            "error: --device=cuda, but torch sees no CUDA GPU here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_command_line_is_a_one_line_error(small_data, tmp_path, flag, message):
    p = train(small_data, tmp_path, flag)
    assert p.returncode != 0
    assert p.stderr.strip().startswith(message) and len(p.stderr.strip().splitlines()) == 1


def test_missing_token_files_name_the_command_to_run(tmp_path):
    p = train(tmp_path / "nodata", tmp_path, "--vocab_size=512")
    assert p.returncode != 0
    assert "train_vocab --vocab_size=512" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sample_continues_the_prompt_and_is_reproducible(small_data, tmp_path):
    assert train(small_data, tmp_path, "--max_iters=2", "--eval_interval=2").returncode == 0

    def sample(*flags):
        p = subprocess.run(
            [
                sys.executable,
                str(ROOT / "sample.py"),
                f"--checkpoint={tmp_path / 'ckpt.pt'}",
                "--num_samples=2",
                "--max_new_tokens=20",
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    a, b, c = (
        sample("--seed=1", "--prompt=Once upon a time"),
        sample("--seed=1", "--prompt=Once upon a time"),
        sample("--seed=2", "--prompt=Once upon a time"),
    )
    assert a == b and a != c
    assert all(s.startswith("Once upon a time") for s in a.split("-" * 40 + "\n") if s.strip())
    p = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'ckpt.pt'}", "--prompt=" + "word " * 100],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "longer than the model's context of 32" in p.stderr


def test_wandb_offline_receives_every_row_of_the_log(small_data, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--data_dir={small_data}",
            f"--out_dir={tmp_path}",
            *TINY,
            "--max_iters=4",
            "--eval_interval=2",
            "--wandb_log=True",
            "--wandb_project=test",
            "--wandb_run_name=tiny",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {}  # log.jsonl's rows merged by iteration, as wandb merges the rows of one step
    for r in log_rows(tmp_path):
        rows.setdefault(r["iter"], {}).update(r)
    assert wandb_history(tmp_path) == [rows[i] for i in sorted(rows)] and len(rows) == 5


def test_wandb_log_without_wandb_installed_is_a_one_line_error(small_data, tmp_path):
    (tmp_path / "wandb.py").write_text("raise ImportError('No module named wandb')\n")  # shadows the installed one
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--data_dir={small_data}",
            f"--out_dir={tmp_path / 'out'}",
            *TINY,
            "--max_iters=2",
            "--wandb_log=True",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)},
    )
    assert (
        p.returncode != 0 and p.stderr.strip() == "error: --wandb_log=True needs the wandb package: pip install wandb"
    )

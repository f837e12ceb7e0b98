"""Never lose a trained model, never save a broken one. Every command line's bad input, one row each: a
one-line error naming what is wrong, a non-zero exit, no traceback, and every file that was there
before byte-identical after. Then the faults that stay tested: a run killed mid-iteration resumes to
the same weights, a second run into a locked out_dir is refused, a write that fails (the disk full, or
here a file-size limit) keeps the earlier file and names the one it could not write. And the usage
lines, as typed, at vocabulary 4096."""

import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED

import checkpoint

PY = sys.executable
TINY = "--dim=32 --n_layers=2 --n_heads=4 --n_kv_heads=2 --batch_size=4 --max_seq_len=128 --eval_iters=1 --device=cpu"
SMALL_RL = "--batch_size=4 --num_mini_batches=2 --max_new_tokens=8 --target_len=4 --eval_prompts=4 --device=cpu"


def run(cmd, cwd=ROOT, timeout=120):
    """A command line (a string, split on spaces, or a list) as a user types it."""
    argv = cmd.split(" ") if isinstance(cmd, str) else cmd
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def ok(cmd, cwd=ROOT):
    p = run(cmd, cwd)
    assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"
    return p


def snapshot(directory):
    """{file: sha256} of everything under directory but the out_dir locks."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def ws(small_data, run_binary, tmp_path_factory):
    """A user's working directory: data, a trained tiny model with its RL run and exports, and the bad
    inputs the rows below hand the commands."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(small_data, ws / "data", ignore=shutil.ignore_patterns("instruct_*"))  # no instruction set yet
    ok(f"{PY} train.py --data_dir={ws}/data --out_dir={ws}/out {TINY} --max_iters=2 --eval_interval=2")
    ok(f"{PY} train.py --rl=grpo --out_dir={ws}/out {SMALL_RL} --group_size=4 --max_iters=1")
    ok(f"{PY} export.py {ws}/out/model.bin --checkpoint={ws}/out/ckpt.pt")
    ok(f"{PY} export.py {ws}/hf --checkpoint={ws}/out/ckpt.pt --version=-1")
    (ws / "mine").mkdir()
    (ws / "mine" / "config.json").write_text('{"model_type": "llama"}')
    (ws / "mine" / "notes.txt").write_text("a user's own file")
    for name in ("hf_truncated", "hf_badconfig", "hf_gpt2"):
        shutil.copytree(ws / "hf", ws / name)
    weights = (ws / "hf" / "model.safetensors").read_bytes()
    (ws / "hf_truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (ws / "hf_badconfig" / "config.json").write_text('{"model_type": "llama",')
    config = json.loads((ws / "hf" / "config.json").read_text())
    (ws / "hf_gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    good = '{"prompt": "Once", "chosen": " upon a time.", "rejected": " upon"}\n'
    (ws / "pairs_num.jsonl").write_text('{"prompt": "Once", "chosen": 1, "rejected": " upon"}\n')
    (ws / "pairs_utf8.jsonl").write_bytes(good.encode() + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    (ws / "pairs_broken.jsonl").write_text(good + good + '{"prompt": "Once", "chosen": \n')
    ckpt = (ws / "out" / "ckpt.pt").read_bytes()
    (ws / "zero.pt").write_bytes(b"")
    (ws / "half.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (ws / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (ws / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    for name, files in (
        ("badutf8", {"train.txt": b"a story \xff\n", "valid.txt": b"fine\n"}),
        ("fakeparquet", {"train.parquet": b"not parquet", "valid.parquet": b"not parquet"}),
    ):
        (ws / name).mkdir()
        for f, content in files.items():
            (ws / name / f).write_bytes(content)
    (ws / "run").symlink_to(run_binary)  # ./run, as the rows below type it from the workspace
    return ws


LONG = "once " * 200
ROWS = [  # (the command line, with {ws} for the working directory; the fragment of its one-line error)
    # train.py: pretraining and SFT
    (
        f"{PY} train.py --data_dir={{ws}}/data --out_dir={{ws}}/out {TINY} --max_iters=2",
        "{ws}/out already holds a trained model (ckpt.pt): --init_from=resume continues it, --overwrite=True replaces",
    ),
    (f"{PY} train.py --data_dir={{ws}}/data --out_dir={{ws}}/new --batch_size=0", "--batch_size=0: must be > 0"),
    (f"{PY} train.py --data_dir={{ws}}/data --out_dir={{ws}}/new --eval_interval=0", "--eval_interval=0: must be > 0"),
    (
        f"{PY} train.py --data_dir={{ws}}/data --out_dir={{ws}}/new --learning_rate=-1",
        "--learning_rate=-1.0: must be > 0",
    ),
    (
        f"{PY} train.py --out_dir={{ws}}/out --init_from=resume --vocab_size=4096",
        "--vocab_size=4096 contradicts {ws}/out/last.pt, trained with vocab_size 512",
    ),
    (f"{PY} train.py --out_dir={{ws}}/out --sft=True", "no instruction data {ws}/data/tok512/instruct_train.bin"),
    (f"{PY} train.py --data_dir={{ws}}/data --out_dir={{ws}}/new --preset=7B", "unknown --preset=7B"),
    # train.py --rl=...: the RL stages
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --target_len=0", "--target_len=0: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --target_len=-5", "--target_len=-5: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --batch_size=0", "--batch_size=0: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --batch_size=-4", "--batch_size=-4: must be > 0"),
    (f"{PY} train.py --rl=grpo --out_dir={{ws}}/out --num_mini_batches=0", "--num_mini_batches=0: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --start_len=0", "--start_len=0: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --eval_interval=0", "--eval_interval=0: must be > 0"),
    (f"{PY} train.py --rl=ppo --out_dir={{ws}}/out --max_new_tokens=0", "--max_new_tokens=0: must be > 0"),
    (
        f"{PY} train.py --rl=grpo --out_dir={{ws}}/out --reward=length:1,foo",
        "--reward=length:1,foo: unknown reward 'foo'",
    ),
    (f"{PY} train.py --rl=grpo --out_dir={{ws}}/out --data_dir=/elsewhere", "--data_dir=/elsewhere contradicts"),
    (
        f"{PY} train.py --rl=grpo --out_dir={{ws}}/out --reward=instruct --overwrite=True",
        "no checkpoint at {ws}/out/sft_ckpt.pt",
    ),
    (
        f"{PY} train.py --rl=grpo --out_dir={{ws}}/out {SMALL_RL} --group_size=4 --reward=rm --rm_path={{ws}}/none.pt",
        "{ws}/out/grpo_ckpt.pt is a run on --reward=length, not rm: --overwrite=True starts afresh in its place",
    ),
    (
        f"{PY} train.py --rl=dpo --out_dir={{ws}}/out --pairs={{ws}}/pairs_num.jsonl",
        "{ws}/pairs_num.jsonl:1: 'chosen' is int, not a string",
    ),
    (
        f"{PY} train.py --rl=dpo --out_dir={{ws}}/out --pairs={{ws}}/pairs_utf8.jsonl",
        "{ws}/pairs_utf8.jsonl:2: not valid UTF-8",
    ),
    (
        f"{PY} train.py --rl=dpo --out_dir={{ws}}/out --pairs={{ws}}/pairs_broken.jsonl",
        "{ws}/pairs_broken.jsonl:3: not valid JSON",
    ),
    # sample.py
    (f"{PY} sample.py --checkpoint={{ws}}/out/ckpt.pt --max_new_tokens=-5", "--max_new_tokens=-5: must be > 0"),
    (f"{PY} sample.py --checkpoint={{ws}}/out/ckpt.pt --num_samples=0", "--num_samples=0: must be > 0"),
    ([PY, "sample.py", "--checkpoint={ws}/out/ckpt.pt", f"--prompt={LONG}"], "longer than the model's context of 128"),
    (f"{PY} sample.py --checkpoint={{ws}}/zero.pt", "{ws}/zero.pt is truncated or not a PyTorch checkpoint"),
    (f"{PY} sample.py --checkpoint={{ws}}/half.pt", "{ws}/half.pt is truncated or not a PyTorch checkpoint"),
    (
        f"{PY} sample.py --checkpoint={{ws}}/out/ckpt.pt --tokenizer={SHARED}/models/llama2c/tokenizer.model",
        "has 32000 tokens, the model 512",
    ),
    # export.py
    (
        f"{PY} export.py {{ws}}/mine --version=-1 --checkpoint={{ws}}/out/ckpt.pt",
        "{ws}/mine holds notes.txt: not overwriting it",
    ),
    (
        f"{PY} export.py {{ws}}/m.bin --hf={{ws}}/hf_truncated",
        "{ws}/hf_truncated/model.safetensors is truncated or not a safetensors file",
    ),
    (f"{PY} export.py {{ws}}/m.bin --hf={{ws}}/hf_badconfig", "{ws}/hf_badconfig/config.json is not valid JSON"),
    (f"{PY} export.py {{ws}}/m.bin --hf={{ws}}/hf_gpt2", "not a transformers Llama config (model_type 'gpt2')"),
    (
        f"{PY} export.py {{ws}}/m.bin --checkpoint={{ws}}/out/ckpt.pt --version=3",
        "--version=3: must be one of -1, 0, 1, 2",
    ),
    # report.py, prefs.py, reward_model.py
    (
        f"{PY} report.py --checkpoint={{ws}}/out/ckpt.pt",
        "{ws}/out/ckpt.pt was written by train.py; this needs one written by",
    ),
    (f"{PY} prefs.py --checkpoint={{ws}}/out/ckpt.pt --samples_per_prompt=1", "--samples_per_prompt=1: must be >= 2"),
    (
        f"{PY} prefs.py --label=instruct --checkpoint={{ws}}/out/ckpt.pt",
        "no instruction data {ws}/data/tok512/instruct_train.jsonl",
    ),
    # compare.py
    (
        f"{PY} compare.py --models=a:{{ws}}/out/ckpt.pt --reference=b",
        "--reference=b is not one of the --models (a)",
    ),
    (f"{PY} compare.py --models={{ws}}/out/ckpt.pt", "expected name:path,name:path"),
    (f"{PY} compare.py --curves=a:{{ws}}/none.jsonl", "no log file {ws}/none.jsonl"),
    (
        f"{PY} reward_model.py --checkpoint={{ws}}/out/ckpt.pt --pairs={{ws}}/pairs_broken.jsonl "
        "--rm_path={ws}/rm.pt",
        "{ws}/pairs_broken.jsonl:3: not valid JSON",
    ),
    # tinystories.py
    (
        f"{PY} tinystories.py train_vocab --vocab_size=300 --data_dir={{ws}}/data",
        "vocab_size 300 is too small for this data",
    ),
    (
        f"{PY} tinystories.py pretokenize --vocab_size=1000 --data_dir={{ws}}/data",
        "no tokenizer model at {ws}/data/tok1000.model",
    ),
    (f"{PY} tinystories.py shuffle --data_dir={{ws}}/data", "--stage=shuffle: must be one of download, train_vocab"),
    (
        f"{PY} tinystories.py instruct --vocab_size=512 --data_dir={{ws}}/nodata",
        "no tokenizer model at {ws}/nodata/tok512.model",
    ),
    (
        f"{PY} tinystories.py download --source={{ws}}/badutf8 --data_dir={{ws}}/dl",
        "train.txt is not valid UTF-8 (byte 8)",
    ),
    (f"{PY} tinystories.py download --source={{ws}}/fakeparquet --data_dir={{ws}}/dl", "cannot read stories from"),
    # ./run (the workspace's link to the tests' build)
    ("{ws}/run {ws}/x.gguf", "{ws}/x.gguf is a GGUF file (llama.cpp's format)"),
    ("{ws}/run {ws}/x.safetensors", "{ws}/x.safetensors is a safetensors file (Hugging Face)"),
    ("{ws}/run {ws}/out/model.bin -n -1", "-n expects a number of steps >= 0"),
    ("{ws}/run {ws}/out/model.bin -z {ws}/out/ckpt.pt", "{ws}/out/ckpt.pt"),
]


def row_id(row):
    """The program a row runs and its first flag, for the test's name."""
    words = [w for w in (row[0].split(" ") if isinstance(row[0], str) else row[0]) if w != PY]
    return "-".join(os.path.basename(w.split("=")[0]).lstrip("-") for w in words[:2])


@pytest.mark.parametrize("cmd, fragment", ROWS, ids=[f"{i}-{row_id(row)}" for i, row in enumerate(ROWS)])
def test_every_bad_input_is_one_line_and_changes_nothing(ws, cmd, fragment):
    before = snapshot(ws)
    argv = [a.format(ws=ws) for a in (cmd.split(" ") if isinstance(cmd, str) else cmd)]
    fragment = fragment.format(ws=ws)
    p = run(argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], f"expected {fragment!r}, stderr: {p.stderr[-600:]}"
    assert snapshot(ws) == before  # nothing the user had is lost, changed or added


def test_a_second_run_into_a_locked_out_dir_names_the_first_runs_pid(ws):
    with open(ws / "out" / ".lock", "a+") as lock:  # as a running train.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.seek(0)
        lock.truncate()
        lock.write("4242\n")
        lock.flush()
        before = snapshot(ws)
        for cmd in (
            f"{PY} train.py --out_dir={ws}/out --init_from=resume --max_iters=3",
            f"{PY} train.py --rl=grpo --out_dir={ws}/out {SMALL_RL} --group_size=4 --max_iters=2",
        ):
            p = run(cmd)
            assert p.returncode != 0 and p.stderr.strip() == (
                f"error: {ws}/out is in use by another run (PID 4242); "
                "wait for it to finish or choose another --out_dir"
            )
        assert snapshot(ws) == before
    ok(f"{PY} train.py --rl=grpo --out_dir={ws}/out {SMALL_RL} --group_size=4 --max_iters=1")  # released: it runs


# ---------------------------------------------------------------------------
# kill -9 in the middle of a run, then the same command again


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "reinforce_pp", "dpo", "sft"])
def test_a_run_killed_mid_iteration_resumes_to_the_same_weights(stage, ws, tmp_path):
    rl = f"{SMALL_RL} --eval_prompts=2 --ptx_coef=0.5 --rl="
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Once", "chosen": " upon a time, a cat sat.", "rejected": " upon"}\n' * 8)
    flags = {
        "ppo": rl + "ppo",
        "grpo": rl + "grpo --group_size=4",
        "rloo": rl + "rloo --group_size=2",
        "reinforce_pp": rl + "reinforce_pp",
        "dpo": f"--rl=dpo --pairs={pairs} --batch_size=4 --eval_prompts=2",
        "sft": "--sft=True --batch_size=4 --eval_iters=1",
    }[stage]
    command = f"{PY} train.py {flags} --eval_interval=1 --max_iters=4"
    result, log_name = (
        ("sft_last.pt", "sft_log.jsonl") if stage == "sft" else (f"{stage}_ckpt.pt", f"{stage}_log.jsonl")
    )
    data = tmp_path / "data"
    if stage == "sft":
        shutil.copytree(ws / "data", data)
        ok(f"{PY} tinystories.py instruct --vocab_size=512 --data_dir={data} --max_seq_len=128")
    for name in ("whole", "part"):
        shutil.copytree(ws / "out", tmp_path / name, ignore=shutil.ignore_patterns("grpo_*", ".lock"))
        if stage == "sft":  # the model's record names its data: this copy's, with the instruction set
            ckpt = checkpoint.load(str(tmp_path / name / "ckpt.pt"))
            checkpoint.save(
                str(tmp_path / name / "ckpt.pt"),
                "pretrain",
                ckpt["model"],
                ckpt["model_args"],
                ckpt["tokenizer"],
                str(data),
            )
    ok(f"{command} --out_dir={tmp_path}/whole")
    # the same run, killed once its log holds iteration 2: in iteration 3 or 4, mid-way or mid-save
    log = tmp_path / "part" / log_name
    p = subprocess.Popen(
        f"{command} --out_dir={tmp_path}/part".split(" "),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if log.exists() and any(json.loads(line).get("iter") == 2 for line in log.read_text().splitlines() if line):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert p.wait() == -signal.SIGKILL  # killed, not finished
    ok(f"{command} --out_dir={tmp_path}/part")  # the same command again resumes
    whole, part = (checkpoint.load(str(tmp_path / name / result)) for name in ("whole", "part"))
    assert whole["iter_num"] == part["iter_num"] == 4
    assert all(torch.equal(w, part["model"][k]) for k, w in whole["model"].items())
    if stage != "sft":  # and the RL state: the KL coefficient, PPO's value head
        assert whole["rl"]["kl_coef"] == part["rl"]["kl_coef"]
        heads = whole["rl"]["heads"].get("value_head", {})
        assert all(torch.equal(w, part["rl"]["heads"]["value_head"][k]) for k, w in heads.items())


# ---------------------------------------------------------------------------
# a write that fails part-way: every writer keeps the earlier file and names the one it could not write


def limited(limit):
    """For subprocess.run's preexec_fn: files may grow to `limit` bytes; a write past it fails with EFBIG
    (SIGXFSZ ignored), as a full disk fails one with ENOSPC: both reach the writer as an OSError."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


WRITERS = [  # (what is written, the command that writes it over an earlier one, the file)
    (
        "checkpoint",
        f"{PY} train.py --out_dir={{ws}}/out --init_from=resume --eval_only=True --always_save_checkpoint=True "
        "--eval_interval=1",
        "out/last.pt",
    ),
    (
        "RL checkpoint",
        f"{PY} train.py --rl=grpo --out_dir={{ws}}/out {SMALL_RL} --group_size=4 --max_iters=1 --overwrite=True",
        "out/grpo_ckpt.pt",
    ),
    ("fp32 .bin", f"{PY} export.py {{ws}}/out/model.bin --checkpoint={{ws}}/out/ckpt.pt", "out/model.bin"),
    ("Q8_0 .bin", f"{PY} export.py {{ws}}/out/model.bin --checkpoint={{ws}}/out/ckpt.pt --version=2", "out/model.bin"),
    ("GGUF", f"{PY} export.py {{ws}}/out/model.gguf --checkpoint={{ws}}/out/ckpt.pt", "out/model.gguf"),
    ("transformers", f"{PY} export.py {{ws}}/hf --checkpoint={{ws}}/out/ckpt.pt --version=-1", "hf/model.safetensors"),
    ("imported checkpoint", f"{PY} export.py {{ws}}/out/imported.pt --hf={{ws}}/hf", "out/imported.pt"),
    (
        "token files",
        f"{PY} tinystories.py pretokenize --vocab_size=512 --data_dir={{ws}}/data --force",
        "data/tok512/train.bin",
    ),
    ("tokenizer .bin", f"{PY} tokenizer.py --tokenizer-model={{ws}}/data/tok512.model", "data/tok512.bin"),
]


@pytest.mark.parametrize("what, cmd, target", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_failed_write_keeps_the_earlier_file_and_names_the_one_it_could_not_write(what, cmd, target, ws, tmp_path):
    work = tmp_path / "ws"
    shutil.copytree(ws, work, ignore=shutil.ignore_patterns(".lock"))
    argv = cmd.format(ws=work).split(" ")
    first = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-2000:]  # the earlier file, as this command writes it
    earlier = (work / target).read_bytes()
    before = snapshot(work)
    p = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limited(len(earlier) // 2),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (
        f"error: could not write {work / target}: " in p.stderr
        and f"the earlier {work / target} is unchanged" in p.stderr
    )
    assert (work / target).read_bytes() == earlier and snapshot(work) == before  # and no temporary file is left


# ---------------------------------------------------------------------------
# the usage lines, in order, at vocabulary 4096 (small shapes and few iterations, to run in seconds)


def test_the_usage_lines_run_as_typed_at_vocabulary_4096(tmp_path, run_binary):
    d = tmp_path / "work"
    d.mkdir()
    py = lambda script: f"{PY} {ROOT / script}"  # noqa: E731  (run from the user's own directory)
    ok(f"{py('tinystories.py')} download --source={SHARED}/tinystories", d)
    ok(f"{py('tinystories.py')} train_vocab --vocab_size=4096", d)
    ok(f"{py('tinystories.py')} pretokenize --vocab_size=4096", d)
    ok(f"{py('train.py')} --vocab_size=4096 {TINY} --max_iters=4 --eval_interval=2", d)
    ok(f"{py('train.py')} --ppo=True {SMALL_RL} --max_iters=1", d)  # no --vocab_size: the checkpoint's
    ok(f"{py('export.py')} out/model.bin", d)
    p = ok([str(run_binary), "out/model.bin", "-z", "data/tok4096.bin", "-n", "16", "-i", "Once upon a time"], d)
    assert p.stdout.startswith("Once upon a time")
    p = ok(f"{py('sample.py')} --num_samples=1 --max_new_tokens=16", d)
    assert p.stdout.strip() and checkpoint.load(str(d / "out" / "ppo_ckpt.pt"))["model_args"]["vocab_size"] == 4096

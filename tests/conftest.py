import fcntl
import glob
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's workers, one a core: one thread each, and in what they start
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"  # transformers and datasets read local paths only; the hub is never asked

import sources  # noqa: E402
import tinystories  # noqa: E402


def first_stories(path, n):
    return sources.read_stories(path)[:n]


def real_story_parts(n, offset=0):
    """(prompt, rest) of real stories: the first sentence, then the next six (about 60 words)."""
    parts = []
    for story in first_stories(SHARED / "tinystories" / "train-000.txt", offset + n * 3)[offset:]:
        sents = [s.strip() for s in story.replace("\n", " ").split(". ") if s.strip()]
        if len(sents) >= 7 and all(len(s) > 20 for s in sents[:7]):
            parts.append((sents[0] + ".", " " + ". ".join(sents[1:7]).rstrip(".") + "."))
    return parts[:n]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: more threads than free cores is 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A prepared data dir from a slice of the real shared TinyStories: 300 train and 80
    validation stories, a 512-token tokenizer and its token files."""
    root = tmp_path_factory.mktemp("tinystories")
    source = root / "source"
    source.mkdir()
    for name, n in (("train-000.txt", 300), ("valid-000.txt", 80)):
        stories = first_stories(SHARED / "tinystories" / name, n)
        (source / name).write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    data_dir = str(root / "data")
    tinystories.download(data_dir, str(source))
    tinystories.train_vocab(512, data_dir)
    tinystories.pretokenize(512, data_dir, quiet=True)
    return data_dir


# ---------------------------------------------------------------------------
# the C engine's kernel paths (csrc/kernels.h): each one this CPU can execute is built and tested


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', ARM 'Features'); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_paths():
    """(kernels name, ARCH for make) of every path this CPU executes: the portable C always, then
    AVX2 and AVX-512, each with and without VNNI, or this ARM CPU's NEON."""
    flags, machine = cpu_flags(), platform.machine()
    paths = [("portable", "portable")]
    avx2 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}  # x86-64-v3
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}  # x86-64-v4
    for name, arch, needs in [
        ("avx2", "x86-64-v3", avx2),
        ("avx2-vnni", "x86-64-v3 -mavxvnni", avx2 | {"avx_vnni"}),
        ("avx512", "x86-64-v4", avx512),
        ("avx512-vnni", "x86-64-v4 -mavx512vnni", avx512 | {"avx512_vnni"}),
    ]:
        if needs <= flags:
            paths.append((name, arch))
    if machine in ("aarch64", "arm64"):
        paths.append(("neon-dotprod" if "asimddp" in flags or machine == "arm64" else "neon", "native"))
    return paths


KERNEL_PATHS = kernel_paths()


class KernelBuild:
    """One kernel path built into its own directory: ./run (runomp), the engine and attention
    libraries, and the kernel test (tests/c/test_kernels.c)."""

    def __init__(self, name, arch, directory):
        self.name, self.arch, self.dir = name, arch, directory
        self.run, self.test_kernels = directory / "run", directory / "test_kernels"

    def build(self):
        directory = self.dir
        for target, var in [
            ("runomp", f"BIN={directory / 'run'}"),
            (directory / "libengine.so", f"LIB={directory / 'libengine.so'}"),
            (directory / "libattention.so", f"ATTENTION_LIB={directory / 'libattention.so'}"),
            (directory / "test_kernels", f"KTEST={directory / 'test_kernels'}"),
        ]:
            r = subprocess.run(
                ["make", "-s", "-B", f"ARCH={self.arch}", var, str(target)], cwd=ROOT, capture_output=True, text=True
            )
            assert r.returncode == 0 and "warning" not in r.stderr, f"make {target} ARCH={self.arch}:\n{r.stderr}"

    def engine_lib(self):
        from csrc import engine

        return engine.load(self.dir / "libengine.so")


@pytest.fixture(scope="session", params=KERNEL_PATHS, ids=[name for name, _ in KERNEL_PATHS])
def kernel_build(request, tmp_path_factory):
    """Built once a session: pytest-xdist's workers (make test runs one a core) share the session's
    directory, and the first to take a path's lock builds it."""
    name, arch = request.param
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    build = KernelBuild(name, arch, root / f"kernels-{name}")
    with open(root / f"kernels-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not build.dir.exists():
            partial = KernelBuild(name, arch, root / f"kernels-{name}.partial")
            shutil.rmtree(partial.dir, ignore_errors=True)  # what a failed build left
            partial.dir.mkdir()
            partial.build()
            partial.dir.rename(build.dir)
    return build


@pytest.fixture(scope="session")
def pretrained(small_data, tmp_path_factory):
    """A directory holding a 260K-shaped ckpt.pt as train.py writes it (random weights): where the RL
    stages start."""
    import torch

    from common import save_atomic
    from model import PRESETS, ModelArgs, Transformer

    out = tmp_path_factory.mktemp("stories260K")
    torch.manual_seed(0)
    args = {**PRESETS["260K"], "dropout": 0.0}
    meta = json.load(open(os.path.join(small_data, "tok512", "meta.json")))
    save_atomic(
        {
            "model": Transformer(ModelArgs(**args)).state_dict(),
            "model_args": args,
            "iter_num": 100,
            "best_val_loss": 3.0,
            "config": {},
            "tokenizer": {k: meta[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "bos_id")},
        },
        str(out / "ckpt.pt"),
    )
    return out


TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=8, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_ckpt(small_data, tmp_path_factory):
    """A tiny model trained for a few seconds on small_data, saved as train.py saves: it writes
    words, unlike a random one."""
    import torch

    from common import save_atomic
    from model import ModelArgs, Transformer
    from tinystories import iter_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = iter_batches(os.path.join(small_data, "tok512", "train.bin"), 16, 64)
    for _ in range(60):
        _, loss = model(*next(stream))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    save_atomic(
        {
            "model": model.state_dict(),
            "model_args": TINY,
            "tokenizer": {"tokenizer": os.path.join(small_data, "tok512.model"), "vocab_size": 512, "bos_id": 1},
        },
        path,
    )
    return path


# ---------------------------------------------------------------------------
# the RL methods' tests: tiny models, prompts and a training loop through a method's own iteration()

STOP = (1, 2)  # BOS and EOS, as in the tokenizers


def tiny_model(seed=0, vocab_size=64, std=None):
    import torch

    from model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=8, max_seq_len=64)
    )
    if std:  # a random model far from uniform, so that policies differ visibly
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model.eval()


def bos_prompts(n, length=1, seed=0):
    """n prompts (token lists) of BOS and length - 1 random tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.ones(n, 1, dtype=torch.long), torch.randint(3, 64, (n, length - 1), generator=g)], 1
    ).tolist()


def tiny_run(method, policy, reference, score, cfg, prompts=None):
    """An rl_train.Run for a method on tiny models, without a checkpoint: the optimizer and KL controller
    of rl_train.setup, BOS-only prompts (or `prompts`), and score(rollouts) -> (B,) as the reward."""
    import rl_train
    import tasks

    prompts = prompts or [[1]]
    task = tasks.Task(
        "test", lambda rng, n: [prompts[i % len(prompts)] for i in range(n)], prompts, score, lambda *args: {}
    )
    return rl_train.run_of(method, policy, reference, task, cfg, STOP)


def learn(run, iters):
    """iters iterations of the run's method through the loop's own pieces (rl_train.next_batch, the
    method's iteration, the KL controller). Returns each iteration's mean score and statistics."""
    import numpy as np
    import torch

    import rl_train
    import rollouts

    history = []
    for it in range(iters):
        run.iter_num = it
        run.rng = np.random.default_rng([0, 0, it])
        run.shuffle = torch.Generator().manual_seed(1000 + it)
        batch = rl_train.next_batch(run)
        stats = run.method.iteration(run, batch)
        run.kl_ctl.update(rollouts.rollout_stats(batch)["objective/kl"], len(batch.tokens))
        history.append((batch.scores.mean().item(), stats))
    return history


def learn_short_stories(module, **overrides):
    """30 iterations of a method (its iteration() and config) on a tiny fresh model, rewarded for ending
    its stories at 4 tokens (12 at most), 32 rollouts an iteration. Returns the mean score of the first
    and of the last three iterations, and the history."""
    import copy

    import configurator
    import rl

    policy = rl.Policy(tiny_model(), value_head=getattr(module, "VALUE_HEAD", False))
    reference = rl.Policy(copy.deepcopy(policy.model)).requires_grad_(False)
    cfg = {
        **configurator.split(module.config)[0],
        "batch_size": 16,
        "num_mini_batches": 2,
        "max_new_tokens": 12,
        "learning_rate": 3e-3,
        "init_kl_coef": 0.01,
        **overrides,
    }
    history = learn(tiny_run(module, policy, reference, length_score(4), cfg), 30)
    before, after = (sum(s for s, _ in h) / 3 for h in (history[:3], history[-3:]))
    return before, after, history


def length_score(target_len):
    """The length reward at target_len, as the RL stages score it."""
    import tasks

    return lambda batch: tasks.score_rollouts(
        batch, {"length": 1.0}, {"target_len": target_len, "missing_eos_penalty": 1.0}
    )


@pytest.fixture(scope="session")
def run_binary(tmp_path_factory):
    """./run as `make runomp` builds it (the AVX-512 and OpenMP build when the CPU has them), into this
    session's own directory: the user's ./run is never rewritten, nor one that another process runs."""
    path = tmp_path_factory.mktemp("runomp") / "run"
    r = subprocess.run(["make", "-s", "runomp", f"BIN={path}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(path)


def wandb_history(out_dir):
    """The rows that the offline wandb run under out_dir logged, without wandb's own _keys. Its transaction
    log is a 7-byte W&B header, then LevelDB log records (crc32c, length, type) in 32 KiB blocks: FULL,
    or FIRST, MIDDLE and LAST pieces, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = open(path, "rb").read()
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows

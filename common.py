"""
What the scripts share: bad input as one error line, atomic writes, the out_dir lock, the device and
dtype, DDP, the learning-rate schedule and the metrics log. Small functions; nothing here imports the
project's other modules, so any of them can import this one.
"""

import ctypes
import fcntl
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# errors


class DataError(Exception):
    """Bad or missing input: the CLI prints it as one line and exits non-zero."""


@contextmanager
def one_line_errors():
    """Bad input (a DataError, a bad value) or a file that cannot be read or written (an OSError: missing,
    a full disk) ends the program with one `error: ...` line and a non-zero exit instead of a traceback.
    Wrap the set-up and the writes only: a bug in the work itself should keep its traceback."""
    try:
        yield
    except (DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# atomic writes: a crash or Ctrl-C never leaves a half-written file under the real name


@contextmanager
def atomic_path(path):
    """A temporary name beside `path` (same extension) to write to; renamed to `path` when the block
    ends, removed if it fails. A failed write (a full disk) is an OSError naming the file and the
    cause, and the file already at path, if any, stays as it was."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer turns a failed write into RuntimeError("... unexpected pos ..."), the OSError its context
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError) or str(e).startswith("could not write"):
            raise
        kept = f"; the earlier {path} is unchanged" if os.path.exists(path) else ""
        raise OSError(f"could not write {path}: {cause.strerror or cause}{kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path, mode="wb"):
    """open() for writing, through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def save_atomic(obj, path):
    """torch.save, atomically (atomic_path)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def out_dir_lock(out_dir):
    """An exclusive lock on out_dir for this run's lifetime, taken by rank 0: a second run into the same
    out_dir stops with one line naming the first one's PID. It is an flock, which the kernel releases
    when the process ends however it ends, so a killed run leaves no stale lock. Returns the open lock
    file (closing it releases the lock)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return open(os.devnull)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise DataError(
            f"{out_dir} is in use by another run (PID {pid}); wait for it to finish or choose another --out_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


# -----------------------------------------------------------------------------
# device and dtype

PTDTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), for benchmarks to say where they ran."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def cpu_has_fast_bf16():
    """AMX: where bf16 autocast pays on CPU (bench/train_speed.py: 1.4x fp32 eager at the default
    shape on a CPU with AMX; 0.57x on one with AVX512-BF16 but no AMX, whose bf16 matmuls run at
    half the fp32 rate)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags


def resolve_device_dtype(device, dtype):
    """'auto' device -> cuda if present, else cpu; 'auto' dtype -> bf16 where the hardware runs it fast
    (fp16 on GPUs without bf16), else fp32. Returns device, device_type ('cuda', 'cpu', 'mps'), dtype;
    a DataError for a device this machine lacks or a dtype that is not one of PTDTYPES."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if "cuda" in device else device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DataError(
            f"--device={device}, but torch sees no CUDA GPU here (torch {torch.__version__}); use --device=cpu"
        )
    if (
        device_type == "cuda"
        and torch.device(device).index is not None
        and torch.device(device).index >= torch.cuda.device_count()
    ):
        raise DataError(f"--device={device}, but torch sees {torch.cuda.device_count()} CUDA GPUs")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device=mps, but this machine has no MPS (Apple GPU) backend; use --device=cpu")
    if device_type not in ("cpu", "cuda", "mps"):
        raise DataError(f"--device={device}: choose auto, cpu, cuda, cuda:N or mps")
    if dtype not in ("auto", *PTDTYPES):
        raise DataError(f"--dtype={dtype}: choose auto, {', '.join(PTDTYPES)}")
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if device_type == "cpu" and cpu_has_fast_bf16() else "float32"
    return device, device_type, dtype


def reuse_freed_memory():
    """Make glibc keep freed memory for reuse. By default it unmaps freed blocks of over 32 MB and trims
    the heap, so generation steps can page-fault their KV-cache-sized buffers back in every time: 400
    rollouts of 300 tokens from the 260K model took 27 s of CPU (11M page faults) instead of 10 s."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    except (OSError, AttributeError):  # not glibc
        pass


def autocast(device_type, dtype):
    """The autocast context of a dtype name: none for float32."""
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=PTDTYPES[dtype])


def peak_matmul_flops(device, dtype, n=1024, reps=5):
    """Measured peak matmul FLOP/s of this device in this dtype, the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if "cuda" in str(device):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if "cuda" in str(device):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# -----------------------------------------------------------------------------
# DDP: launched by torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE


def init_ddp(device, device_type):
    """Join the process group under torchrun (NCCL on GPUs, gloo on CPU) and pin this rank's GPU.
    Returns ddp (bool), rank, local_rank, world_size and the device of this rank."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return True, rank, local_rank, world_size, device


_last_work = []  # see collective()


def collective(op, *tensors):
    """op(*tensors) (dist.all_reduce, dist.all_gather, ...) run to completion, its Work kept until
    the next collective, so that the last reference to the tensors is dropped here, on the main
    thread, and not by the gloo worker thread that ran the op (it drops its own just after the op
    completes). Dropping it needs the GIL, and once the interpreter has begun to exit (a rank
    that is not the master gets there within a millisecond of its last collective) that thread
    cannot take it and the process aborts ("terminate called without an active exception").
    destroy_process_group does not stop those threads while DDP holds the group, nor does
    deleting the DDP model first."""
    work = op(*tensors, async_op=True)
    work.wait()
    _last_work[:] = [work]


def mean_over_ranks(stats, device):
    """{name: float} -> the same names, each the mean over all ranks."""
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    collective(dist.all_reduce, values)
    return dict(zip(stats, (values / dist.get_world_size()).tolist()))


def rank_sums(model, batch):
    """Every rank's parameter sum and batch sum, to show that the ranks stay in sync (the same
    parameters) while reading different data: {'ddp/param_sum': [...], 'ddp/batch_sum': [...]}."""
    local = torch.tensor(
        [sum(p.double().sum().item() for p in model.parameters()), batch.double().sum().item()],
        dtype=torch.float64,
        device=batch.device,
    )
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    collective(dist.all_gather, gathered, local)
    return {"ddp/param_sum": [g[0].item() for g in gathered], "ddp/batch_sum": [g[1].item() for g in gathered]}


# -----------------------------------------------------------------------------
# the learning-rate schedule


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr; cfg: a config dict with learning_rate, decay_lr,
    warmup_iters, lr_decay_iters, min_lr and max_iters."""
    lr = cfg["learning_rate"]
    if not cfg["decay_lr"]:
        return lr
    floor = cfg["min_lr"] or lr / 10
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it > decay_iters:
        return floor
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - floor)


# -----------------------------------------------------------------------------
# the metrics log and figures


def start_wandb(cfg, out_dir):
    """A Weights & Biases run when cfg["wandb_log"] (llama2.c's keys: wandb_log, wandb_project,
    wandb_run_name), else None. WANDB_MODE=offline keeps it in out_dir/wandb without a network
    (`wandb sync` uploads it later)."""
    if not cfg["wandb_log"]:
        return None
    try:
        import wandb
    except ImportError:
        raise DataError("--wandb_log=True needs the wandb package: pip install wandb") from None
    directory = os.environ.get("WANDB_DIR", out_dir)  # the user's WANDB_DIR wins
    return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg, dir=directory)


class MetricsLog:
    """A run's metrics log: a JSON line a row, at path (where enabled: rank 0), each row also to wandb_run
    (from start_wandb) at its iteration or step. Rows wait in memory until commit(), which a loop calls
    once the checkpoint they belong to is saved: the file never runs ahead of its checkpoint, and a run
    that fails before its first save leaves an earlier run's log as it was. The first commit rewrites
    the file: empty for a new run, the rows up to resume_iter for a resumed one."""

    def __init__(self, path, resume_iter=None, enabled=True, wandb_run=None):
        self.path, self.resume_iter, self.enabled, self.wandb_run = path, resume_iter, enabled, wandb_run
        self.pending, self.started = [], False

    def __call__(self, row):
        if self.enabled:
            self.pending.append(row)
            if self.wandb_run is not None:
                self.wandb_run.log(row, step=row.get("iter", row.get("step")))

    def commit(self):
        if not self.enabled:
            return
        if not self.started:
            kept = []
            if self.resume_iter is not None and os.path.exists(self.path):
                kept = [line for line in open(self.path) if json.loads(line)["iter"] <= self.resume_iter]
            with atomic_open(self.path, "w") as f:
                f.writelines(kept)
            self.started = True
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.pending)
        self.pending = []


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]

import glob
import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
os.environ["HF_HUB_OFFLINE"] = "1"  # transformers and datasets read local paths only; the hub is never asked

import tinystories  # noqa: E402


def first_stories(path, n):
    return tinystories.read_stories(path)[:n]


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
    for name, arch, needs in [("avx2", "x86-64-v3", avx2), ("avx2-vnni", "x86-64-v3 -mavxvnni", avx2 | {"avx_vnni"}),
                              ("avx512", "x86-64-v4", avx512),
                              ("avx512-vnni", "x86-64-v4 -mavx512vnni", avx512 | {"avx512_vnni"})]:
        if needs <= flags:
            paths.append((name, arch))
    if machine in ("aarch64", "arm64"):
        paths.append(("neon-dotprod" if "asimddp" in flags or machine == "arm64" else "neon", "native"))
    return paths


KERNEL_PATHS = kernel_paths()


class KernelBuild:
    """One kernel path built into its own directory: ./run (runomp), the engine and attention
    libraries, and the kernel test (csrc/test_kernels.c)."""

    def __init__(self, name, arch, directory):
        self.name, self.arch, self.dir = name, arch, directory
        for target, var in [("runomp", f"BIN={directory / 'run'}"), (directory / "libengine.so", f"LIB={directory / 'libengine.so'}"),
                            (directory / "libattention.so", f"ATTENTION_LIB={directory / 'libattention.so'}"),
                            (directory / "test_kernels", f"KTEST={directory / 'test_kernels'}")]:
            r = subprocess.run(["make", "-s", "-B", f"ARCH={arch}", var, str(target)], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0 and "warning" not in r.stderr, f"make {target} ARCH={arch}:\n{r.stderr}"
        self.run, self.test_kernels = directory / "run", directory / "test_kernels"

    def engine_lib(self):
        from csrc import engine
        return engine.load(self.dir / "libengine.so")

    def attention_lib(self):
        from csrc import attention
        return attention.ffi.dlopen(str(self.dir / "libattention.so"))


@pytest.fixture(scope="session", params=KERNEL_PATHS, ids=[name for name, _ in KERNEL_PATHS])
def kernel_build(request, tmp_path_factory):
    name, arch = request.param
    return KernelBuild(name, arch, tmp_path_factory.mktemp(f"kernels-{name}"))


@pytest.fixture(scope="session")
def run_binary():
    """./run, built as `make runomp` (the AVX-512 and OpenMP build when the CPU has them)."""
    r = subprocess.run(["make", "-s", "runomp"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(ROOT / "run")


def wandb_history(out_dir):
    """The rows that the offline wandb run under out_dir logged, without wandb's own _keys. Its transaction
    log is a 7-byte W&B header, then LevelDB log records (crc32c, length, type) in 32 KiB blocks: FULL,
    or FIRST, MIDDLE and LAST pieces, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    path, = glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = open(path, "rb").read()
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows

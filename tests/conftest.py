import glob
import json
import os
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

"""common.py: atomic writes, the metrics log on resume, the learning-rate schedule, one-line errors."""

import errno
import io
import os

import pytest
import torch

import common
from common import DataError, MetricsLog, atomic_open, get_lr, one_line_errors, read_jsonl, save_atomic


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    with atomic_open(str(path), "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_log_holds_only_committed_rows_and_keeps_the_rows_up_to_the_resume_point(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = MetricsLog(path)
    for it in range(1, 6):
        log({"iter": it, "loss": 1.0 / it})
    assert not os.path.exists(path)  # nothing saved yet: nothing written
    log.commit()
    resumed = MetricsLog(path, resume_iter=3)
    resumed({"iter": 4, "loss": 0.0})
    assert len(read_jsonl(path)) == 5  # an earlier run's log stays as it was until the new run commits
    resumed.commit()
    assert [(r["iter"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.0)]
    other_rank = MetricsLog(path, enabled=False)
    other_rank({"iter": 1})
    other_rank.commit()  # another rank: neither empties nor writes
    assert len(read_jsonl(path)) == 4
    new = MetricsLog(path)
    new.commit()  # a new run
    assert read_jsonl(path) == []


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = {
        "learning_rate": 1.0,
        "decay_lr": True,
        "warmup_iters": 10,
        "lr_decay_iters": 0,
        "min_lr": 0.0,
        "max_iters": 110,
    }
    lrs = [get_lr(it, cfg) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert get_lr(50, {**cfg, "decay_lr": False}) == 1.0


def test_bad_input_becomes_one_error_line_and_a_bug_keeps_its_traceback():
    for error in (
        DataError("no token file x.bin"),
        FileNotFoundError("no checkpoint at y.pt"),
        ValueError("bad --key"),
    ):
        with pytest.raises(SystemExit) as e:
            with one_line_errors():
                raise error
        assert e.value.code == f"error: {error}"
    with pytest.raises(KeyError):
        with one_line_errors():
            {}["a bug"]


class FullDisk(io.FileIO):
    """A file on a disk with room for `room` more bytes: a write past it fails as the OS reports it."""

    def __init__(self, path, mode, room):
        super().__init__(path, mode)
        self.room = room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return super().write(b)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_file_and_keeps_the_earlier_one(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "ckpt.pt")
    save_atomic({"w": torch.ones(3)}, path)
    monkeypatch.setattr(common, "open", lambda p, mode: FullDisk(p, mode, room=1000), raising=False)
    with pytest.raises(SystemExit) as e:
        with one_line_errors():
            save_atomic({"w": torch.randn(10000)}, path)  # 40 kB: torch's zip writer hits the full disk
    assert e.value.code == f"error: could not write {path}: No space left on device; the earlier {path} is unchanged"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3)) and os.listdir(tmp_path) == ["ckpt.pt"]

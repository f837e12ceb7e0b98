"""The data path: sources -> internal text -> tokenizer -> token files -> batches."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tinystories
from conftest import ROOT, SHARED, first_stories
from tokenizer import Tokenizer

STORIES = first_stories(SHARED / "tinystories" / "train-000.txt", 12)


def write_all_formats(tmp_path, train, val):
    """The same stories in each layout the dataset is distributed in."""
    dirs = {f: tmp_path / f for f in ("txt", "json", "jsonl", "parquet")}
    for d in dirs.values():
        d.mkdir()
    for split, stories in (("train", train), ("valid", val)):
        (dirs["txt"] / f"TinyStoriesV2-GPT4-{split}.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
        (dirs["json"] / f"{split}00.json").write_text(json.dumps([{"story": s, "summary": "x"} for s in stories]))
        (dirs["jsonl"] / f"{split}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
        name = "validation" if split == "valid" else split
        pq.write_table(pa.table({"text": stories}), dirs["parquet"] / f"{name}-00000-of-00001.parquet")
    return dirs


def test_every_source_format_loads_the_same_stories_and_keeps_the_split(tmp_path):
    dirs = write_all_formats(tmp_path, STORIES[:8], STORIES[8:])
    for fmt, d in dirs.items():
        data = tinystories.load_local(d)
        assert data["train"] == STORIES[:8], fmt
        assert data["val"] == STORIES[8:], fmt


def test_unnamed_shards_make_the_first_one_validation_as_llama2c(tmp_path):
    for i, chunk in enumerate((STORIES[:3], STORIES[3:7], STORIES[7:])):
        (tmp_path / f"data{i:02d}.json").write_text(json.dumps([{"story": s} for s in chunk]))
    data = tinystories.load_local(tmp_path)
    assert data["val"] == STORIES[:3]
    assert data["train"] == STORIES[3:]


def test_download_writes_the_internal_form_with_both_splits(small_data):
    manifest = json.loads(open(os.path.join(small_data, "TinyStories", "manifest.json")).read())
    assert manifest["splits"]["train"]["stories"] == 300
    assert manifest["splits"]["val"]["stories"] == 80
    assert tinystories.load_text(small_data, "val")[0].startswith("Spot. Spot saw the shiny car")
    assert tinystories.load_text(small_data, "train")[0].startswith("One day, a little girl named Lily")


def test_trained_tokenizer_round_trips_every_story_exactly(small_data):
    tok = Tokenizer(tinystories.tokenizer_path(small_data, 512))
    assert tok.n_words == 512
    for split in ("train", "val"):
        for s in tinystories.load_text(small_data, split):
            assert tok.decode(tok.encode(s)) == s
    odd = "Two  spaces,\ttab, ünïcödé 😀 and 1234 digits\nnew line"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback and kept whitespace


def test_token_file_is_bos_then_story_for_every_story(small_data):
    tok = Tokenizer(tinystories.tokenizer_path(small_data, 512))
    for split in ("train", "val"):
        stories = tinystories.load_text(small_data, split)
        expected = np.concatenate([tok.encode(s, bos=True) for s in stories]).astype(np.uint16)
        tokens = np.fromfile(os.path.join(small_data, "tok512", f"{split}.bin"), dtype=np.uint16)
        assert len(tokens) == sum(len(tok.encode(s)) for s in stories)
        np.testing.assert_array_equal(tokens, expected)
        assert (tokens == tok.bos_id).sum() == len(stories)


def test_pretokenize_again_is_a_no_op_until_forced_or_the_tokenizer_changes(small_data):
    path = os.path.join(small_data, "tok512", "train.bin")
    before = os.stat(path).st_mtime_ns
    tinystories.pretokenize(512, small_data, quiet=True)
    assert os.stat(path).st_mtime_ns == before
    tinystories.pretokenize(512, small_data, force=True, quiet=True)
    assert os.stat(path).st_mtime_ns != before


def test_single_and_multi_process_pretokenize_write_the_same_bytes(small_data, tmp_path):
    one = tinystories.pretokenize(512, small_data, force=True, num_workers=1, quiet=True)
    a = open(os.path.join(small_data, "tok512", "val.bin"), "rb").read()
    two = tinystories.pretokenize(512, small_data, force=True, num_workers=2, quiet=True)
    assert a == open(os.path.join(small_data, "tok512", "val.bin"), "rb").read()
    assert one["val"] == two["val"]


def batches(small_data, **kw):
    args = dict(bin_path=os.path.join(small_data, "tok512", "train.bin"), batch_size=4, seq_len=32, seed=7)
    return tinystories.iter_batches(**{**args, **kw})


def test_batches_are_windows_of_the_data_with_y_shifted_by_one(small_data):
    data = np.fromfile(os.path.join(small_data, "tok512", "train.bin"), dtype=np.uint16).astype(np.int64)
    x, y = next(batches(small_data))
    assert x.shape == y.shape == (4, 32)
    assert str(x.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(data, 32)[:, 0] == row_x[0])
        assert any((data[i:i + 32] == row_x).all() and (data[i + 1:i + 33] == row_y).all() for i in start)


def test_batches_are_seeded_per_rank_and_resumable(small_data):
    a, b = batches(small_data, rank=0), batches(small_data, rank=0)
    first = [next(a)[0] for _ in range(3)]
    assert all((f == next(b)[0]).all() for f in first)
    other_rank = next(batches(small_data, rank=1))[0]
    assert not (other_rank == first[0]).all()
    resumed = next(batches(small_data, rank=0, start_step=2))[0]
    assert (resumed == first[2]).all()


def test_exported_tok512_equals_llama2c_export_byte_for_byte(tmp_path):
    out = Tokenizer(str(SHARED / "models" / "llama2c" / "tok512.model")).export(str(tmp_path / "tok512.bin"))
    assert open(out, "rb").read() == (SHARED / "models" / "llama2c" / "tok512.bin").read_bytes()


# -----------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, nothing half-written

def cli(*args, cwd):
    p = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), *args],
                       cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stderr.strip().splitlines()


def assert_one_line_error(rc, lines, *words):
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_source_directory(tmp_path):
    rc, err = cli("download", "--source=nowhere", cwd=tmp_path)
    assert_one_line_error(rc, err, "nowhere", "does not exist")
    assert not (tmp_path / "data").exists()


def test_empty_and_non_utf8_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("a story\n<|endoftext|>\n")
    (src / "valid.txt").write_text("")
    rc, err = cli("download", f"--source={src}", cwd=tmp_path)
    assert_one_line_error(rc, err, "valid.txt", "no stories")
    (src / "valid.txt").write_bytes(b"caf\xe9 story\n<|endoftext|>\n")
    rc, err = cli("download", f"--source={src}", cwd=tmp_path)
    assert_one_line_error(rc, err, "valid.txt", "UTF-8")
    assert not (tmp_path / "data" / "TinyStories").exists()


def test_vocab_size_the_data_cannot_support(small_data, tmp_path):
    rc, err = cli("train_vocab", "--vocab_size=32000", f"--data_dir={small_data}", cwd=tmp_path)
    assert_one_line_error(rc, err, "32000", "too large")
    assert not os.path.exists(os.path.join(small_data, "tok32000.model"))
    rc, err = cli("train_vocab", "--vocab_size=100", f"--data_dir={small_data}", cwd=tmp_path)
    assert_one_line_error(rc, err, "too small")


def test_pretokenize_before_download_or_train_vocab(small_data, tmp_path):
    rc, err = cli("pretokenize", "--vocab_size=1024", f"--data_dir={small_data}", cwd=tmp_path)
    assert_one_line_error(rc, err, "tok1024.model", "train_vocab --vocab_size=1024")
    assert not os.path.exists(os.path.join(small_data, "tok1024"))
    rc, err = cli("train_vocab", "--vocab_size=512", "--data_dir=empty", cwd=tmp_path)
    assert_one_line_error(rc, err, "download")


def test_tokenizer_cli_rejects_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    p = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), f"--tokenizer-model={tmp_path / 'bad.model'}"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.model'} is not a sentencepiece model"]
    assert not (tmp_path / "bad.bin").exists()

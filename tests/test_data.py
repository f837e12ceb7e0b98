"""The data path: sources -> internal text -> tokenizer -> token files -> batches."""

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SHARED, first_stories

import sources
import tinystories
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
        tinystories.download(tmp_path / f"data_{fmt}", d)
        assert tinystories.load_text(tmp_path / f"data_{fmt}", "train") == STORIES[:8], fmt
        assert tinystories.load_text(tmp_path / f"data_{fmt}", "val") == STORIES[8:], fmt


def test_unnamed_shards_make_the_first_one_validation_as_llama2c(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for i, chunk in enumerate((STORIES[:3], STORIES[3:7], STORIES[7:])):
        (source / f"data{i:02d}.json").write_text(json.dumps([{"story": s} for s in chunk]))
    tinystories.download(tmp_path / "data", source)
    assert tinystories.load_text(tmp_path / "data", "val") == STORIES[:3]
    assert tinystories.load_text(tmp_path / "data", "train") == STORIES[3:]


def files_of(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_download_in_small_chunks_writes_the_same_bytes_as_in_one(tmp_path, monkeypatch):
    # chunks of 1 byte cut every character, escape, story and line; 3 stories a file cut the chunks
    odd = 'Caf\u00e9 \U0001f600 "quoted" \\ back\r\nslash,\ttab  and  \u00fcn\u00efc\u00f6d\u00e9'
    dirs = write_all_formats(tmp_path, STORIES[:4] + [odd, "", "  "] + STORIES[4:8], STORIES[8:])
    monkeypatch.setattr(tinystories, "STORIES_PER_SHARD", 3)
    for fmt, d in dirs.items():
        for chunk_bytes in (1, 1000, 2**30):
            tinystories.download(tmp_path / f"{fmt}{chunk_bytes}", d, chunk_bytes=chunk_bytes)
        whole = files_of(tmp_path / f"{fmt}{2**30}")
        assert len(whole) == 6, fmt  # manifest, train-000..002, val-000..001
        assert files_of(tmp_path / f"{fmt}1") == whole, fmt
        assert files_of(tmp_path / f"{fmt}1000") == whole, fmt


def test_a_broken_json_array_is_an_error_wherever_the_chunks_fall(tmp_path):
    good = json.dumps([{"story": s} for s in STORIES[:3]])
    for bad, words in (
        (good[:-1], "ends inside the JSON array"),
        (good[:-30], "Unterminated string"),
        (good.replace('"story": ', '"story" ', 2), r"Expecting ':' delimiter \(character \d+\)"),
        (good.replace("}, {", "} {"), "expected ',' or ']' at character"),
        (good + " []", "expected the end of the file"),
    ):
        (tmp_path / "train.json").write_text(bad)
        for chunk_bytes in (1, 64, 2**20):
            with pytest.raises(tinystories.DataError, match=words):
                list(sources.read_file(tmp_path / "train.json", chunk_bytes))


def test_pretokenize_in_small_chunks_writes_the_same_bytes_as_in_one(small_data, tmp_path):
    shutil.copytree(os.path.join(small_data, "TinyStories"), tmp_path / "TinyStories")
    model = tinystories.tokenizer_path(small_data, 512)
    out = {}
    for chunk_bytes, workers in ((2**30, 1), (100, 1), (100, 2), (5000, 2)):
        tinystories.pretokenize(
            512, tmp_path, tokenizer=model, force=True, num_workers=workers, chunk_bytes=chunk_bytes, quiet=True
        )
        out[chunk_bytes, workers] = files_of(tmp_path / "tok512")
    whole = out[2**30, 1]
    assert set(whole) == {Path("train.bin"), Path("val.bin"), Path("meta.json")}
    assert all(o == whole for o in out.values())


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


def test_download_and_pretokenize_hold_a_bounded_amount_of_text(small_data, tmp_path):
    # 2.1 MB of text in chunks of 8 KB: neither step holds more than a third of it at once
    # (the Python heap, traced; before streaming, each held the whole text and more)
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(SHARED / "tinystories" / "train-000.txt", source)
    (source / "valid-000.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES))
    text_bytes = sum(p.stat().st_size for p in source.iterdir())
    tracemalloc.start()
    try:
        tinystories.download(tmp_path, source, chunk_bytes=2**13)
        download_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        meta = tinystories.pretokenize(
            512,
            tmp_path,
            tokenizer=tinystories.tokenizer_path(small_data, 512),
            num_workers=2,
            chunk_bytes=2**13,
            quiet=True,
        )
        pretokenize_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["train"]["text_bytes"] > 2_000_000
    assert download_peak < text_bytes / 3, download_peak
    assert pretokenize_peak < text_bytes / 3, pretokenize_peak


def test_the_hub_is_read_in_batches_into_the_same_internal_form(tmp_path, monkeypatch):
    import datasets

    train = STORIES[:4] + [" padded\r\nstory ", ""] + STORIES[4:8]
    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "validation": datasets.Dataset.from_dict({"text": STORIES[8:]}),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub)
    monkeypatch.setattr(tinystories, "SHARED_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("TINYSTORIES_DIR", raising=False)
    tinystories.download(tmp_path / "hub", chunk_bytes=1000)  # a few stories a batch
    tinystories.download(tmp_path / "local", write_all_formats(tmp_path, train, STORIES[8:])["parquet"])
    from_hub, local = files_of(tmp_path / "hub" / "TinyStories"), files_of(tmp_path / "local" / "TinyStories")
    manifest = json.loads(from_hub.pop(Path("manifest.json")))
    assert manifest["source"] == "hub:roneneldan/TinyStories"
    assert manifest["splits"] == json.loads(local.pop(Path("manifest.json")))["splits"]
    assert from_hub == local
    assert tinystories.load_text(tmp_path / "hub", "train")[4] == "padded\nstory"


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
        assert any((data[i : i + 32] == row_x).all() and (data[i + 1 : i + 33] == row_y).all() for i in start)


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
    p = subprocess.run([sys.executable, str(ROOT / "tinystories.py"), *args], cwd=cwd, capture_output=True, text=True)
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
    p = subprocess.run(
        [sys.executable, str(ROOT / "tokenizer.py"), f"--tokenizer-model={tmp_path / 'bad.model'}"],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.model'} is not a sentencepiece model"]
    assert not (tmp_path / "bad.bin").exists()

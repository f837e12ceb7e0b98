"""
TinyStories (Eldan & Li 2023): download, tokenizer training, pretokenization, batches.

    python tinystories.py download [--source=DIR]     # text -> data/TinyStories/
    python tinystories.py train_vocab --vocab_size=N  # -> data/tok{N}.model (+ .vocab, and .bin for ./run)
    python tinystories.py pretokenize --vocab_size=N  # -> data/tok{N}/{train,val}.bin
    python tinystories.py instruct --vocab_size=N     # -> data/tok{N}/instruct_* (instruct.py)

The internal form every source is normalised into: data/TinyStories/{train,val}-NNN.txt,
UTF-8, each story stripped and followed by a line `<|endoftext|>` (TinyStoriesV2's own
format), at most STORIES_PER_SHARD stories a file, plus manifest.json (source, counts,
sha256 of every shard). download and pretokenize read the text CHUNK_BYTES at a time
(--chunk_mb), so their memory stays flat however large the data; sources.py reads each of the
dataset's layouts.
"""

import collections
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import configurator
from common import DataError, atomic_open, one_line_errors
from sources import CHUNK_BYTES, HUB_DATASET, SEPARATOR, SPLITS, hub_chunks, local_files, read_files
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
config = dict(  # the command line's keys: which apply to which stage is said beside each
    data_dir="data",
    source="",  # download: a local copy of TinyStories (default: $TINYSTORIES_DIR, ../shared/tinystories, then the hub)
    vocab_size=(0, ">= 0"),  # train_vocab, pretokenize, instruct: the tokenizer's size; 0 = Llama 2's 32000
    tokenizer="",  # pretokenize: with this sentencepiece model instead of data/tok{vocab_size}.model
    num_workers=(0, ">= 0"),  # pretokenize: processes; 0 = one per core
    force=False,  # pretokenize even if up to date
    chunk_mb=(1.0, "> 0"),  # MiB of text download and pretokenize read at a time
    max_seq_len=(256, "> 8"),  # instruct: the context an example fits in
    headers_per_story=(4, "> 0"),  # instruct: training examples a story gives, each with other words
    seed=1337,  # instruct: the seed of the words a header names
)
STAGES = ("download", "train_vocab", "pretokenize", "instruct")

DATA_DIR = "data"
SHARED_DIR = Path(__file__).resolve().parent.parent / "shared" / "tinystories"
STORIES_PER_SHARD = 100_000
MAX_VOCAB_TRAIN_BYTES = 200 * 2**20  # train_vocab reads at most this much text (~10% of V1)


# -----------------------------------------------------------------------------
# download: any accepted source -> the internal form, a chunk of text at a time


def text_dir(data_dir):
    return os.path.join(data_dir, "TinyStories")


def write_text(chunks, data_dir, source, total_bytes=None):
    """Write the internal form from {split: iterable of (stories, bytes read)}, each file as
    it fills, into a fresh directory, then swap that in whole."""
    final = text_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=".TinyStories.")
    bar = tqdm(total=total_bytes, desc="download", unit="B", unit_scale=True, disable=None)  # None: on a terminal only
    try:
        manifest = {"source": source, "splits": {}}
        for split in SPLITS:
            n, shards = 0, {}
            for stories, nbytes in chunks[split]:
                while stories:  # those that still fit in the current file
                    room = STORIES_PER_SHARD - n % STORIES_PER_SHARD
                    name = f"{split}-{n // STORIES_PER_SHARD:03d}.txt"
                    blob = "".join(f"{s}\n{SEPARATOR}\n" for s in stories[:room]).encode()
                    with open(Path(tmp, name), "ab") as f:
                        f.write(blob)
                    shards.setdefault(name, hashlib.sha256()).update(blob)
                    n, stories = n + len(stories[:room]), stories[room:]
                bar.update(nbytes)
                bar.set_postfix_str(f"{split} {n:,} stories", refresh=False)
            if n == 0:
                raise DataError(f"no {split} stories in {source}")
            manifest["splits"][split] = {"stories": n, "shards": {k: h.hexdigest() for k, h in shards.items()}}
        Path(tmp, "manifest.json").write_text(json.dumps(manifest, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def download(data_dir=DATA_DIR, source=None, chunk_bytes=CHUNK_BYTES):
    source = source or os.environ.get("TINYSTORIES_DIR")
    if source is None and SHARED_DIR.is_dir():
        source = str(SHARED_DIR)
    if source:
        files = local_files(source)
        total = sum(os.path.getsize(f) for s in SPLITS for f in files[s])
        chunks = {s: read_files(files[s], chunk_bytes) for s in SPLITS}
    else:
        total, chunks = hub_chunks(chunk_bytes)
    manifest = write_text(chunks, data_dir, str(source) if source else f"hub:{HUB_DATASET}", total)
    counts = ", ".join(f"{s} {manifest['splits'][s]['stories']:,}" for s in SPLITS)
    print(f"wrote {text_dir(data_dir)} from {manifest['source']}: {counts} stories")
    return manifest


def text_files(data_dir, split):
    """The files of one split of the internal form, in order."""
    files = sorted(glob.glob(os.path.join(text_dir(data_dir), f"{split}-*.txt")))
    if not files:
        raise DataError(f"no TinyStories text in {text_dir(data_dir)}; run `python tinystories.py download` first")
    return files


def load_text(data_dir, split):
    """The stories of one split of the internal form, in order, as a list."""
    return [s for stories, _ in read_files(text_files(data_dir, split)) for s in stories]


def read_manifest(data_dir):
    path = os.path.join(text_dir(data_dir), "manifest.json")
    if not os.path.exists(path):
        raise DataError(f"no TinyStories text in {text_dir(data_dir)}; run `python tinystories.py download` first")
    return json.loads(Path(path).read_text())


# -----------------------------------------------------------------------------
# train_vocab: a sentencepiece BPE model on the training text


def tokenizer_path(data_dir, vocab_size):
    return os.path.join(data_dir, f"tok{vocab_size}.model")


def train_vocab(vocab_size, data_dir=DATA_DIR):
    import sentencepiece as spm

    if vocab_size < 260:  # 256 byte-fallback pieces + <unk>, <s>, </s> + at least one merge
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 pieces")
    stories = (s for chunk, _ in read_files(text_files(data_dir, "train")) for s in chunk)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        # one story after another, one paragraph a line, as sentencepiece reads lines
        corpus, size = os.path.join(tmp, "corpus.txt"), 0
        with open(corpus, "w", encoding="utf-8") as f:
            for s in stories:  # read a chunk at a time, and no further than needed
                if size > MAX_VOCAB_TRAIN_BYTES:
                    break
                f.write(s + "\n")
                size += len(s) + 1
        prefix = os.path.join(tmp, f"tok{vocab_size}")
        print(f"training a {vocab_size}-token BPE model on {size / 2**20:.1f} MB of text")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=prefix,
                model_type="bpe",
                vocab_size=vocab_size,
                input_format="text",
                character_coverage=1.0,
                num_threads=os.cpu_count(),
                split_digits=True,
                allow_whitespace_only_pieces=True,
                byte_fallback=True,
                unk_surface=r" \342\201\207 ",
                normalization_rule_name="identity",
                # llama2.c's settings, plus: keep runs of spaces, so decode(encode(s)) == s exactly
                remove_extra_whitespaces=False,
                minloglevel=2,
            )
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", reason)
            if m:
                reason = f"vocab_size {m[1]} is too large for this data (at most {m[2]})"
            m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", reason)
            if m:
                reason = (
                    f"vocab_size {m[1]} is too small for this data: its characters and the control pieces need {m[2]}"
                )
            raise DataError(f"sentencepiece training failed: {reason}") from None
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, os.path.join(data_dir, f"tok{vocab_size}{ext}"))
    path = tokenizer_path(data_dir, vocab_size)
    bin_path = Tokenizer(path).export()  # llama2.c's tokenizer .bin, for the C engine (./run -z)
    print(f"wrote {path} and {bin_path}")
    return path


# -----------------------------------------------------------------------------
# pretokenize: stories -> flat uint16 token files, BOS before every story

# set just before the worker processes fork, so they inherit it
_tokenizer = None
TASK_STORIES = 256  # stories a worker encodes at once: sentencepiece returns lists of Python ints


def _encode(task):
    """(tokens, stories, text bytes, file bytes) of a task (stories, file bytes)."""
    stories, nbytes = task
    # BOS before each story, no EOS: as in llama2.c, the next story's BOS marks the end
    ids = _tokenizer.sp_model.encode(stories, num_threads=1)  # the processes are the parallelism
    tokens = [np.empty(0, np.uint16)] + [np.array([_tokenizer.bos_id] + t, dtype=np.uint16) for t in ids]
    return np.concatenate(tokens), len(stories), sum(len(s.encode()) for s in stories), nbytes


def _in_order(pool, func, tasks, depth):
    """func over tasks on the pool's processes, results in order, at most `depth` in flight."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(func, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def resolve_tokenizer(data_dir, vocab_size, tokenizer=None):
    """The tokenizer model to use: --tokenizer=PATH, or data/tok{N}.model, or for
    vocab_size=0 the Llama 2 tokenizer (llama2.c's vocab_source=llama2)."""
    if tokenizer is None and vocab_size == 0:
        tokenizer = str(SHARED_DIR.parent / "models" / "llama2c" / "tokenizer.model")
    path = tokenizer or tokenizer_path(data_dir, vocab_size)
    if not os.path.isfile(path):
        hint = f"; run `python tinystories.py train_vocab --vocab_size={vocab_size}` first" if tokenizer is None else ""
        raise DataError(f"no tokenizer model at {path}{hint}")
    return path


def token_dir(data_dir, vocab_size):
    return os.path.join(data_dir, f"tok{vocab_size}")


def read_token_meta(data_dir, vocab_size):
    """What a model trained on data_dir's token files records of its tokenizer: the model's path, its
    sha256, vocab_size and bos_id (from the meta.json pretokenize wrote)."""
    path = os.path.join(token_dir(data_dir, vocab_size), "meta.json")
    if not os.path.exists(path):
        hint = 0 if vocab_size == 32000 else vocab_size
        raise DataError(
            f"no token files in {os.path.dirname(path)}; "
            f"run `python tinystories.py pretokenize --vocab_size={hint}` first"
        )
    meta = json.loads(Path(path).read_text())
    return {k: meta[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "bos_id")}


def pretokenize(
    vocab_size, data_dir=DATA_DIR, tokenizer=None, force=False, num_workers=None, quiet=False, chunk_bytes=CHUNK_BYTES
):
    """Encode both splits; returns the meta dict written beside the token files.
    Skips the work when the text and the tokenizer are unchanged since the last run."""
    model_path = resolve_tokenizer(data_dir, vocab_size, tokenizer)
    with open(model_path, "rb") as f:
        tok_sha = hashlib.sha256(f.read()).hexdigest()
    n_words = Tokenizer(model_path).n_words
    if vocab_size and n_words != vocab_size:
        raise DataError(f"{model_path} has {n_words} tokens, not --vocab_size={vocab_size}")
    if n_words > 65536:
        raise DataError(f"{model_path} has {n_words} tokens: too many for uint16 token files")
    manifest = read_manifest(data_dir)
    out_dir = token_dir(data_dir, n_words)
    meta_path = os.path.join(out_dir, "meta.json")
    key = {"tokenizer": model_path, "tokenizer_sha256": tok_sha, "text": manifest["splits"]}
    if not force and os.path.exists(meta_path):
        meta = json.loads(Path(meta_path).read_text())
        if all(meta.get(k) == v for k, v in key.items()) and all(
            os.path.exists(os.path.join(out_dir, f"{s}.bin")) for s in SPLITS
        ):
            if not quiet:
                print(f"{out_dir} is up to date (use --force to redo)")
            return meta
    os.makedirs(out_dir, exist_ok=True)
    global _tokenizer
    _tokenizer = Tokenizer(model_path)
    meta = dict(key, vocab_size=n_words, bos_id=_tokenizer.bos_id)
    num_workers = num_workers or os.cpu_count()
    if "fork" not in mp.get_all_start_methods():
        num_workers = 1
    with mp.get_context("fork").Pool(num_workers) if num_workers > 1 else nullcontext() as pool:
        for split in SPLITS:
            files = text_files(data_dir, split)
            # an empty chunk (a story longer than it) still makes a task, to count its bytes
            tasks = (
                (stories[i : i + TASK_STORIES], nbytes if i == 0 else 0)
                for stories, nbytes in read_files(files, chunk_bytes)
                for i in range(0, max(1, len(stories)), TASK_STORIES)
            )
            encoded = _in_order(pool, _encode, tasks, 2 * num_workers) if pool else map(_encode, tasks)
            n_stories, n_tokens, n_bytes = 0, 0, 0
            with (
                tqdm(
                    total=sum(map(os.path.getsize, files)),
                    desc=f"{split} tok{n_words}",
                    unit="B",
                    unit_scale=True,
                    disable=quiet or None,
                ) as bar,
                atomic_open(os.path.join(out_dir, f"{split}.bin")) as f,
            ):
                for tokens, stories, text_bytes, file_bytes in encoded:
                    f.write(tokens.tobytes())
                    n_stories, n_tokens, n_bytes = n_stories + stories, n_tokens + len(tokens), n_bytes + text_bytes
                    bar.update(file_bytes)
                    bar.set_postfix_str(f"{n_stories:,} stories", refresh=False)
            meta[split] = {
                "stories": n_stories,
                "tokens": n_tokens,
                "text_bytes": n_bytes,
                "tokens_per_story": round(n_tokens / n_stories, 1),
                "bytes_per_token": round(n_bytes / (n_tokens - n_stories), 3),
            }
    with atomic_open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        for s in SPLITS:
            m = meta[s]
            print(
                f"{out_dir}/{s}.bin: {m['tokens']:,} tokens, {m['tokens_per_story']} tokens/story, "
                f"{m['bytes_per_token']} bytes of text/token"
            )
    return meta


# -----------------------------------------------------------------------------
# instruct: stories behind headers of constraints that code can check (instruct.py)


def instruct(
    vocab_size, data_dir=DATA_DIR, max_seq_len=256, headers_per_story=4, seed=1337, quiet=False, chunk_bytes=CHUNK_BYTES
):
    """Write the instruction data beside the token files; returns its meta dict."""
    import instruct_data  # lemminflect's tables load only for this stage

    tok = Tokenizer(resolve_tokenizer(data_dir, vocab_size))
    if tok.n_words > 65536:
        raise DataError(f"{tok.model_path} has {tok.n_words} tokens: too many for uint16 token files")

    def stories(split, desc):  # one split's stories, a chunk at a time, with a bar over its bytes
        files = text_files(data_dir, split)
        with tqdm(
            total=sum(map(os.path.getsize, files)),
            desc=f"instruct: {desc}",
            unit="B",
            unit_scale=True,
            disable=quiet or None,
        ) as bar:
            for chunk, nbytes in read_files(files, chunk_bytes):
                yield from chunk
                bar.update(nbytes)

    return instruct_data.prepare(
        stories, tok, token_dir(data_dir, tok.n_words), max_seq_len, headers_per_story, seed, quiet
    )


# -----------------------------------------------------------------------------
# batches for training


def iter_batches(bin_path, batch_size, seq_len, device="cpu", seed=1337, rank=0, start_step=0):
    """Endless (x, y) int64 batches of random seq_len+1 windows of a token file, y = x
    shifted by one. Batch `step` of `rank` depends only on (seed, rank, step), so ranks see
    different data and a resumed run continues the very same stream from `start_step`."""
    if not os.path.exists(bin_path):
        raise DataError(f"no token file {bin_path}; run `python tinystories.py pretokenize` first")
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    if len(data) <= seq_len:
        raise DataError(f"{bin_path} has {len(data)} tokens, fewer than one window of {seq_len + 1}")
    window = np.arange(seq_len + 1)
    pin = str(device).startswith("cuda")
    step = start_step
    while True:
        rng = np.random.default_rng([seed, rank, step])
        starts = rng.integers(0, len(data) - seq_len, size=batch_size)
        chunk = torch.from_numpy(data[starts[:, None] + window].astype(np.int64))  # (B, T+1)
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        if pin:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        yield x, y
        step += 1


def iter_instruct_batches(bin_dir, split, batch_size, seq_len, device="cpu", seed=1337, rank=0, start_step=0):
    """Endless (x, y) batches of supervised fine-tuning examples (tinystories.py instruct): batch_size
    random examples of a split, each BOS + header + story + end, right-padded to the longest; y is x
    shifted by one with -1 (ignored by the loss) where it would predict a header token or padding, so
    that the loss counts the story's tokens only. Batch `step` of `rank` depends only on (seed, rank, step)."""
    import instruct_data

    data, starts, prompt_lens, lengths = instruct_data.read_examples(bin_dir, split, seq_len)
    pin = str(device).startswith("cuda")
    step = start_step
    while True:
        rng = np.random.default_rng([seed, rank, step])
        picks = rng.integers(0, len(starts), size=batch_size)
        T = int(lengths[picks].max()) - 1
        x = torch.zeros(batch_size, T, dtype=torch.long)
        y = torch.full((batch_size, T), -1, dtype=torch.long)
        for row, i in enumerate(picks):
            n = int(lengths[i])
            example = torch.from_numpy(data[starts[i] : starts[i] + n].astype(np.int64))
            x[row, : n - 1] = example[:-1]
            y[row, prompt_lens[i] - 1 : n - 1] = example[prompt_lens[i] :]
        if pin:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        yield x.to(device), y.to(device)
        step += 1


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    cfg, _ = configurator.configure({"stage": (None, " | ".join(STAGES)), **config}, positional=("stage",))
    chunk_bytes = max(1, int(cfg["chunk_mb"] * 2**20))
    with one_line_errors():
        if cfg["stage"] == "download":
            download(cfg["data_dir"], cfg["source"] or None, chunk_bytes)
        elif cfg["stage"] == "train_vocab":
            if cfg["vocab_size"] <= 0:
                raise DataError("train_vocab needs --vocab_size=N, e.g. 512 or 4096")
            train_vocab(cfg["vocab_size"], cfg["data_dir"])
        elif cfg["stage"] == "instruct":
            instruct(
                cfg["vocab_size"],
                cfg["data_dir"],
                cfg["max_seq_len"],
                cfg["headers_per_story"],
                cfg["seed"],
                chunk_bytes=chunk_bytes,
            )
        else:
            pretokenize(
                cfg["vocab_size"],
                cfg["data_dir"],
                cfg["tokenizer"] or None,
                cfg["force"],
                cfg["num_workers"] or None,
                chunk_bytes=chunk_bytes,
            )

"""
TinyStories (Eldan & Li 2023): download, tokenizer training, pretokenization, batches.

    python tinystories.py download [--source=DIR]     # text -> data/TinyStories/
    python tinystories.py train_vocab --vocab_size=N  # -> data/tok{N}.model (+ .vocab)
    python tinystories.py pretokenize --vocab_size=N  # -> data/tok{N}/{train,val}.bin

The internal form every source is normalised into: data/TinyStories/{train,val}-NNN.txt,
UTF-8, each story stripped and followed by a line `<|endoftext|>` (TinyStoriesV2's own
format), at most STORIES_PER_SHARD stories a file, plus manifest.json (source, counts,
sha256 of every shard).
"""
import argparse
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

from common import DataError, atomic_open, one_line_errors
from tokenizer import Tokenizer

DATA_DIR = "data"
SHARED_DIR = Path(__file__).resolve().parent.parent / "shared" / "tinystories"
HUB_DATASET = "roneneldan/TinyStories"
SEPARATOR = "<|endoftext|>"
STORIES_PER_SHARD = 100_000
MAX_VOCAB_TRAIN_BYTES = 200 * 2**20  # train_vocab reads at most this much text (~10% of V1)
SPLITS = ("train", "val")


# -----------------------------------------------------------------------------
# download: any accepted source -> the internal form

def split_of(path):
    """'train', 'val' or None from a file name, e.g. TinyStoriesV2-GPT4-valid.txt,
    validation-00000-of-00001.parquet, train-000.txt."""
    name = Path(path).name.lower()
    if re.search(r"valid|(?<![a-z])val(?![a-z])", name):
        return "val"
    if "train" in name:
        return "train"
    return None


def read_stories(path):
    """The stories of one file: .txt with <|endoftext|> separators, a .json list of
    {"story": ...} (V1 TinyStories_all_data), .jsonl, or .parquet (the hub's layout)."""
    suffix = Path(path).suffix
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            column = "text" if "text" in table.column_names else "story"
            texts = table.column(column).to_pylist()
        else:
            raw = Path(path).read_bytes().decode("utf-8")
            if suffix == ".txt":
                texts = raw.split(SEPARATOR)
            elif suffix == ".json":
                texts = [r.get("story", r.get("text")) for r in json.loads(raw)]
            else:  # .jsonl
                rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
                texts = [r.get("story", r.get("text")) for r in rows]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
        raise DataError(f"cannot read stories from {path}: {e}") from None
    stories = [t.replace("\r\n", "\n").strip() for t in texts if isinstance(t, str)]
    stories = [s for s in stories if s]
    if not stories:
        raise DataError(f"{path} holds no stories")
    return stories


def load_local(source):
    """{'train': [...], 'val': [...]} from a directory holding the dataset in one of its
    layouts. Files are assigned to splits by name; if no name says, the first file (in
    sorted order) is validation and the rest train, as llama2.c does with data00.json."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"source directory {source} does not exist")
    files = sorted(p for ext in ("txt", "json", "jsonl", "parquet") for p in source.rglob(f"*.{ext}"))
    if not files:
        raise DataError(f"no .txt, .json, .jsonl or .parquet files in {source}")
    splits = [split_of(f) for f in files]
    if all(s is None for s in splits):
        splits = ["val"] + ["train"] * (len(files) - 1)
    unknown = [f.name for f, s in zip(files, splits) if s is None]
    if unknown:
        raise DataError(f"cannot tell the split (train or valid) of {', '.join(unknown)} in {source}")
    data = {"train": [], "val": []}
    for f, s in zip(files, splits):
        data[s].extend(read_stories(f))
    for s in SPLITS:
        if not data[s]:
            raise DataError(f"no {s} stories in {source}")
    return data


def load_hub():
    """The full dataset from the Hugging Face hub, via the `datasets` library."""
    try:
        from datasets import load_dataset
        ds = load_dataset(HUB_DATASET)
        return {"train": ds["train"]["text"], "val": ds["validation"]["text"]}
    except Exception as e:
        raise DataError(f"could not get {HUB_DATASET} from the Hugging Face hub ({type(e).__name__}); "
                        f"point --source=DIR or TINYSTORIES_DIR at a local copy") from None


def text_dir(data_dir):
    return os.path.join(data_dir, "TinyStories")


def write_text(data, data_dir, source):
    """Write the internal form into a fresh directory, then swap it in whole."""
    final = text_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=".TinyStories.")
    try:
        manifest = {"source": source, "splits": {}}
        for split in SPLITS:
            stories, shards = [s.strip() for s in data[split]], {}
            for i in range(0, len(stories), STORIES_PER_SHARD):
                name = f"{split}-{i // STORIES_PER_SHARD:03d}.txt"
                blob = "".join(f"{s}\n{SEPARATOR}\n" for s in stories[i:i + STORIES_PER_SHARD]).encode()
                Path(tmp, name).write_bytes(blob)
                shards[name] = hashlib.sha256(blob).hexdigest()
            manifest["splits"][split] = {"stories": len(stories), "shards": shards}
        Path(tmp, "manifest.json").write_text(json.dumps(manifest, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def download(data_dir=DATA_DIR, source=None):
    source = source or os.environ.get("TINYSTORIES_DIR")
    if source is None and SHARED_DIR.is_dir():
        source = str(SHARED_DIR)
    data = load_local(source) if source else load_hub()
    manifest = write_text(data, data_dir, source or f"hub:{HUB_DATASET}")
    counts = ", ".join(f"{s} {manifest['splits'][s]['stories']:,}" for s in SPLITS)
    print(f"wrote {text_dir(data_dir)} from {manifest['source']}: {counts} stories")
    return manifest


def load_text(data_dir, split):
    """The stories of one split of the internal form, in order."""
    files = sorted(glob.glob(os.path.join(text_dir(data_dir), f"{split}-*.txt")))
    if not files:
        raise DataError(f"no TinyStories text in {text_dir(data_dir)}; run `python tinystories.py download` first")
    return [s for f in files for s in read_stories(f)]


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
    stories = load_text(data_dir, "train")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        # one story after another, one paragraph a line, as sentencepiece reads lines
        corpus, size = os.path.join(tmp, "corpus.txt"), 0
        with open(corpus, "w", encoding="utf-8") as f:
            for s in stories:
                if size > MAX_VOCAB_TRAIN_BYTES:
                    break
                f.write(s + "\n")
                size += len(s) + 1
        prefix = os.path.join(tmp, f"tok{vocab_size}")
        print(f"training a {vocab_size}-token BPE model on {size / 2**20:.1f} MB of text")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                input_format="text", character_coverage=1.0,
                num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                # llama2.c's settings, plus: keep runs of spaces, so decode(encode(s)) == s exactly
                remove_extra_whitespaces=False, minloglevel=2)
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", reason)
            if m:
                reason = f"vocab_size {m[1]} is too large for this data (at most {m[2]})"
            raise DataError(f"sentencepiece training failed: {reason}") from None
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, os.path.join(data_dir, f"tok{vocab_size}{ext}"))
    path = tokenizer_path(data_dir, vocab_size)
    print(f"wrote {path}")
    return path


# -----------------------------------------------------------------------------
# pretokenize: stories -> flat uint16 token files, BOS before every story

# set just before the worker processes fork, so they inherit them instead of receiving
# every story through a pipe
_tokenizer, _stories = None, None


def _encode_range(bounds):
    # BOS before each story, no EOS: as in llama2.c, the next story's BOS marks the end
    lo, hi = bounds
    ids = _tokenizer.sp_model.encode(_stories[lo:hi], num_threads=1)  # the processes are the parallelism
    return np.concatenate([np.array([_tokenizer.bos_id] + t, dtype=np.uint16) for t in ids])


def resolve_tokenizer(data_dir, vocab_size, tokenizer=None):
    """The tokenizer model to use: --tokenizer=PATH, or data/tok{N}.model, or for
    vocab_size=0 the Llama 2 tokenizer (llama2.c's vocab_source=llama2)."""
    if tokenizer is None and vocab_size == 0:
        tokenizer = str(SHARED_DIR.parent / "models" / "llama2c" / "tokenizer.model")
    path = tokenizer or tokenizer_path(data_dir, vocab_size)
    if not os.path.isfile(path):
        hint = (f"; run `python tinystories.py train_vocab --vocab_size={vocab_size}` first"
                if tokenizer is None else "")
        raise DataError(f"no tokenizer model at {path}{hint}")
    return path


def token_dir(data_dir, vocab_size):
    return os.path.join(data_dir, f"tok{vocab_size}")


def pretokenize(vocab_size, data_dir=DATA_DIR, tokenizer=None, force=False, num_workers=None, quiet=False):
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
                os.path.exists(os.path.join(out_dir, f"{s}.bin")) for s in SPLITS):
            if not quiet:
                print(f"{out_dir} is up to date (use --force to redo)")
            return meta
    os.makedirs(out_dir, exist_ok=True)
    global _tokenizer, _stories
    _tokenizer = Tokenizer(model_path)
    meta = dict(key, vocab_size=n_words, bos_id=_tokenizer.bos_id)
    num_workers = num_workers or os.cpu_count()
    if "fork" not in mp.get_all_start_methods():
        num_workers = 1
    for split in SPLITS:
        _stories = load_text(data_dir, split)
        ranges = [(i, min(i + 256, len(_stories))) for i in range(0, len(_stories), 256)]
        n_tokens, n_bytes = 0, sum(len(s.encode()) for s in _stories)
        bar = tqdm(total=len(_stories), desc=f"{split} tok{n_words}", unit="story", disable=quiet)
        with mp.get_context("fork").Pool(num_workers) if num_workers > 1 else nullcontext() as pool:
            encoded = pool.imap(_encode_range, ranges) if pool else map(_encode_range, ranges)
            with atomic_open(os.path.join(out_dir, f"{split}.bin")) as f:
                for (lo, hi), tokens in zip(ranges, encoded):
                    f.write(tokens.tobytes())
                    n_tokens += len(tokens)
                    bar.update(hi - lo)
        bar.close()
        meta[split] = {"stories": len(_stories), "tokens": n_tokens, "text_bytes": n_bytes,
                       "tokens_per_story": round(n_tokens / len(_stories), 1),
                       "bytes_per_token": round(n_bytes / (n_tokens - len(_stories)), 3)}
    _stories = None
    with atomic_open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        for s in SPLITS:
            m = meta[s]
            print(f"{out_dir}/{s}.bin: {m['tokens']:,} tokens, {m['tokens_per_story']} tokens/story, "
                  f"{m['bytes_per_token']} bytes of text/token")
    return meta


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


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("stage", choices=["download", "train_vocab", "pretokenize"])
    parser.add_argument("--vocab_size", type=int, default=0, help="tokenizer size; 0 = Llama 2's 32000 (pretokenize)")
    parser.add_argument("--source", type=str, default=None, help="local copy of TinyStories (default: $TINYSTORIES_DIR, ../shared/tinystories, then the hub)")
    parser.add_argument("--tokenizer", type=str, default=None, help="pretokenize with this sentencepiece model")
    parser.add_argument("--data_dir", type=str, default=DATA_DIR)
    parser.add_argument("--num_workers", type=int, default=None, help="processes for pretokenize (default: all cores)")
    parser.add_argument("--force", action="store_true", help="pretokenize even if up to date")
    args = parser.parse_args()
    with one_line_errors():
        if args.stage == "download":
            download(args.data_dir, args.source)
        elif args.stage == "train_vocab":
            if args.vocab_size <= 0:
                raise DataError("train_vocab needs --vocab_size=N, e.g. 512 or 4096")
            train_vocab(args.vocab_size, args.data_dir)
        else:
            pretokenize(args.vocab_size, args.data_dir, args.tokenizer, args.force, args.num_workers)

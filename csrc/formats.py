"""
Numpy readers and writers of the files the C engine reads: llama2.c's checkpoint versions 0, 1
and 2 (llama2.c export.py's legacy_export, version1_export, version2_export) and its tokenizer
.bin. Our export.py writes trained models through write_checkpoint; the engine's tests, its
benchmark and the fuzz seeds write random arrays.

    python -m csrc.formats fuzz-seeds out/fuzz   # small valid files for `make fuzz`

Weights are a dict with llama2.c's names, all layers stacked (`views` gives the same names as numpy
views into a version 1 or 2 file held in memory, for the engine's Model.from_weights):
token_embedding_table (vocab, dim), rms_att_weight (L, dim), wq (L, dim, dim),
wk and wv (L, kv_dim, dim), wo (L, dim, dim), rms_ffn_weight (L, dim), w1 and w3
(L, hidden, dim), w2 (L, dim, hidden), rms_final_weight (dim,), wcls (vocab, dim) or None when
the classifier is the embedding.
"""

import os
import struct
import sys
from collections import namedtuple

import numpy as np

MAGIC = 0x616B3432  # "ak42"
Config = namedtuple("Config", "dim hidden_dim n_layers n_heads n_kv_heads vocab_size seq_len")
MATRICES = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def shapes(c):
    """The shape of every weight of config c."""
    kv_dim = c.dim * c.n_kv_heads // c.n_heads
    L = c.n_layers
    return {
        "token_embedding_table": (c.vocab_size, c.dim),
        "rms_att_weight": (L, c.dim),
        "wq": (L, c.dim, c.dim),
        "wk": (L, kv_dim, c.dim),
        "wv": (L, kv_dim, c.dim),
        "wo": (L, c.dim, c.dim),
        "rms_ffn_weight": (L, c.dim),
        "w1": (L, c.hidden_dim, c.dim),
        "w2": (L, c.dim, c.hidden_dim),
        "w3": (L, c.hidden_dim, c.dim),
        "rms_final_weight": (c.dim,),
        "wcls": (c.vocab_size, c.dim),
    }


def random_weights(c, shared=True, seed=0, std=0.02):
    """Random weights of config c: matrices normal with `std` (0.02 as at initialisation),
    norms near 1."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in shapes(c).items():
        if name.startswith("rms"):
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    if shared:
        w["wcls"] = None
    return w


# the tensors of a version 0 (legacy) file, in order: llama2.c's legacy_export
LEGACY_ORDER = (
    "token_embedding_table",
    "rms_att_weight",
    "wq",
    "wk",
    "wv",
    "wo",
    "rms_ffn_weight",
    "w1",
    "w2",
    "w3",
    "rms_final_weight",
)


def read_v0(path):
    """(config, weights) of a legacy version-0 checkpoint such as stories260K.bin."""
    data = open(path, "rb").read()
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("7i", data[:28])
    shared = vocab_size > 0
    c = Config(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len)
    floats = np.frombuffer(data, dtype=np.float32, offset=28)
    order = LEGACY_ORDER
    w, at = {}, 0
    for name in order:
        shape = shapes(c)[name]
        n = int(np.prod(shape))
        w[name] = floats[at : at + n].reshape(shape)
        at += n
    at += seq_len * (dim // n_heads)  # freq_cis_real, freq_cis_imag
    w["wcls"] = None if shared else floats[at:].reshape(c.vocab_size, dim)
    return c, w


def quantize_q80(w, group_size):
    """export.py's Q8_0: symmetric int8 in [-127, 127] per group, w ~= q * scale."""
    w = np.asarray(w, dtype=np.float32).reshape(-1, group_size)
    scale = np.abs(w).max(axis=1) / np.float32(127.0)
    safe = np.where(scale > 0, scale, np.float32(1.0))  # an all-zero group quantises to zeros
    q = np.round(w / safe[:, None]).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32)


def dequantize_q80(q, scale, shape):
    group_size = q.size // scale.size
    return (q.reshape(-1, group_size).astype(np.float32) * scale[:, None]).reshape(shape)


def header(c, version, shared, group_size=None):
    h = struct.pack("Ii", MAGIC, version) + struct.pack("7i", *c) + struct.pack("B", int(shared))
    if group_size is not None:
        h += struct.pack("i", group_size)
    return h + b"\0" * (256 - len(h))


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def write_checkpoint(path, c, w, version, group_size=64):
    """Writes weights w of config c in llama2.c's version 0, 1 or 2 layout, a tensor at a time."""
    if version not in (0, 1, 2):
        raise ValueError(f"unknown version {version}")
    if version == 2 and (c.dim % group_size or c.hidden_dim % group_size):
        raise ValueError(f"group_size {group_size} must divide dim {c.dim} and hidden_dim {c.hidden_dim}")
    with open(path, "wb") as f:
        for part in _checkpoint_parts(c, w, version, group_size):
            f.write(part)


def _checkpoint_parts(c, w, version, group_size):
    shared = w["wcls"] is None
    if version == 0:
        vocab = c.vocab_size if shared else -c.vocab_size
        yield struct.pack("7i", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab, c.seq_len)
        for name in LEGACY_ORDER:
            yield _f32(w[name])
        head_size = c.dim // c.n_heads
        freqs = 1.0 / (10000.0 ** (np.arange(0, head_size, 2) / head_size))
        angles = np.outer(np.arange(c.seq_len), freqs)
        yield _f32(np.cos(angles))  # freq_cis_real and _imag, which the engine skips
        yield _f32(np.sin(angles))
        if not shared:
            yield _f32(w["wcls"])
    elif version == 1:
        yield header(c, 1, shared)
        for name in ["rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table", *MATRICES]:
            yield _f32(w[name])
        if not shared:
            yield _f32(w["wcls"])
    else:
        yield header(c, 2, shared, group_size)
        for name in ["rms_att_weight", "rms_ffn_weight", "rms_final_weight"]:
            yield _f32(w[name])
        # each matrix of each layer on its own: its int8 values, then its scales
        matrices = [w["token_embedding_table"]] + [w[name][l] for name in MATRICES for l in range(c.n_layers)]
        for m in matrices + ([] if shared else [w["wcls"]]):
            q, s = quantize_q80(m, group_size)
            yield q.tobytes()
            yield s.tobytes()


HEADER_SIZE = 256  # versions 1 and 2


def views(buf, c, version, shared, group_size=64):
    """Numpy views, by name, of the weights in buf (a uint8 array holding a version 1 or 2 file of
    config c, header included), walking the layout _checkpoint_parts writes; and the file's size,
    which buf must have (buf None: the size, and no views). Version 1: fp32 arrays of shapes(c).
    Version 2: the norms fp32, each matrix a pair (int8 values, fp32 scales) of shapes
    (..., rows, cols) and (..., rows, cols // group_size), a layer's values and scales side by side
    in the file. wcls is absent when shared."""
    at, out = HEADER_SIZE, {}

    def take(dtype, shape, offset, strides=None):
        return (
            np.ndarray(shape, dtype=dtype, buffer=buf.data, offset=offset, strides=strides) if buf is not None else None
        )

    names = ["rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table", *MATRICES]
    names += [] if shared else ["wcls"]
    for name in names:
        shape = shapes(c)[name]
        if version == 1 or name.startswith("rms"):
            out[name] = take(np.float32, shape, at)
            at += 4 * int(np.prod(shape))
            continue
        rows, cols = shape[-2:]
        layers = shape[0] if len(shape) == 3 else None
        values, scales = rows * cols, 4 * rows * cols // group_size
        step = values + scales  # one layer's values and scales
        lead, strides = ((layers,), (step,)) if layers else ((), ())
        out[name] = (
            take(np.int8, (*lead, rows, cols), at, (*strides, cols, 1)),
            take(np.float32, (*lead, rows, cols // group_size), at + values, (*strides, 4 * cols // group_size, 4)),
        )
        at += step * (layers or 1)
    return out, at


def write_tokenizer(path, pieces, scores):
    """llama2.c's tokenizer .bin: int32 max_token_length, then per token: float32 score,
    int32 length, the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("fi", s, len(p)) + p)


def synthetic_tokenizer(vocab_size):
    """(pieces, scores) of a made-up vocabulary in llama2.c's layout: <unk>, <s>, </s>, the
    256 byte tokens, then words " a", " b", ..., " ba", ... as many as fit."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    scores = [0.0] * len(pieces)
    for i in range(vocab_size - len(pieces)):
        word = b""
        while True:
            word = bytes([97 + i % 26]) + word
            i //= 26
            if i == 0:
                break
        pieces.append(b" " + word)
        scores.append(-float(len(pieces)))
    return pieces[:vocab_size], scores[:vocab_size]


def fuzz_seeds(out_dir):
    """Small valid inputs for the fuzzers in tests/c/fuzz_*.c."""
    os.makedirs(f"{out_dir}/checkpoint", exist_ok=True)
    os.makedirs(f"{out_dir}/tokenizer", exist_ok=True)
    c = Config(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, seq_len=4)
    for version, shared, gs in [(0, True, 0), (0, False, 0), (1, True, 0), (1, False, 0), (2, True, 4), (2, False, 8)]:
        w = random_weights(c, shared=shared, seed=version)
        write_checkpoint(f"{out_dir}/checkpoint/v{version}_{int(shared)}_{gs}.bin", c, w, version, gs)
    # the tokenizer fuzzer reads a uint16 vocab_size, then the tokenizer file
    for vocab_size in [3, 260, 300]:
        path = f"{out_dir}/tokenizer/synthetic{vocab_size}.bin"
        write_tokenizer(path, *synthetic_tokenizer(vocab_size))
        data = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<H", vocab_size) + data)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "fuzz-seeds":
        sys.exit("usage: python -m csrc.formats fuzz-seeds DIR")
    fuzz_seeds(sys.argv[2])

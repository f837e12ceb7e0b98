"""
The C engine from Python: cffi in ABI mode over csrc/libengine.so, which `make lib` builds
(importing this module builds nothing; a missing library is a one-line error naming the command).

    from csrc import engine
    model = engine.Model("stories260K.bin")                   # kv_cache="f16": run's -k f16
    tokenizer = engine.Tokenizer("tok512.bin", model.config.vocab_size)
    logits = model.forward(token=1, pos=0)                    # numpy (vocab_size,)
    ids = engine.generate(model, tokenizer, steps=64, temperature=0.0, text="Once upon a time")
    print(tokenizer.decode(ids))

Model and Tokenizer take lib=engine.load(path) to use another build of the library, such as
the one of another kernel path (tests/test_kernels.py). Every error of the engine (a bad file, an
id out of range) raises ValueError with its one-line message.
"""
import glob
import os
import re
import sys

import numpy as np
from cffi import FFI

from csrc.formats import Config

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_PATH = os.path.join(HERE, "libengine.so")
HEADERS = ["checkpoint.h", "matmul.h", "sampler.h", "tokenizer.h", "transformer.h"]
# the library's sources: every C file and header in csrc/ (the Makefile's ENGINE_SRC and ENGINE_HDR)
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.[ch]")))
ERR_LEN = int(re.search(r"#define ERR_LEN (\d+)", open(os.path.join(HERE, "error.h")).read()).group(1))


def declarations(headers):
    """The C declarations of csrc's headers, read from the headers themselves so they cannot
    drift: everything but the preprocessor lines."""
    text = [f"#define ERR_LEN {ERR_LEN}"]
    for h in headers:
        text += [line for line in open(os.path.join(HERE, h)) if not line.startswith("#")]
    return "".join(text)


def dlopen(ffi, path, sources):
    """ffi.dlopen(path), or FileNotFoundError saying to run `make lib`; a note on stderr when
    the library in csrc/ is older than one of its sources (names in csrc/)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.path.relpath(path)} is missing: build it with `make lib`")
    newest = max(os.path.getmtime(os.path.join(HERE, name)) for name in sources)
    if os.path.dirname(os.path.abspath(path)) == HERE and os.path.getmtime(path) < newest:
        print(f"note: {os.path.relpath(path)} is older than its sources: `make lib` rebuilds it", file=sys.stderr)
    return ffi.dlopen(path)


ffi = FFI()
ffi.cdef(declarations(HEADERS))
_libs = {}


def load(path=LIB_PATH):
    """The engine library at path, opened once."""
    path = os.path.abspath(path)
    if path not in _libs:
        _libs[path] = dlopen(ffi, path, SOURCES)
    return _libs[path]


def kernels(lib=None):
    """The name of the kernels the library was built with: avx512-vnni, avx2, neon, portable, ..."""
    return ffi.string((lib or load()).matmul_kernels()).decode()


def _error():
    return ffi.new("char[]", ERR_LEN)


def _message(err):
    return ffi.string(err).decode("utf-8", errors="replace")


KV_TYPES = {"f32": "KV_F32", "f16": "KV_F16"}


class Model:
    """A checkpoint (llama2.c version 0, 1 or 2) with its KV cache, fp32 or (kv_cache="f16") fp16."""

    def __init__(self, path, lib=None, kv_cache="f32"):
        self.lib = lib = lib or load()
        if kv_cache not in KV_TYPES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_TYPES)}, got {kv_cache!r}")
        t = ffi.new("Transformer *")
        err = _error()
        if lib.transformer_open(t, os.fsencode(path), getattr(lib, KV_TYPES[kv_cache]), err) != 0:
            raise ValueError(_message(err))
        self._t = ffi.gc(t, lib.transformer_close)
        c = t.ckpt.config
        self.config = Config(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
        self.version = t.ckpt.version
        self.group_size = t.ckpt.group_size  # 0 unless Q8_0

    def forward(self, token, pos):
        """Logits (vocab_size,) for `token` at `pos`; positions 0..pos-1 must have been run."""
        logits = self.lib.transformer_forward(self._t, token, pos)
        if logits == ffi.NULL:
            raise ValueError(f"token {token} or position {pos} out of range "
                             f"(vocab_size {self.config.vocab_size}, seq_len {self.config.seq_len})")
        return np.frombuffer(ffi.buffer(logits, 4 * self.config.vocab_size), dtype=np.float32).copy()

    def reset(self):
        """Zeroes the KV cache."""
        self.lib.transformer_reset(self._t)

    def kv_cache(self):
        """Copies of the key and value caches as float32, (n_layers, seq_len, kv_dim) each: row pos
        of a layer holds what forward(token, pos) wrote. (The engine keeps each kv head's positions
        together.)"""
        c = self.config
        head_size = c.dim // c.n_heads
        shape = (c.n_layers, c.n_kv_heads, c.seq_len, head_size)
        s = self._t.state
        dtype = np.float16 if s.kv_type == self.lib.KV_F16 else np.float32
        size = dtype().itemsize * int(np.prod(shape))
        return tuple(np.frombuffer(ffi.buffer(p, size), dtype=dtype).astype(np.float32).reshape(shape)
                     .transpose(0, 2, 1, 3).reshape(c.n_layers, c.seq_len, -1).copy()
                     for p in (s.key_cache, s.value_cache))


class Tokenizer:
    """llama2.c's BPE tokenizer from its .bin file, which must hold vocab_size tokens."""

    def __init__(self, path, vocab_size, lib=None):
        self.lib = lib = lib or load()
        t = ffi.new("Tokenizer *")
        err = _error()
        if lib.tokenizer_open(t, os.fsencode(path), vocab_size, err) != 0:
            raise ValueError(_message(err))
        self._t = ffi.gc(t, lib.tokenizer_free)
        self.vocab_size = vocab_size

    def encode(self, text, bos=True, eos=False):
        data = text.encode("utf-8")
        tokens = ffi.new("int[]", len(data) + 3)
        err = _error()
        n = self.lib.tokenizer_encode(self._t, data, len(data), bos, eos, tokens, err)
        if n < 0:
            raise ValueError(_message(err))
        return list(tokens[0:n])

    def decode(self, ids):
        """The text of ids as if they followed BOS (so a leading space is dropped, as by
        sentencepiece); BOS and EOS decode to nothing."""
        pieces, prev, n = [], 1, ffi.new("size_t *")
        for token in ids:
            piece = self.lib.tokenizer_decode(self._t, prev, token, n)
            if piece == ffi.NULL:
                raise ValueError(f"token {token} out of range [0, {self.vocab_size})")
            pieces.append(ffi.unpack(piece, n[0]))
            prev = token
        return b"".join(pieces).decode("utf-8", errors="replace")


def generate(model, prompt, steps=256, temperature=1.0, topp=0.9, seed=42, text=""):
    """llama2.c's generation loop in C: `prompt` is a list of ids, or a Tokenizer that encodes
    `text` after BOS. Runs until `steps` positions (0 = seq_len) or the model emits BOS, and
    returns the whole sequence of ids, prompt first."""
    ids = prompt.encode(text, bos=True) if isinstance(prompt, Tokenizer) else [int(i) for i in prompt]
    lib = model.lib
    sampler = ffi.new("Sampler *")
    err = _error()
    if lib.sampler_init(sampler, model.config.vocab_size, temperature, topp, seed, err) != 0:
        raise ValueError(_message(err))
    sampler = ffi.gc(sampler, lib.sampler_free)
    out = ffi.new("int[]", model.config.seq_len + 1)
    n = lib.transformer_generate(model._t, sampler, ids, len(ids), steps, out, ffi.NULL, ffi.NULL, err)
    if n < 0:
        raise ValueError(_message(err))
    return list(out[0:n])

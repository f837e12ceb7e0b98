"""
The C engine from Python: cffi in ABI mode over csrc/libengine.so, which `make lib` builds
(importing this module builds nothing; a missing library is a one-line error naming the command).

    from csrc import engine
    model = engine.Model("stories260K.bin")                   # kv_cache="f16": run's -k f16
    tokenizer = engine.Tokenizer("tok512.bin", model.config.vocab_size)
    logits = model.forward(token=1, pos=0)                    # numpy (vocab_size,)
    ids = engine.generate(model, tokenizer, steps=64, temperature=0.0, text="Once upon a time")
    print(tokenizer.decode(ids))

Batches, as the RL loop runs them (csrc/batch.h): many sequences decoded together, each with its own
position, KV cache, seed and stop, and many sequences scored together (prefill, no sampling):

    tokens, logprobs = model.generate([[1], [1, 403]], max_new_tokens=100, temperature=1.0,
                                      seeds=[7, 8], stop_tokens=[1, 2])   # lists of B lists
    logp = model.score(padded, lengths, starts, temperature=1.0)          # numpy (B, T)

A model can live in memory rather than in a file: Model.from_weights(config, weights) lays out
llama2.c's version 1 (fp32) or 2 (Q8_0) file in a numpy buffer it owns, and model.update(weights)
overwrites its weights in place (the RL loop's policy, every iteration); model.views holds numpy views
into that buffer by name. Weights are csrc/formats.py's dict of numpy arrays (export.llama2c_weights).

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

from csrc import formats
from csrc.formats import Config

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_PATH = os.path.join(HERE, "libengine.so")
HEADERS = ["checkpoint.h", "matmul.h", "sampler.h", "tokenizer.h", "transformer.h", "batch.h"]
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
# rows a forward takes at once when generate() and score() run many sequences (a scoring chunk): each
# thread's share fills the packed fp32 kernels' 6 columns several times over
BATCH_ROWS = 64


def _kv_type(lib, kv_cache):
    if kv_cache not in KV_TYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_TYPES)}, got {kv_cache!r}")
    return getattr(lib, KV_TYPES[kv_cache])


def _array(values, dtype, what, shape=None):
    """values as a C-contiguous numpy array of dtype (shape checked when given), or a one-line ValueError."""
    try:
        a = np.ascontiguousarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{what}: {e}") from None
    if shape is not None and a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, expected {shape}")
    return a


def _ptr(ctype, a):
    return ffi.from_buffer(f"{ctype}[]", a) if a.size else ffi.NULL


class Model:
    """A checkpoint (llama2.c version 0, 1 or 2) with its KV cache, fp32 or (kv_cache="f16") fp16.
    generate() and score() run batches, each sequence with a KV cache of its own (the model makes
    room for the largest batch it has seen, and packs fp32 weights for batched products: forward() then
    runs on them too, within float rounding of a fresh model's)."""

    def __init__(self, path, lib=None, kv_cache="f32"):
        self.lib = lib = lib or load()
        t = ffi.new("Transformer *")
        err = _error()
        if lib.transformer_open(t, os.fsencode(path), _kv_type(lib, kv_cache), err) != 0:
            raise ValueError(_message(err))
        self._setup(t)

    def _setup(self, t):
        self._t = ffi.gc(t, self.lib.transformer_close)
        c = t.ckpt.config
        self.config = Config(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
        self.version = t.ckpt.version
        self.group_size = t.ckpt.group_size  # 0 unless Q8_0

    @classmethod
    def from_weights(cls, config, weights, version=1, group_size=64, lib=None, kv_cache="f32"):
        """A model whose weights live in a numpy buffer it owns, laid out as llama2.c's version 1
        (fp32) or 2 (Q8_0, groups of group_size) file: no file is written. config: formats.Config;
        weights: formats' dict (wcls None for a classifier shared with the embedding)."""
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (fp32) or 2 (Q8_0), got {version}")
        config = Config(*config)
        shared = weights.get("wcls") is None
        _, size = formats.views(None, config, version, shared, group_size)
        buffer = np.zeros(size, dtype=np.uint8)
        buffer[: formats.HEADER_SIZE] = np.frombuffer(
            formats.header(config, version, shared, group_size if version == 2 else None), dtype=np.uint8
        )
        model = cls.__new__(cls)
        model.lib = lib = lib or load()
        model._buffer, model._shared = buffer, shared
        model.views, _ = formats.views(buffer, config, version, shared, group_size)
        t = ffi.new("Transformer *")
        err = _error()
        # parsing checks the header (a group size that does not divide dim, say) before any weight is copied
        if lib.checkpoint_parse(ffi.addressof(t[0], "ckpt"), ffi.from_buffer(buffer), size, b"weights", err) != 0:
            raise ValueError(_message(err))
        if lib.transformer_init(t, b"weights", _kv_type(lib, kv_cache), err) != 0:
            lib.checkpoint_close(ffi.addressof(t[0], "ckpt"))
            raise ValueError(_message(err))
        model._setup(t)
        model.update(weights)
        return model

    def update(self, weights):
        """Overwrites the weights named in `weights` (formats' names, any subset) in place: copied
        (version 1) or quantised to Q8_0 as export.py does (version 2). For models of from_weights."""
        if not hasattr(self, "views"):
            raise ValueError("update: this model's weights are a file's (use Model.from_weights)")
        full = formats.shapes(self.config)
        for name, value in weights.items():
            if name == "wcls" and value is None and self._shared:
                continue
            if name not in self.views:
                raise ValueError(
                    f"update: no weight {name!r} in this model"
                    + (" (its classifier is the embedding)" if name == "wcls" else "")
                )
            value = np.asarray(value, dtype=np.float32)
            if value.shape != full[name]:
                raise ValueError(f"update: {name} has shape {value.shape}, expected {full[name]}")
            view = self.views[name]
            if isinstance(view, np.ndarray):  # fp32
                np.copyto(view, value)
                continue
            values, scales = view
            for l, m in enumerate(value if value.ndim == 3 else [value]):
                q, s = formats.quantize_q80(m, self.group_size)
                (values[l] if value.ndim == 3 else values)[...] = q.reshape(m.shape)
                (scales[l] if value.ndim == 3 else scales)[...] = s.reshape(m.shape[0], -1)
        err = _error()
        if (
            self._t.panels != ffi.NULL and self.lib.transformer_pack(self._t, err) != 0
        ):  # batches' copy of the fp32 weights
            raise ValueError(_message(err))

    def _reserve(self, n_seqs):
        err = _error()
        if self.lib.transformer_reserve(self._t, n_seqs, max(n_seqs, BATCH_ROWS), err) != 0:
            raise ValueError(_message(err))

    def generate(self, prompts, max_new_tokens, temperature=1.0, seeds=None, stop_tokens=(), group=0, hidden=False):
        """Samples up to max_new_tokens after each prompt (a list of id lists, lengths may differ), all
        in one batch, as model.py's Transformer.generate does but with llama2.c's sampler: greedy at
        temperature 0, else one xorshift stream per sequence seeded with seeds[b] (nonzero; default
        1, 2, ..., B), so a sequence's tokens do not depend on the others in the batch. A sequence stops
        after a stop token (included) or max_new_tokens. group: sequences decoded together, one group after
        another (0: the engine's choice, csrc/batch.h); the results do not depend on it. Returns the new
        tokens (B lists) and their log-probabilities under softmax(logits / temperature) (B lists; 0 at
        temperature 0); with hidden, also the final normalised hidden state each token was sampled from
        (B arrays (n_b, dim): a value head's input, as score(hidden=True) gives it)."""
        try:
            prompts = [[int(t) for t in p] for p in prompts]
        except (TypeError, ValueError) as e:
            raise ValueError(f"prompts must be lists of token ids: {e}") from None
        B = len(prompts)
        seeds = np.arange(1, B + 1) if seeds is None else seeds
        seeds = _array(seeds, np.uint64, "seeds", (B,)) if np.all(np.asarray(seeds) >= 0) else None
        if seeds is None:
            raise ValueError("seeds must be nonnegative integers")
        stop = _array(list(stop_tokens), np.int32, "stop_tokens")
        lens = np.array([len(p) for p in prompts], dtype=np.int32)
        flat = _array([t for p in prompts for t in p], np.int32, "prompts")
        max_new_tokens = int(max_new_tokens)
        tokens = np.zeros((B, max(max_new_tokens, 0)), dtype=np.int32)
        logprobs = np.zeros(tokens.shape, dtype=np.float32)
        states = np.zeros((*tokens.shape, self.config.dim), dtype=np.float32) if hidden else None
        counts = np.zeros(B, dtype=np.int32)
        if B > 0:
            self._reserve(B)
        err = _error()
        if (
            self.lib.transformer_generate_batch(
                self._t,
                _ptr("int", flat),
                _ptr("int", lens),
                B,
                max_new_tokens,
                float(temperature),
                _ptr("unsigned long long", seeds),
                _ptr("int", stop),
                len(stop),
                int(group),
                _ptr("int", tokens),
                _ptr("float", logprobs),
                _ptr("float", states) if hidden else ffi.NULL,
                _ptr("int", counts),
                err,
            )
            != 0
        ):
            raise ValueError(_message(err))
        out = (
            [tokens[b, :n].tolist() for b, n in enumerate(counts)],
            [logprobs[b, :n].tolist() for b, n in enumerate(counts)],
        )
        return (*out, [states[b, :n] for b, n in enumerate(counts)]) if hidden else out

    def score(self, tokens, lengths, starts, temperature=1.0, hidden=False):
        """log p(tokens[b, t] | tokens[b, :t]) under softmax(logits / temperature) for t in
        [starts[b], lengths[b]), all positions of all sequences through the forward at once: tokens
        (B, T) ids padded on the right, lengths and starts (B,) (or one int for all). Returns logprobs
        (B, T), 0 outside those positions; with hidden, also the final normalised hidden states (B, T,
        dim), hidden[b, t] being the one that predicts tokens[b, t] (a value head's input for token t)."""
        tokens = _array(tokens, np.int32, "tokens")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tokens.shape}")
        B, T = tokens.shape
        lengths = _array(
            np.broadcast_to(lengths, (B,)) if np.ndim(lengths) == 0 else lengths, np.int32, "lengths", (B,)
        )
        starts = _array(np.broadcast_to(starts, (B,)) if np.ndim(starts) == 0 else starts, np.int32, "starts", (B,))
        logprobs = np.zeros((B, T), dtype=np.float32)
        states = np.zeros((B, T, self.config.dim), dtype=np.float32) if hidden else None
        if B > 0:
            self._reserve(B)
        err = _error()
        if (
            self.lib.transformer_score_batch(
                self._t,
                _ptr("int", tokens),
                B,
                T,
                _ptr("int", lengths),
                _ptr("int", starts),
                float(temperature),
                _ptr("float", logprobs),
                _ptr("float", states) if hidden else ffi.NULL,
                err,
            )
            != 0
        ):
            raise ValueError(_message(err))
        return (logprobs, states) if hidden else logprobs

    def forward(self, token, pos):
        """Logits (vocab_size,) for `token` at `pos`; positions 0..pos-1 must have been run."""
        logits = self.lib.transformer_forward(self._t, token, pos)
        if logits == ffi.NULL:
            raise ValueError(
                f"token {token} or position {pos} out of range "
                f"(vocab_size {self.config.vocab_size}, seq_len {self.config.seq_len})"
            )
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
        return tuple(
            np.frombuffer(ffi.buffer(p, size), dtype=dtype)
            .astype(np.float32)
            .reshape(shape)
            .transpose(0, 2, 1, 3)
            .reshape(c.n_layers, c.seq_len, -1)
            .copy()
            for p in (s.key_cache, s.value_cache)
        )


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

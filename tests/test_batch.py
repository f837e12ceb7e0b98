"""The C engine's batches (csrc/batch.h) through engine.py: many sequences decoded together, each with
its own prompt length, position, KV cache, seed and stop, and many sequences scored together; the
weights in a Python-owned buffer (Model.from_weights, update). Against the single-sequence forward
(bit for bit: a row's products are computed the same way whatever the batch), the float64 numpy
Reference of test_engine.py, and PyTorch's model.py (scoring, greedy generation)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_engine import STORIES260K, Reference

from csrc import engine, formats
from csrc.formats import Config
from export import llama2c_weights, model_from_llama2c
from model import ModelArgs, Transformer

# GQA, a 32-multiple hidden size for Q8_0 groups of 32 and 64, a vocabulary that is not a power of 2
C = Config(dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=48)
PROMPTS = [[1], [1, 17, 33], [1, 5, 9, 60, 61, 62, 7], [1, 90], [1, 2, 3, 4, 5]]  # odd B, ragged


@pytest.fixture(scope="module")
def weights():
    return formats.random_weights(C, shared=True, seed=3, std=0.1)  # far from uniform: sampling varies


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return Transformer(
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=48)
    ).eval()


def engine_of(model):
    """The engine's copy of a model.py Transformer, through the buffer export writes (no file)."""
    p = model.params
    return engine.Model.from_weights(
        Config(p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len),
        llama2c_weights(model),
    )


def forward_rows(model, tokens, pos, slots, logits=True):
    """transformer_forward_rows: the logits (n, vocab) of rows (token, position, slot)."""
    t, p, s = (np.array(a, dtype=np.int32) for a in (tokens, pos, slots))
    out = model.lib.transformer_forward_rows(
        model._t, *(engine.ffi.from_buffer("int[]", a) for a in (t, p, s)), len(t), logits
    )
    assert out != engine.ffi.NULL
    return (
        np.frombuffer(engine.ffi.buffer(out, 4 * len(t) * model.config.vocab_size), np.float32)
        .reshape(len(t), -1)
        .copy()
    )


def batched_decode_logits(model, prompts, feeds):
    """Each prompt but its last token through one prefill forward (several rows a sequence), then
    batched steps that feed each sequence the rest of its feed (its prompt, then more ids): the logits
    (B, steps, vocab)."""
    model._reserve(len(prompts))
    rows = [(t, i, b) for b, p in enumerate(prompts) for i, t in enumerate(p[:-1])]
    if rows:
        forward_rows(model, *zip(*rows), logits=False)
    steps = len(feeds[0]) - len(prompts[0]) + 1
    return np.stack(
        [
            forward_rows(
                model,
                [f[len(p) - 1 + step] for p, f in zip(prompts, feeds)],
                [len(p) - 1 + step for p in prompts],
                range(len(prompts)),
            )
            for step in range(steps)
        ],
        1,
    )


def decode_feeds(prompts, steps):
    """Each prompt and steps - 1 more ids after it."""
    return [p + [3 + (step + b) % 50 for step in range(1, steps)] for b, p in enumerate(prompts)]


# ---------------------------------------------------------------------------
# batched decoding is the single-sequence forward, row by row


@pytest.mark.parametrize("version,group_size", [(1, 0), (2, 32), (2, 64)])
def test_batched_decode_logits_equal_single_sequence_logits(weights, kernel_build, version, group_size):
    lib = kernel_build.engine_lib()
    batched = engine.Model.from_weights(C, weights, version, group_size or 64, lib=lib)
    single = engine.Model.from_weights(C, weights, version, group_size or 64, lib=lib)  # one slot: ./run's kernels
    feeds = decode_feeds(PROMPTS, 6)
    got = batched_decode_logits(batched, PROMPTS, feeds)
    for b, tokens in enumerate(feeds):
        want = np.array([single.forward(t, pos) for pos, t in enumerate(tokens)])[len(PROMPTS[b]) - 1 :]
        err = np.abs(got[b] - want).max(axis=1)
        if version == 2 and batched._t.panels == engine.ffi.NULL:  # Q8_0 unpacked: the same products
            np.testing.assert_array_equal(got[b], want)
        elif version == 2:
            # Q8_0 packed (AVX-512 VNNI) adds a product's groups in another order: fp32 noise, but for a
            # position where an activation rounds to another int8 quantum (about 1e-2; a wrong kernel
            # is off by the logits' own size)
            assert np.median(err) <= 1e-5 and err.max() < 0.1, err
        else:  # fp32 batches run on packed panels, summing in another order; and the float64 reference
            ref = Reference(C, weights)
            expected = np.array([ref.forward(t, pos) for pos, t in enumerate(tokens)])[len(PROMPTS[b]) - 1 :]
            assert err.max() <= 1e-4 and np.abs(got[b] - expected).max() <= 1e-4
        # and bit for bit what the sequence gets in a batch of its own
        np.testing.assert_array_equal(got[b], batched_decode_logits(batched, [PROMPTS[b]], [tokens])[0])


# ---------------------------------------------------------------------------
# scoring against PyTorch


def ragged_tokens(B, T, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    lengths = rng.integers(T // 2, T + 1, B)
    starts = np.minimum(rng.integers(1, 8, B), lengths)
    lengths[0], starts[0] = T, 1  # a full row scored from its second token
    for b in range(B):
        tokens[b, lengths[b] :] = 0  # padding
    return tokens, lengths, starts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scoring_matches_pytorch_log_softmax_and_hidden_states(torch_model, kernel_build, temperature):
    tokens, lengths, starts = ragged_tokens(5, 40, 96)
    model = engine.Model.from_weights(
        engine_of(torch_model).config, llama2c_weights(torch_model), lib=kernel_build.engine_lib()
    )
    logp, hidden = model.score(tokens, lengths, starts, temperature, hidden=True)
    with torch.no_grad():
        x = torch.from_numpy(tokens).long()
        h = torch_model.hidden(x)  # (B, T, dim)
        want = torch.log_softmax(torch_model.output(h) / temperature, -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    for b in range(5):
        scored = slice(starts[b], lengths[b])
        assert np.abs(logp[b, scored] - want[b, starts[b] - 1 : lengths[b] - 1].numpy()).max() <= 1e-4
        assert np.abs(hidden[b, scored] - h[b, starts[b] - 1 : lengths[b] - 1].numpy()).max() <= 1e-4
        outside = np.r_[0 : starts[b], lengths[b] : 40]
        assert not logp[b, outside].any() and not hidden[b, outside].any()


GREEDY_PROMPTS = [[1], [1, 403, 407], [1, 379, 311, 260, 261], [1, 279]]


@pytest.fixture(scope="module")
def pytorch_greedy():
    """model.py's greedy batched generate on stories260K, a trained model: its choices are clear of
    near-ties."""
    c, w = formats.read_v0(STORIES260K)
    return model_from_llama2c(c, w).eval().generate(GREEDY_PROMPTS, 60, temperature=0.0, stop_tokens=[1, 2])


def test_greedy_generation_is_pytorchs_token_for_token(pytorch_greedy, kernel_build):
    model = engine.Model(STORIES260K, lib=kernel_build.engine_lib())
    tokens, logprobs = model.generate(GREEDY_PROMPTS, 60, temperature=0.0, stop_tokens=[1, 2])
    assert tokens == pytorch_greedy
    assert all(lp == [0.0] * len(t) for t, lp in zip(tokens, logprobs))  # the greedy distribution is a point mass


# ---------------------------------------------------------------------------
# sampling


def generate_and_score(model, prompts, temperature, seeds, n=30):
    """Sampled tokens, their log-probabilities and hidden states, and the log-probabilities and hidden
    states of the same tokens scored."""
    tokens, logprobs, hidden = model.generate(prompts, n, temperature, seeds, hidden=True)
    T = max(len(p) + len(t) for p, t in zip(prompts, tokens))
    padded = np.zeros((len(prompts), T), np.int32)
    for b, (p, t) in enumerate(zip(prompts, tokens)):
        padded[b, : len(p) + len(t)] = p + t
    lens = [len(p) + len(t) for p, t in zip(prompts, tokens)]
    scored, states = model.score(padded, lens, [len(p) for p in prompts], temperature, hidden=True)
    at = [slice(len(p), n) for p, n in zip(prompts, lens)]
    return tokens, logprobs, [scored[b, s] for b, s in enumerate(at)], hidden, [states[b, s] for b, s in enumerate(at)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_logprobs_and_hidden_states_equal_their_scored_ones(weights, kernel_build, temperature):
    model = engine.Model.from_weights(C, weights, lib=kernel_build.engine_lib())
    tokens, logprobs, scored, hidden, states = generate_and_score(model, PROMPTS, temperature, [11, 12, 13, 14, 15])
    for lp, s, h, st in zip(logprobs, scored, hidden, states):
        assert len(lp) == 30 and np.abs(np.array(lp) - s).max() <= 1e-5
        assert h.shape == (30, C.dim) and np.abs(h).max() > 0.1 and np.abs(h - st).max() <= 1e-5
    assert model.generate(PROMPTS, 30, temperature, [11, 12, 13, 14, 15]) == (tokens, logprobs)  # hidden or not


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch(weights):
    model = engine.Model.from_weights(C, weights, version=2, group_size=32)
    tokens, logprobs = model.generate(PROMPTS, 30, 1.0, seeds=[11, 12, 13, 14, 15])
    assert model.generate(PROMPTS, 30, 1.0, seeds=[11, 12, 13, 14, 15]) == (tokens, logprobs)
    # sequence 2 alone, and beside others in another order: the same tokens and log-probabilities
    for order in ([2], [4, 2, 0], [2, 3]):
        alone = model.generate([PROMPTS[b] for b in order], 30, 1.0, seeds=[11 + b for b in order])
        assert alone == ([tokens[b] for b in order], [logprobs[b] for b in order])
    assert model.generate(PROMPTS, 30, 1.0, seeds=[21, 22, 23, 24, 25])[0] != tokens
    assert len({tuple(t) for t in tokens}) == 5  # different seeds, different samples
    # decoded in groups one after another (the engine's choice for caches larger than the L3): the same
    for group in (1, 2, 3):
        assert model.generate(PROMPTS, 30, 1.0, seeds=[11, 12, 13, 14, 15], group=group) == (tokens, logprobs)
    with pytest.raises(ValueError, match="group -1 is negative"):
        model.generate(PROMPTS, 30, 1.0, group=-1)


def test_a_prompt_shared_by_a_group_gives_each_sequence_what_it_gets_alone(weights, kernel_build):
    """Rows that repeat the prompt before them (a GRPO group) run it once and copy its KV cache: each
    sequence's samples, their log-probabilities and its scores are those it gets alone."""
    model = engine.Model.from_weights(C, weights, lib=kernel_build.engine_lib())
    prompts = [PROMPTS[2]] * 3 + [PROMPTS[4]] * 2 + [PROMPTS[2]]
    seeds = [11, 12, 13, 14, 15, 16]
    together = generate_and_score(model, prompts, 1.0, seeds)
    for b in range(len(prompts)):
        alone = generate_and_score(model, [prompts[b]], 1.0, seeds[b : b + 1])
        assert (alone[0][0], alone[1][0]) == (together[0][b], together[1][b])
        assert all((x[0] == y[b]).all() for x, y in zip(alone[2:], together[2:]))


def test_a_stop_token_ends_its_sequence_and_is_included(weights):
    model = engine.Model.from_weights(C, weights)
    free, _ = model.generate(PROMPTS, 30, 1.0, seeds=[1, 2, 3, 4, 5])
    stop = [free[0][5], free[3][2]]
    stopped, logprobs = model.generate(PROMPTS, 30, 1.0, seeds=[1, 2, 3, 4, 5], stop_tokens=stop)
    for f, s, lp in zip(free, stopped, logprobs):
        ends = [i for i, t in enumerate(f) if t in stop]
        assert s == (f[: ends[0] + 1] if ends else f) and len(lp) == len(s)
    assert len(stopped[0]) <= 6 and stopped[0][-1] in stop


def test_max_new_tokens_or_the_context_ends_a_sequence(weights):
    model = engine.Model.from_weights(C, weights)
    tokens, _ = model.generate([[1] * 40, [1]], 8, 1.0, seeds=[1, 2])  # 40 + 8 = seq_len 48
    assert [len(t) for t in tokens] == [8, 8]
    tokens, _ = model.generate([[1] * 44, [1] * 47, [1]], 8, 1.0, seeds=[1, 2, 3])  # each up to the context's end
    assert [len(t) for t in tokens] == [4, 1, 8]


# ---------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts=[]), "batch of 0 sequences is out of range"),
        (dict(prompts=[[1], []]), "prompt 1: empty prompt"),
        (dict(prompts=[[1, 96]]), "prompt 0: prompt token 96 at position 1 is out of range [0, 96)"),
        (dict(prompts=[[1, -1]]), "out of range"),
        (dict(prompts=[[1] * 48]), "prompt 0: 48 tokens leave no room in the context (seq_len 48)"),
        (dict(max_new_tokens=0), "max_new_tokens 0 is not positive"),
        (dict(temperature=-0.5), "temperature -0.5 is not a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature nan"),
        (dict(seeds=[1, 0]), "seed of sequence 1 is 0"),
        (dict(seeds=[1]), "seeds has shape (1,), expected (2,)"),
        (dict(seeds=[1, -2]), "seeds must be nonnegative"),
        (dict(stop_tokens=[2, 96]), "stop token 96 is out of range [0, 96)"),
    ],
)
def test_generate_rejects_bad_arguments_with_one_line(weights, kwargs, message):
    model = engine.Model.from_weights(C, weights)
    args = dict(prompts=[[1], [1, 5]], max_new_tokens=8, temperature=1.0, seeds=[1, 2], stop_tokens=())
    args.update(kwargs)
    if "prompts" in kwargs and "seeds" not in kwargs:
        args["seeds"] = None
    with pytest.raises(ValueError) as e:
        model.generate(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(starts=[0, 1]), "sequence 0: start 0 is out of range [1, 4]"),
        (dict(starts=[1, 5]), "sequence 1: start 5 is out of range [1, 3]"),
        (dict(lengths=[4, 6]), "sequence 1: length 6 is out of range [1, 5]"),
        (dict(lengths=[0, 3]), "sequence 0: length 0"),
        (dict(tokens=[[1, 2, 3, 96, 0], [1, 2, 3, 0, 0]]), "sequence 0: token 96 at position 3 is out of range"),
        (dict(temperature=0.0), "temperature 0 is not a finite number > 0"),
        (dict(lengths=[4]), "lengths has shape (1,), expected (2,)"),
        (dict(tokens=[1, 2, 3]), "tokens must be (B, T)"),
    ],
)
def test_score_rejects_bad_arguments_with_one_line(weights, change, message):
    model = engine.Model.from_weights(C, weights)
    args = dict(tokens=[[1, 2, 3, 4, 0], [1, 2, 3, 0, 0]], lengths=[4, 3], starts=[1, 2], temperature=1.0)
    args.update(change)
    with pytest.raises(ValueError) as e:
        model.score(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_scoring_longer_than_the_context_is_refused(weights):
    model = engine.Model.from_weights(C, weights)
    with pytest.raises(ValueError, match=r"length 49 is out of range \[1, 48\] \(tokens' width 49, seq_len 48\)"):
        model.score(np.ones((1, 49), np.int32), [49], [1])


# ---------------------------------------------------------------------------
# threads

THREADS_SCRIPT = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {root!r})
from csrc import engine, formats
from test_batch import C, PROMPTS
for version in (1, 2):
    model = engine.Model.from_weights(C, formats.random_weights(C, seed=3, std=0.1), version, 32)
    tokens, logprobs = model.generate(PROMPTS * 3, 20, 0.8, seeds=range(1, 16))
    padded = np.zeros((15, 30), np.int32)
    for b, (p, t) in enumerate(zip(PROMPTS * 3, tokens)):
        padded[b, :len(p) + len(t)] = (p + t)[:30]
    lengths = [min(30, len(p) + len(t)) for p, t in zip(PROMPTS * 3, tokens)]
    scored, hidden = model.score(padded, lengths, 1, 0.8, hidden=True)
    print(hashlib.sha256(repr((tokens, logprobs)).encode() + scored.tobytes() + hidden.tobytes()).hexdigest())
"""


def test_the_thread_count_does_not_change_generation_or_scoring():
    outputs = set()
    for threads in ["1", "2", "3"]:  # 3: uneven shares of rows
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "passive"}
        r = subprocess.run(
            [sys.executable, "-c", THREADS_SCRIPT.format(root=str(ROOT))],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT / "tests",
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outputs.add(r.stdout)
    assert len(outputs) == 1


# ---------------------------------------------------------------------------
# weights from memory


@pytest.mark.parametrize("version,shared", [(1, True), (1, False), (2, True), (2, False)])
def test_a_model_from_weights_holds_the_bytes_of_the_file_export_writes(tmp_path, version, shared):
    w = formats.random_weights(C, shared=shared, seed=1)
    formats.write_checkpoint(tmp_path / "m.bin", C, w, version, 32)
    model = engine.Model.from_weights(C, w, version, 32)
    assert model._buffer.tobytes() == (tmp_path / "m.bin").read_bytes()
    np.testing.assert_array_equal(model.forward(5, 0), engine.Model(tmp_path / "m.bin").forward(5, 0))


def test_update_overwrites_the_weights_in_place(weights):
    model, fresh = engine.Model.from_weights(C, weights), formats.random_weights(C, seed=9, std=0.1)
    buffer = model._buffer.ctypes.data
    model.update(fresh)
    assert model._buffer.ctypes.data == buffer and model.views["wq"].base is not None
    np.testing.assert_array_equal(model.views["w2"], fresh["w2"])
    np.testing.assert_array_equal(model.forward(7, 0), engine.Model.from_weights(C, fresh).forward(7, 0))
    q8 = engine.Model.from_weights(C, weights, version=2, group_size=32)
    q8.update({"w1": fresh["w1"]})  # a subset, quantised as export does
    values, scales = q8.views["w1"]
    q, s = formats.quantize_q80(fresh["w1"][1], 32)
    np.testing.assert_array_equal(values[1].reshape(-1), q)
    np.testing.assert_array_equal(scales[1].reshape(-1), s)


def test_update_rejects_unknown_names_and_wrong_shapes(weights):
    model = engine.Model.from_weights(C, weights)
    with pytest.raises(ValueError, match=r"update: wq has shape \(2, 64, 32\), expected \(2, 64, 64\)"):
        model.update({"wq": np.zeros((2, 64, 32), np.float32)})
    with pytest.raises(ValueError, match="no weight 'wcls' in this model"):
        model.update({"wcls": np.zeros((96, 64), np.float32)})
    with pytest.raises(ValueError, match="group_size 48 does not divide dim 64"):
        engine.Model.from_weights(C, weights, version=2, group_size=48)

"""The model's contracts: shapes, causality, cached decoding, attention and RoPE math, llama2.c
parity (names, counts, the RoPE table), training, sampling and init."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED

from model import (
    C_ATTENTION_MAX_HEAD_DIM,
    PRESETS,
    FeedForward,
    ModelArgs,
    Transformer,
    apply_rope,
    c_attention,
    packed_mask,
    rope_tables,
)

STORIES260K = SHARED / "models" / "llama2c" / "stories260K.bin"


def tiny_model(seed=0, std=0.3, **overrides):
    """A small model whose matrices are re-drawn with a large std: with llama2.c's 0.02 init and
    tied embeddings, greedy decoding just repeats the last token, which would hide bugs."""
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=64)
    model = Transformer(ModelArgs(**{**args, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def random_tokens(*shape, vocab_size=64, seed=0):
    return torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# forward


def test_forward_gives_logits_at_every_position_and_a_scalar_loss_only_with_targets():
    model = tiny_model()
    tokens = random_tokens(3, 10)
    logits, loss = model(tokens)
    assert logits.shape == (3, 10, 64) and loss is None
    logits, loss = model(tokens, random_tokens(3, 10, seed=1))
    assert logits.shape == (3, 10, 64) and loss.shape == () and loss.item() > 0
    assert model.hidden(tokens).shape == (3, 10, 32)
    assert torch.allclose(model.output(model.hidden(tokens)), logits)


def test_loss_ignores_targets_of_minus_one():
    model = tiny_model()
    tokens, targets = random_tokens(2, 8), random_tokens(2, 8, seed=1)
    targets[:, ::2] = -1
    logits, loss = model(tokens, targets)
    kept = targets != -1
    assert torch.allclose(loss, F.cross_entropy(logits[kept], targets[kept]))


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_model()
    tokens = random_tokens(1, 12)
    changed = tokens.clone()
    t = 6
    changed[0, t + 1] = (tokens[0, t + 1] + 1) % 64
    a, _ = model(tokens)
    b, _ = model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


# ---------------------------------------------------------------------------
# attention and RoPE against references written from the definitions


def rope_as_run_c(x):
    """run.c's loop: rotate each pair (v[i], v[i+1]) of a head by pos / 10000^(i / head_size)."""
    out = x.clone()
    head_size = x.size(-1)
    for pos in range(x.size(1)):
        for i in range(0, head_size, 2):
            angle = pos / 10000.0 ** (i / head_size)
            v0, v1 = x[:, pos, :, i], x[:, pos, :, i + 1]
            out[:, pos, :, i] = v0 * math.cos(angle) - v1 * math.sin(angle)
            out[:, pos, :, i + 1] = v0 * math.sin(angle) + v1 * math.cos(angle)
    return out


def reference_attention(attn, x):
    """Causal multi-head attention one head at a time; query head h reads KV head h // n_rep."""
    B, T, _ = x.shape
    H, hd, n_rep = attn.n_heads, attn.head_dim, attn.n_heads // attn.n_kv_heads
    q = rope_as_run_c((x @ attn.wq.weight.T).view(B, T, H, hd))
    k = rope_as_run_c((x @ attn.wk.weight.T).view(B, T, -1, hd))
    v = (x @ attn.wv.weight.T).view(B, T, -1, hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h // n_rep].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        heads.append(scores.masked_fill(future, -math.inf).softmax(-1) @ v[:, :, h // n_rep])  # (B, T, hd)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_equals_per_head_reference_with_run_c_rope(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads, std=0.1)
    attn = model.layers[0].attention
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = attn(x, *rope_tables(model.freqs_cos[:9], model.freqs_sin[:9]))
        assert torch.allclose(y, reference_attention(attn, x), atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(2, 3, 17, 8), (3, 2, 40, 16), (1, 1, 1, 8), (1, 2, 130, 4), (2, 1, 23, 32), (1, 1, 9, 12)]
)
def test_c_attention_kernel_equals_causal_sdpa_and_its_gradients(shape, kernel_build):
    """csrc/train/attention.c (the CPU path at small head sizes), built for each kernel path, against
    PyTorch in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = c_attention(q32, k32, v32, str(kernel_build.dir / "libattention.so"))
    grads = torch.autograd.grad(out, (q32, k32, v32), grad.float())
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        assert ours.dtype == torch.float32 and (ours.double() - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("D", [8, 16, 12])
def test_c_attention_of_packed_sequences_equals_masked_sdpa_and_its_gradients(D, kernel_build):
    """Sequences packed along T: two prompts, the first continued by three responses (one of them
    empty), the second by one, each attending causally within itself and to all of its prompt."""
    bounds = torch.tensor([0, 6, 9, 9, 30, 41, 52], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 0, -1, 4], dtype=torch.int32)
    mask = packed_mask(bounds, parents, 52)
    assert mask[20, 3] and mask[20, 12] and not mask[20, 8] and not mask[20, 21] and not mask[45, 20]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 52, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = c_attention(q32, k32, v32, str(kernel_build.dir / "libattention.so"), bounds, parents)
    grads = torch.autograd.grad(out, (q32, k32, v32), grad.float())
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        assert (ours.double() - theirs).abs().max() < 1e-5


def test_a_model_at_head_size_8_trains_the_same_through_the_c_kernel_as_through_sdpa():
    model = tiny_model(dim=32, n_heads=4, n_kv_heads=2)  # head size 8: the C kernel's range, with GQA
    assert model.layers[0].attention.head_dim <= C_ATTENTION_MAX_HEAD_DIM
    assert model.set_attention("auto") == "c"  # where it is faster, by default
    tokens = random_tokens(3, 20)
    runs = []
    for kernel in ("c", "torch"):
        assert model.set_attention(kernel) == kernel
        model.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        runs.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (c_loss, c_grads), (sdpa_loss, sdpa_grads) = runs
    assert c_loss == pytest.approx(sdpa_loss, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(c_grads, sdpa_grads))


def test_the_attention_switch_is_explicit_and_refuses_what_it_cannot_do():
    model = tiny_model(dim=128, n_heads=4, n_kv_heads=2)  # head size 32: PyTorch's kernel by default
    assert model.set_attention("auto") == "torch" and model.set_attention("c") == "c"
    assert all(layer.attention.c_kernel for layer in model.layers)
    assert model.set_attention("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        model.set_attention("c", "cuda")
    with pytest.raises(ValueError, match="must be one of auto, c, torch"):
        model.set_attention("flash")


def test_the_feed_forward_padded_to_a_multiple_of_16_hidden_units_is_the_plain_swiglu_and_its_gradients():
    """On a CPU a hidden size that is not a multiple of 16 (stories260K's 172) runs with zero-weight units
    added: the outputs and gradients are SwiGLU's on the model's own weights."""
    args = ModelArgs(dim=64, multiple_of=4, n_layers=1, n_heads=8, vocab_size=32)
    ffn = FeedForward(args)
    assert ffn.w1.weight.shape == (172, 64)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = []
    for forward in (ffn, lambda x: ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))):
        ffn.zero_grad()
        x.grad = None
        y = forward(x)
        y.square().sum().backward()
        results.append([y, x.grad, *(w.weight.grad for w in (ffn.w1, ffn.w2, ffn.w3))])
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_the_relative_position():
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=256))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        rq = apply_rope(q, *rope_tables(model.freqs_cos[m], model.freqs_sin[m]))
        rk = apply_rope(k, *rope_tables(model.freqs_cos[n], model.freqs_sin[n]))
        return (rq * rk).sum().item()

    for shift in (1, 50, 200):
        assert score(3 + shift, 7 + shift) == pytest.approx(score(3, 7), abs=1e-4)
    assert score(3, 8) != pytest.approx(score(3, 7), abs=1e-2)


# ---------------------------------------------------------------------------
# cached decoding and generation


def left_pad(prompts):
    P = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    return tokens, torch.tensor([P - len(p) for p in prompts])


@pytest.mark.parametrize(
    "prompts", [[[1, 5, 9, 2, 7], [3, 4], [8, 6, 2, 1, 5, 9, 11]], [[1, 5, 9], [3, 4, 2], [8, 6, 2]]]
)
def test_cached_decoding_of_left_padded_rows_gives_each_rows_full_forward_logits(prompts):
    model = tiny_model()
    tokens, pad = left_pad(prompts)
    pad = pad if pad.any() else None  # equal lengths: generate()'s unpadded path, without a mask
    P, n_steps = tokens.size(1), 4
    fed = random_tokens(3, n_steps)  # teacher-forced continuation
    with torch.no_grad():
        kv_cache = model.new_kv_cache(3, P + n_steps)
        step_logits = [model.decode(tokens, pad, kv_cache, 0)]  # prefill
        for i in range(n_steps - 1):
            step_logits.append(model.decode(fed[:, i : i + 1], pad, kv_cache, P + i))
        for b, prompt in enumerate(prompts):
            full, _ = model(torch.tensor([prompt + fed[b].tolist()]))
            for i, logits in enumerate(step_logits):
                assert torch.allclose(logits[b], full[0, len(prompt) - 1 + i], atol=1e-5), (b, i)


RAGGED = [[1, 5, 9, 2], [3], [8, 6, 2, 1, 5, 9]]


def greedy_alone(model, prompt, **kw):
    return model.generate([prompt], 10, temperature=0.0, **kw)[0]


def test_batched_greedy_generation_equals_each_prompt_run_alone_even_as_rows_stop():
    model = tiny_model()
    stop = greedy_alone(model, RAGGED[0])[2]  # the first row stops early, the others shift up
    alone = [greedy_alone(model, p, stop_tokens=(stop,)) for p in RAGGED]
    assert len(alone[0]) <= 3 and alone[0][-1] == stop
    assert max(len(a) for a in alone) == 10
    assert model.generate(RAGGED, 10, temperature=0.0, stop_tokens=(stop,)) == alone
    assert model.generate(RAGGED, 10, temperature=0.0) == [greedy_alone(model, p) for p in RAGGED]


def test_finished_rows_leave_the_batch():
    model = tiny_model()
    stop = greedy_alone(model, RAGGED[0])[2]
    batch_sizes = []
    model.tok_embeddings.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].size(0)))
    model.generate(RAGGED, 10, temperature=0.0, stop_tokens=(stop,))
    assert batch_sizes[0] == 3
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < 3


def test_greedy_generation_stops_right_after_a_stop_token():
    model = tiny_model()
    free = greedy_alone(model, [1, 2, 3])
    stop = free[4]
    assert greedy_alone(model, [1, 2, 3], stop_tokens=(stop,)) == free[: free.index(stop) + 1]


def test_sampling_is_reproducible_with_a_seeded_generator_and_varies_with_the_seed():
    model = tiny_model(std=0.05)  # flat enough distributions that samples differ

    def sample(seed):
        return model.generate([[1, 2], [3]], 20, generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_1_and_a_tiny_top_p_both_equal_greedy():
    model = tiny_model()
    greedy = model.generate(RAGGED, 10, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert model.generate(RAGGED, 10, temperature=1.0, top_k=1, generator=g) == greedy
    assert model.generate(RAGGED, 10, temperature=1.0, top_p=1e-6, generator=g) == greedy


def test_generation_longer_than_max_seq_len_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1] * 60], 5)


# ---------------------------------------------------------------------------
# llama2.c parity: names, parameter counts, the published checkpoint


def test_output_and_embedding_weights_stay_tied_through_an_optimizer_step():
    model = tiny_model()
    assert model.output.weight is model.tok_embeddings.weight
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    _, loss = model(random_tokens(2, 8), random_tokens(2, 8, seed=1))
    loss.backward()
    before = model.output.weight.detach().clone()
    opt.step()
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert not torch.equal(model.tok_embeddings.weight, before)


def test_state_dict_holds_only_the_weights_under_llama2c_names():
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64))
    layer = [
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    ]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {f"layers.0.{n}.weight" for n in layer}
    assert set(model.state_dict()) == expected


def params_by_formula(a):
    kv_dim = a.dim * a.n_kv_heads // a.n_heads
    per_layer = 2 * a.dim * a.dim + 2 * a.dim * kv_dim + 3 * a.dim * a.hidden_dim + 2 * a.dim
    return a.vocab_size * a.dim + a.n_layers * per_layer + a.dim  # tied embedding once, final norm


def test_parameter_counts_match_the_formula_and_llama2c_model_sizes():
    args = ModelArgs(**PRESETS["15M"])
    assert args.hidden_dim == 768
    assert Transformer(args).num_params() == params_by_formula(args) == 15_191_712
    args = ModelArgs(**PRESETS["260K"])
    assert args.hidden_dim == 172
    assert Transformer(args).num_params() == params_by_formula(args) == 260_032


@pytest.mark.skipif(not STORIES260K.exists(), reason="needs ../shared/models/llama2c/stories260K.bin")
def test_260K_preset_and_rope_table_match_llama2c_stories260K_checkpoint():
    model = Transformer(ModelArgs(**PRESETS["260K"]))
    p = model.params
    header = np.fromfile(STORIES260K, dtype=np.int32, count=7).tolist()
    assert header == [p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len]
    # legacy layout: all weights (shared classifier), then the RoPE cos and sin tables
    data = np.fromfile(STORIES260K, dtype=np.float32, offset=28)
    n, table = model.num_params(), p.max_seq_len * p.dim // p.n_heads // 2
    assert data.size == n + 2 * table
    assert np.array_equal(data[n : n + table], model.freqs_cos.flatten().numpy())
    assert np.array_equal(data[n + table :], model.freqs_sin.flatten().numpy())


# ---------------------------------------------------------------------------
# training and init


def test_a_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16))
    tokens = random_tokens(4, 17)
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    _, first = model(x, y)
    assert first.item() == pytest.approx(math.log(64), abs=0.3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_init_follows_llama2c_with_depth_scaled_wo_and_w3():
    model = Transformer(ModelArgs(dim=128, n_layers=8, n_heads=4, vocab_size=64))
    scaled = 0.02 / math.sqrt(2 * 8)
    layer = model.layers[3]
    assert layer.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.feed_forward.w3.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(layer.ffn_norm.weight, torch.ones(128))


def test_weight_decay_applies_to_matrices_but_not_norm_gains():
    model = tiny_model()
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

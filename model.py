"""
A Llama-style transformer as in llama2.c: RMSNorm, rotary position embeddings, grouped-query
attention, a SwiGLU feed-forward and tied input/output embeddings. Parameter names are
llama2.c's, so checkpoints and export.py interoperate with its C engine (run.c).

One attention implementation serves both training (plain causal attention, flash-friendly and
torch.compile-friendly) and generation (a KV cache over a left-padded, ragged batch).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # None: llama2.c's rule below
    multiple_of: int = 32  # the feed-forward hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # SwiGLU has three matrices, so 2/3 of 4*dim keeps the parameter count of a 4*dim MLP
            hidden_dim = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"need n_heads | dim, n_kv_heads | n_heads and an even head size; "
                f"got dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )


# llama2.c's published TinyStories models: stories260K, stories15M, stories42M, stories110M
PRESETS = {
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
    "42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, multiple_of=32, max_seq_len=1024),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, multiple_of=32, max_seq_len=1024),
    # CPU-friendly default for this repository (512-token vocabulary); to be retuned from measurements
    "default": dict(dim=128, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32 (the mean of squares in bf16 is too coarse), by PyTorch's fused kernel
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim, max_seq_len, theta):
    """cos and sin of the angles pos * theta^(-2i/head_dim), each (max_seq_len, head_dim/2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)  # (max_seq_len, head_dim/2)
    return angles.cos(), angles.sin()


def rope_tables(cos, sin):
    """(…, head_dim/2) angle tables -> the (…, head_dim) tables apply_rope takes: cos repeated for
    both elements of a pair, sin as (-s0, s0, -s1, s1, ...)."""
    return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotate each interleaved pair (x[2i], x[2i+1]) by its angle, as llama2.c's run.c does.
    x (B, T, n_heads, head_dim); cos, sin from rope_tables, (T, head_dim) or (B, T, head_dim) for
    per-row positions."""
    # x * (c0, c0, c1, c1, ...) + (x1, x0, x3, x2, ...) * (-s0, s0, -s1, s1, ...): three whole-tensor ops
    # instead of a dozen on halves, with the same roundings as run.c's x0 * cos - x1 * sin
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos.unsqueeze(-2) + swapped * sin.unsqueeze(-2)).type_as(x)  # tables broadcast over heads


def packed_mask(bounds, parents, T):
    """The (T, T) attention mask of sequences packed along T (c_attention's bounds and parents): True where
    a query may attend, causally within its own sequence and to all of the sequence it continues."""
    pos = torch.arange(T, device=bounds.device)
    seq = torch.bucketize(pos, bounds[1:].to(pos.dtype), right=True)  # each position's sequence
    same = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    return same if parents is None else same | (parents.long()[seq][:, None] == seq[None, :])


def repeat_kv(x, n_rep):
    """(B, n_kv_heads, S, head_dim) -> (B, n_kv_heads * n_rep, S, head_dim); query head h reads KV head h // n_rep."""
    if n_rep == 1:
        return x
    B, n_kv_heads, S, head_dim = x.shape
    return x[:, :, None].expand(B, n_kv_heads, n_rep, S, head_dim).reshape(B, n_kv_heads * n_rep, S, head_dim)


# Causal attention through csrc/train/attention.c, for CPUs at small head sizes, where PyTorch's flash
# attention is slow (reports/training_speed.md): q, k, v (B, H, T, head_dim) contiguous fp32 with as
# many KV heads as query heads -> the output and each row's log-sum-exp, which the backward pass
# recomputes the probabilities from. Sequences packed along T (B = 1) pass bounds, the (n + 1,) int32
# offsets of n sequences, and parents, (n,) int32: the earlier sequence each continues (a shared
# prompt) or -1. Each attends causally within itself and to the whole of its parent, to nothing else.
# Custom operators rather than an autograd.Function, so that torch.compile keeps them in its graph
# instead of breaking it at every layer. lib: the path of another build of the library (the tests'
# kernel paths), else csrc/libattention.so.
@torch.library.custom_op("tinystories::c_attention", mutates_args=(), device_types="cpu")
def c_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Optional[torch.Tensor],
    parents: Optional[torch.Tensor],
    lib: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from csrc import attention

    B, H, T, D = q.shape
    out, lse = torch.empty_like(q), q.new_empty(B, H, T)
    seqs = attention.sequences(bounds, parents)
    if attention.load(lib).attention_forward(
        *map(attention.float_ptr, (q, k, v, out, lse)), B * H, T, D, *seqs, torch.get_num_threads()
    ):
        raise MemoryError("attention_forward: out of memory")
    return out, lse


@torch.library.custom_op("tinystories::c_attention_backward", mutates_args=(), device_types="cpu")
def c_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    bounds: Optional[torch.Tensor],
    parents: Optional[torch.Tensor],
    lib: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from csrc import attention

    dout = dout.contiguous()
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    B, H, T, D = q.shape
    ptrs = map(attention.float_ptr, (q, k, v, out, lse, dout, dq, dk, dv))
    seqs = attention.sequences(bounds, parents)
    if attention.load(lib).attention_backward(*ptrs, B * H, T, D, *seqs, torch.get_num_threads()):
        raise MemoryError("attention_backward: out of memory")
    return dq, dk, dv


@c_attention_forward.register_fake
def _(q, k, v, bounds, parents, lib):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


@c_attention_backward.register_fake
def _(q, k, v, out, lse, dout, bounds, parents, lib):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.bounds, ctx.parents, ctx.lib = inputs[3:]


def _backward(ctx, dout, _):
    return (*c_attention_backward(*ctx.saved_tensors, dout, ctx.bounds, ctx.parents, ctx.lib), None, None, None)


c_attention_forward.register_autograd(_backward, setup_context=_save_for_backward)


def c_attention(q, k, v, lib="", bounds=None, parents=None):
    """Causal attention of q, k, v (B, H, T, head_dim) in any float dtype through csrc/train/attention.c:
    fp32 arithmetic, the output in q's dtype. bounds, parents: sequences packed along T (see above)."""
    out, _ = c_attention_forward(*(x.float().contiguous() for x in (q, k, v)), bounds, parents, lib)
    return out.to(q.dtype)


C_ATTENTION_MAX_HEAD_DIM = 16  # where csrc/train/attention.c beats PyTorch's CPU kernel (reports/training_speed.md)
ATTENTION_KERNELS = ("auto", "c", "torch")


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)
        self.c_kernel = False  # causal attention through csrc/train/attention.c: Transformer.set_attention

    def forward(self, x, cos, sin, mask=None, kv_cache=None, start_pos=0, packed=None):
        """x (B, T, dim) -> (B, T, dim). Without a mask, plain causal attention over x (training), or with
        packed = (bounds, parents) (see c_attention) attention within the sequences packed along T.
        Decoding passes kv_cache (2, B, n_kv_heads, max_len, head_dim), into which this chunk's keys
        and values go at columns start_pos..start_pos+T-1, and a boolean mask (B, 1, T, start_pos+T)
        that is True where a query may attend, or no mask when no row is padded (then a chunk from
        start_pos 0 is causal, and a single token attends to the whole cache)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache[:, :, start_pos : start_pos + T] = k
            v_cache[:, :, start_pos : start_pos + T] = v
            k, v = k_cache[:, :, : start_pos + T], v_cache[:, :, : start_pos + T]  # (B, n_kv_heads, S, head_dim)
        n_rep = self.n_heads // self.n_kv_heads
        if T == 1:
            # one decoding step, written out: the n_rep query heads of a KV head read its cache in place
            # (no repeat_kv copy), and at small head sizes this beats SDPA's kernel (1.5x on 260K)
            q = q.reshape(B, self.n_kv_heads, n_rep, self.head_dim)
            att = torch.einsum("bgrd,bgsd->bgrs", q, k) * self.head_dim**-0.5  # (B, n_kv_heads, n_rep, S)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
            y = torch.einsum(
                "bgrs,bgsd->bgrd", att.float().softmax(-1).type_as(v), v
            )  # (B, n_kv_heads, n_rep, head_dim)
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_heads, S, head_dim)
            if (
                self.c_kernel
                and x.device.type == "cpu"
                and mask is None
                and kv_cache is None
                and not (self.training and self.dropout)
            ):
                bounds, parents = packed or (None, None)
                y = c_attention(q, k, v, bounds=bounds, parents=parents)
            else:
                mask = mask if packed is None else packed_mask(*packed, T)
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=mask is None and T > 1,
                    dropout_p=self.dropout if self.training else 0.0,
                )
        y = y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        w1, w2, w3 = self.w1.weight, self.w2.weight, self.w3.weight
        pad = -len(w1) % 16 if x.device.type == "cpu" and torch.is_grad_enabled() else 0
        if pad:
            # hidden units of zero weights, which add nothing to the output or the gradients: MKL's
            # products of an odd width (stories260K's 172) ran 1.7x slower than at 176 on a Zen 3, and
            # a training step's feed-forward 1.15x; without gradients (decoding, scoring) the weights'
            # copies cost more than they save (a decoding step's 48 -> 77 us)
            zeros = w1.new_zeros(pad, w1.size(1))
            w1, w3, w2 = torch.cat([w1, zeros]), torch.cat([w3, zeros]), torch.cat([w2, zeros.t()], 1)
        return self.dropout(F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, start_pos=0, packed=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, start_pos, packed)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # weight tying
        self.attention_kernel = "torch"  # or "c": set_attention
        cos, sin = rope_frequencies(params.dim // params.n_heads, params.max_seq_len, params.rope_theta)
        # not persistent: they follow from params, so state_dict holds only the weights
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # llama2.c's scaled init of "residual projections" (it names w3, not w2; kept for parity)
            if name.endswith("wo.weight") or name.endswith("w3.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, kernel, device_type="cpu"):
        """Choose the causal attention of training and scoring passes: 'c' (csrc/train/attention.c, from
        `make lib`), 'torch' (PyTorch's scaled_dot_product_attention) or 'auto': C on a CPU at head
        sizes up to C_ATTENTION_MAX_HEAD_DIM, where it is faster, if the library is built. Returns
        the choice, for the run to report; a ValueError if 'c' cannot be had."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, not {kernel!r}")
        head_dim = self.params.dim // self.params.n_heads
        use_c = kernel == "c" or (kernel == "auto" and device_type == "cpu" and head_dim <= C_ATTENTION_MAX_HEAD_DIM)
        if use_c:
            try:
                from csrc import attention  # noqa: F401
            except (ImportError, OSError) as e:
                if kernel == "c":
                    raise ValueError(f"--attention=c: {e}") from None
                use_c = False
        if use_c and device_type != "cpu":
            raise ValueError(f"--attention=c runs on the CPU only, not on {device_type}")
        for layer in self.layers:
            layer.attention.c_kernel = use_c
        self.attention_kernel = "c" if use_c else "torch"
        return self.attention_kernel

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def hidden(self, tokens, positions=None, mask=None, kv_cache=None, start_pos=0, packed=None):
        """tokens (B, T) -> final-normed hidden states (B, T, dim), the trunk a value or reward head sits on.
        By default positions are 0..T-1 and attention is causal. decode() passes positions (T,), or
        (B, T) per row, a mask and the KV cache (n_layers, 2, B, n_kv_heads, max_len, head_dim). Sequences
        packed along T pass their positions and packed = (bounds, parents) (c_attention's)."""
        T = tokens.size(1)
        if positions is None:
            cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]  # (T, head_dim/2)
        else:
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]  # (T or B, T, head_dim/2)
        cos, sin = rope_tables(cos, sin)  # once per forward, not per layer
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if kv_cache is None else kv_cache[i], start_pos, packed)
        return self.norm(h)

    def forward(self, tokens, targets=None):
        """tokens (B, T) -> (logits (B, T, vocab_size), loss or None). Targets of -1 are ignored."""
        logits = self.output(self.hidden(tokens))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW that decays the matrices (embeddings, linears) but not the norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel is faster, on CUDA only
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops (PaLM appendix B), as llama2.c."""
        p = self.params
        L, H, Q, T = p.n_layers, p.n_heads, p.dim // p.n_heads, p.max_seq_len
        flops_per_token = 6 * self.num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    def new_kv_cache(self, batch_size, max_len):
        """Zeroed keys and values for every layer: (n_layers, 2, batch_size, n_kv_heads, max_len, head_dim)."""
        p, device = self.params, self.freqs_cos.device
        # under autocast the keys come out in the autocast dtype; store them as they come
        dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else self.output.weight.dtype
        )
        return torch.zeros(
            p.n_layers, 2, batch_size, p.n_kv_heads, max_len, p.dim // p.n_heads, dtype=dtype, device=device
        )

    def decode(self, tokens, pad, kv_cache, start_pos):
        """Feed the next columns of a left-padded batch through the KV cache: tokens (B, T) fill cache
        columns start_pos..start_pos+T-1, pad (B,) counts each row's padding columns on the left
        (None: no row is padded). Returns the logits at the last column (B, vocab_size)."""
        T = tokens.size(1)
        q_cols = torch.arange(start_pos, start_pos + T, device=tokens.device)  # (T,)
        if pad is None and (T == 1 or start_pos == 0):
            # nothing to hide: plain causal attention, and a single new token sees the whole cache
            positions, mask = q_cols, None
        else:
            pad = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device) if pad is None else pad
            k_cols = torch.arange(start_pos + T, device=tokens.device)  # (S,)
            # each row's own positions, as if run alone (RoPE is relative, so this only spares rounding)
            positions = (q_cols - pad[:, None]).clamp(min=0)  # (B, T)
            # causal over the row's real tokens; a padding column sees itself, as an all-False mask row
            # gives NaNs on some SDPA backends
            real = (k_cols >= pad[:, None])[:, None, :]  # (B, 1, S)
            mask = ((k_cols <= q_cols[:, None]) & (real | (k_cols == q_cols[:, None])))[:, None]  # (B, 1, T, S)
        return self.output(self.hidden(tokens, positions, mask, kv_cache, start_pos)[:, -1])

    @torch.inference_mode()  # no autograd bookkeeping at all: a few percent per decoding step
    def generate(
        self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(), generator=None
    ):
        """Sample continuations of a batch of prompts with a KV cache: one forward over the prompts,
        then one token a step.

        prompts: list of token-id lists (lengths may differ) or a (B, T) LongTensor.
        max_new_tokens: the most tokens a row may add, one for all rows or a list of one per row.
        temperature 0 is greedy; top_k keeps the k most likely tokens, top_p the smallest set of
        most likely tokens whose probability reaches top_p (nucleus).
        stop_tokens: ids (e.g. EOS, BOS) after which a row stops; finished rows leave the batch.
        generator: a torch.Generator on the model's device, for reproducible sampling.
        Returns a list of B lists of new token ids, the stop token included when hit. To score
        prompt + response in one forward (as PPO does), pad the concatenations on the right: the
        causal forward is unaffected by padding that comes after a token.
        """
        prompts = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
        B, P = len(prompts), max(len(p) for p in prompts)
        budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
        for p, n in zip(prompts, budgets):
            if len(p) + n > self.params.max_seq_len:
                raise ValueError(
                    f"generate: prompt length {len(p)} + max_new_tokens {n} "
                    f"exceeds max_seq_len {self.params.max_seq_len}"
                )
        max_new_tokens = max(budgets)
        device = self.freqs_cos.device
        # left padding puts every row's next token in the same cache column
        tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
        pad = torch.tensor([P - len(p) for p in prompts], device=device) if min(map(len, prompts)) < P else None  # (B,)
        rows = torch.arange(B, device=device)  # the prompt each active row belongs to
        last_step = torch.tensor(budgets, device=device) - 1  # the step at which each row has used its budget
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)  # -1: not generated
        kv_cache = self.new_kv_cache(B, P + max_new_tokens)
        start = 0
        for step in range(max_new_tokens):
            logits = self.decode(tokens, pad, kv_cache, start)  # (n_active, vocab_size)
            next_token = sample(logits, temperature, top_k, top_p, generator)  # (n_active,)
            out[rows, step] = next_token
            start += tokens.size(1)
            tokens = next_token[:, None]
            done = torch.isin(next_token, stop) | (last_step[rows] == step)
            if done.any():
                # finished rows leave the batch: move the active rows' cache to the front, shrink the view
                keep = (~done).nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                kv_cache[:, :, : len(keep), :, :start] = kv_cache[:, :, keep, :, :start]
                kv_cache = kv_cache[:, :, : len(keep)]
                tokens, rows = tokens[keep], rows[keep]
                pad = None if pad is None else pad[keep]
        return [[t for t in row if t >= 0] for row in out.tolist()]


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab_size) -> next tokens (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        # nucleus: drop a token once the more likely ones already hold top_p of the mass
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # inverse CDF, as llama2.c's sampler: one uniform draw per row (torch.multinomial draws one per
    # vocabulary entry, a fifth of the time of 400 rollouts of the 260K model)
    cdf = probs.cumsum(-1)
    coin = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, coin, right=True).clamp(max=cdf.size(-1) - 1).squeeze(-1)

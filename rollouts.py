"""
Rollouts: responses sampled from the policy for a batch of prompts, scored by the task's reward, with
the log-probabilities of the policy that sampled them and of the frozen reference. Two engines sample
and score them, to the same distribution (tests/test_batch.py, tests/test_rl.py):

  torch  model.py's batched KV-cache generate(), then one forward pass of the policy and one of the
         reference over prompt + response (on a GPU, the only one)
  c      the C engine's batched generation (csrc/batch.c), whose sampler returns the log-probabilities
         of the tokens it draws, and its batched scoring of the reference (and of PPO's values' hidden
         states): the weights are read once a step for every sequence. The policy's current weights
         are copied into it before each batch, in memory (Engines.sync)

Either way the optimisation's ratio divides PyTorch's own log-probabilities of the current policy by
these, as TRL does when vLLM generates.
"""

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

ENGINES = ("auto", "c", "torch")


@dataclass
class Rollouts:
    """Sampled responses to a batch of prompts, scored. Row b: prompt_lens[b] prompt tokens, then the
    response; response-aligned tensors (B, R) hold position r of each row's response. Rows of a group
    (group_size samples of one prompt) stand together; the methods fill advantages (and returns)."""

    tokens: torch.Tensor  # (B, T) prompt + response, right-padded with 0
    prompt_lens: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, R) 1 on each response's tokens, its stop token included
    ended: torch.Tensor  # (B,) True where the response stopped by itself rather than at the length cap
    logprobs: torch.Tensor = None  # (B, R) log p of the response tokens under the sampling policy
    ref_logprobs: torch.Tensor = None  # (B, R) and under the reference
    values: Optional[torch.Tensor] = None  # (B, R) PPO's value head
    scores: torch.Tensor = None  # (B,) the task's reward
    token_scores: Optional[torch.Tensor] = None  # (B, R) the same spread over the tokens that earned it (tasks.py)
    advantages: Optional[torch.Tensor] = None  # (B,) or (B, R)
    returns: Optional[torch.Tensor] = None  # (B, R)
    group_size: int = 1

    def responses(self):
        """(B, R) the response tokens, 0 past each row's end."""
        idx = (self.prompt_lens[:, None] + torch.arange(self.mask.size(1), device=self.mask.device)).clamp(
            max=self.tokens.size(1) - 1
        )
        return self.tokens.gather(1, idx) * self.mask.long()

    def earned(self):
        """The scores where they were earned: token_scores (B, R) where the task spread them, else scores (B,)."""
        return self.scores if self.token_scores is None else self.token_scores

    def lengths(self):
        """Story tokens in each response: the stop token is the end of the story, not part of it."""
        return self.mask.sum(1) - self.ended.float()

    def row_lengths(self):
        """Tokens in each row: its prompt and response, the stop token included."""
        return self.prompt_lens + self.mask.sum(1).long()

    def rows(self, idx):
        """The rows idx, cut to their longest response."""
        R = int(self.mask[idx].sum(1).max())
        T = int((self.prompt_lens[idx] + R).max())
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                v = v[idx]
                v = v[:, :T] if f.name == "tokens" else v[:, :R] if v.dim() == 2 else v
            out[f.name] = v
        return replace(self, **out)


def collate(prompts, responses, stop_tokens, device):
    """Token lists of prompts and of their responses -> Rollouts with tokens, prompt_lens, mask, ended."""
    B, R = len(responses), max(len(r) for r in responses)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, : len(r)] = 1.0
    ended = torch.tensor([bool(r) and r[-1] in stop_tokens for r in responses])
    prompt_lens = torch.tensor([len(p) for p in prompts])
    return Rollouts(tokens.to(device), prompt_lens.to(device), mask.to(device), ended.to(device))


class Engines:
    """The C engine's copies of the policy and the reference (csrc/engine.py's Model, weights in memory), each
    of its own shape: sync() copies the policy's current weights in, in place (a millisecond for the default
    model)."""

    def __init__(self, policy_model, reference_model, lib=None):
        self.lib = lib
        self.policy, self.reference = engine_model(policy_model, lib), engine_model(reference_model, lib)

    def beside(self, policy_model):
        """Engines of another policy with this reference, the same copy (compare.py's several models)."""
        other = copy.copy(self)
        other.policy = engine_model(policy_model, self.lib)
        return other

    def sync(self, policy_model):
        self.policy.update(weights_of(policy_model))


def engine_model(model, lib=None):
    """A C engine Model holding a copy of a PyTorch model's weights."""
    from csrc import engine
    from export import llama2c_config

    return engine.Model.from_weights(llama2c_config(model), weights_of(model), lib=lib)


def weights_of(model):
    from export import llama2c_weights

    return llama2c_weights(model)


def choose_engine(name, device_type, model):
    """The rollout engine that --rollout_engine=name asks for: 'auto' is the C engine on a CPU where its
    library is built (make lib) and the model's rope and norm are llama2.c's, else PyTorch."""
    if name not in ENGINES:
        raise ValueError(f"rollout engine must be one of {', '.join(ENGINES)}, not {name!r}")
    if name == "torch" or (name == "auto" and device_type != "cpu"):
        return "torch"
    if device_type != "cpu":
        raise ValueError(f"--rollout_engine=c runs on the CPU only, not on {device_type}")
    try:
        from csrc import engine

        engine.load()
    except (ImportError, OSError) as e:
        if name == "c":
            raise ValueError(f"--rollout_engine=c: {e}") from None
        return "torch"
    if model.params.rope_theta != 10000.0 or model.params.norm_eps != 1e-5:
        if name == "c":
            raise ValueError("--rollout_engine=c: the C engine assumes rope_theta 10000 and norm_eps 1e-5")
        return "torch"
    return "c"


@torch.no_grad()
def rollout(
    policy,
    reference,
    prompts,
    score,
    cfg,
    generator,
    stop_tokens,
    ctx=nullcontext(),
    gen_ctx=nullcontext(),
    engines=None,
):
    """A response to each prompt (token lists), sampled in ONE batch, the log-probabilities of its tokens
    under the policy and the reference (and PPO's values), and score(rollouts) -> (B,): by PyTorch
    (batch_size rows a forward pass), or by the C engine where engines (Engines) are given. Returns the
    Rollouts and their timings."""
    t0 = time.perf_counter()
    device = policy.model.freqs_cos.device
    max_seq_len = policy.model.params.max_seq_len
    if engines is None:
        budgets = [min(cfg["max_new_tokens"], max_seq_len - len(p)) for p in prompts]  # the context's room
        with gen_ctx:
            responses = policy.model.generate(
                prompts, budgets, cfg["temperature"], stop_tokens=stop_tokens, generator=generator
            )
        batch = collate(prompts, responses, stop_tokens, device)
        t1 = time.perf_counter()
        torch_logprobs(batch, policy, reference, cfg, ctx)
    else:
        engines.sync(policy.model)
        seeds = torch.randint(1, 2**62, (len(prompts),), generator=generator).numpy().astype(np.uint64)
        values = policy.value_head is not None  # then the sampler's hidden states too: the value head's input
        out = engines.policy.generate(
            prompts, min(cfg["max_new_tokens"], max_seq_len - 1), cfg["temperature"], seeds, stop_tokens, hidden=values
        )
        responses, sampled, hidden = out if values else (*out, None)
        batch = collate(prompts, responses, stop_tokens, device)
        t1 = time.perf_counter()
        c_logprobs(batch, sampled, hidden, policy, engines, cfg)
    t2 = time.perf_counter()
    batch.scores = score(batch)
    return batch, {"time/rollout": t1 - t0, "time/forward_pass": t2 - t1, "time/score": time.perf_counter() - t2}


def torch_logprobs(batch, policy, reference, cfg, ctx):
    """Fills batch's logprobs, ref_logprobs and values from PyTorch's forward passes, batch_size rows at a time."""
    from rl import forward_logprobs

    logprobs, ref_logprobs, values = [], [], []
    for i in range(0, len(batch.tokens), cfg["batch_size"]):
        mb = batch.rows(torch.arange(i, min(i + cfg["batch_size"], len(batch.tokens)), device=batch.tokens.device))
        tokens = mb.responses()
        lengths = mb.row_lengths()
        lp, _, v = forward_logprobs(policy, mb.tokens, mb.prompt_lens, tokens, cfg["temperature"], ctx, lengths)
        ref_lp, _, _ = forward_logprobs(reference, mb.tokens, mb.prompt_lens, tokens, cfg["temperature"], ctx, lengths)
        pad = batch.mask.size(1) - tokens.size(1)
        logprobs.append(F.pad(lp, (0, pad)))
        ref_logprobs.append(F.pad(ref_lp, (0, pad)))
        values.append(None if v is None else F.pad(v, (0, pad)))
    batch.logprobs, batch.ref_logprobs = torch.cat(logprobs) * batch.mask, torch.cat(ref_logprobs) * batch.mask
    batch.values = None if values[0] is None else torch.cat(values) * batch.mask


def c_logprobs(batch, sampled, hidden, policy, engines, cfg):
    """Fills batch's logprobs (the sampler's own, sampled: token lists), ref_logprobs (the C engine's
    scoring of the reference) and PPO's values (its value head on the hidden states the sampler drew
    each token from, hidden: (n_b, dim) arrays, or None without a value head)."""
    B, R = batch.mask.shape
    logprobs = torch.zeros(B, R)
    for i, row in enumerate(sampled):
        logprobs[i, : len(row)] = torch.tensor(row)
    tokens = batch.tokens.cpu().numpy().astype(np.int32)
    lengths = batch.row_lengths().cpu().numpy()
    starts = batch.prompt_lens.cpu().numpy()
    at = (batch.prompt_lens[:, None] + torch.arange(R)).clamp(
        max=tokens.shape[1] - 1
    )  # (B, R): where row b's token r is
    ref = torch.from_numpy(engines.reference.score(tokens, lengths, starts, cfg["temperature"]))
    batch.logprobs, batch.ref_logprobs = logprobs * batch.mask, ref.gather(1, at) * batch.mask
    batch.values = None
    if hidden is not None:
        states = torch.zeros(B, R, policy.model.params.dim)
        for i, h in enumerate(hidden):
            states[i, : len(h)] = torch.from_numpy(h)
        batch.values = policy.value_head(states).squeeze(-1) * batch.mask


def rollout_stats(batch):
    """What every online method logs of its rollouts, with TRL PPOTrainer's names: the KL to the reference
    (k1, nats per response), the scores, the lengths, and the rollouts' per-token negative log-likelihood
    under the reference (fluency/nll; the loop divides it by the starting model's own, fluency/nll_ratio)."""
    lengths = batch.lengths()
    return {
        "objective/kl": (batch.logprobs - batch.ref_logprobs).sum(1).mean().item(),
        "env/reward_mean": batch.scores.mean().item(),
        "env/reward_std": batch.scores.std().item(),
        "env/ended_frac": batch.ended.float().mean().item(),
        "tokens/responses_len_mean": lengths.mean().item(),
        "tokens/responses_len_std": lengths.std().item(),
        "fluency/nll": -(batch.ref_logprobs.sum() / batch.mask.sum()).item(),
    }

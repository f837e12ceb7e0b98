"""
Reinforcement learning for the pretrained story model: what every method shares. Each method is one
small file: ppo.py (a value head and GAE), grpo.py (group-normalised advantages), rloo.py (the
leave-one-out baseline) and dpo.py (offline, on preference pairs). All start from out_dir/ckpt.pt:

    python train.py --rl=ppo                           # out/ckpt.pt -> out/ppo_ckpt.pt; later runs resume from it
    python train.py --rl=grpo --reward=rm --rm_path=out/rm.pt
    python train.py --ppo=True                         # the llama2.c PPO fork's switch: --rl=ppo
    torchrun --standalone --nproc_per_node=2 train.py --rl=rloo
    python report.py --checkpoint=out/grpo_ckpt.pt     # the starting model and the trained one, side by side

Here, in the order the data flows: the configuration the methods share; the policy, its
log-probabilities and masked statistics; prompts and batched rollouts; rewards; KL estimators,
penalties and controllers; one optimizer step with the pretraining-loss mix (PPO-ptx); evaluation
with the fluency metrics; and the training loop (set-up, resume, DDP, the log, checkpoints), which
calls the method's step() once an iteration.
"""
import ctypes
import math
import os
import re
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from common import (DataError, autocast, get_lr, init_ddp, jsonl_log, mean_over_ranks, one_line_errors, pyplot, rank_sums,
                    read_jsonl, resolve_device_dtype, save_atomic, save_figure, start_wandb)
from model import load_checkpoint, model_from_checkpoint
from prefs import END, distinct_n, judge, response_text
from reward_model import load_reward_model
from tinystories import iter_batches, load_text, resolve_tokenizer, token_dir
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# configuration: each method's keys are some of these groups plus its own. Keys train.py also has keep
# its names and meanings, so that its command lines (and the llama2.c PPO fork's) run unchanged;
# train.py's other keys are accepted and ignored (IGNORED).

RUN = dict(  # every method
    out_dir="out",  # starts from out_dir/ckpt.pt; writes, and resumes from, out_dir/{method}_ckpt.pt and {method}_log.jsonl
    init_from="resume",  # RL starts from a trained model: 'resume' is the only value
    eval_interval=10,  # evaluate and write the checkpoint every this many iterations, and at the end
    eval_prompts=64,  # held-out prompts of that evaluation (the first validation stories), one sample each
    seed=1337,
    data_dir="data",
    vocab_source="custom",  # 'custom' (data/tok{vocab_size}.model) or 'llama2'
    vocab_size=512,
    batch_size=8,  # rollouts (DPO: pairs) per minibatch, one optimizer step each
    max_iters=50,  # iterations
    learning_rate=1e-4,  # the fork's; pretraining's 1e-3 wrecks a trained policy
    weight_decay=0.0,  # decay would pull the weights toward 0, not toward the starting model
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0.0 = off
    decay_lr=False,  # constant, as the fork and TRL; True: train.py's warmup and cosine decay
    warmup_iters=0,
    lr_decay_iters=0,  # 0 = max_iters
    min_lr=0.0,  # 0.0 = learning_rate / 10
    device="auto",  # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # autocast of the forward passes and updates: 'auto', 'float32', 'bfloat16', 'float16'
    wandb_log=False,  # llama2.c's experiment-tracking keys: every row of {method}_log.jsonl also goes to W&B
    wandb_project="tinystories-rl",
    wandb_run_name="",  # empty: wandb names the run
    ptx_coef=0.0,  # PPO-ptx (InstructGPT): + ptx_coef x the pretraining loss at every optimizer step; 0 = off
    ptx_batch_size=8,  # windows of the model's context from the training token file, per optimizer step
)
SAMPLING = dict(  # every method: the rollouts and the evaluation's samples
    start_len=30,  # prompt = the first start_len tokens of a real story, BOS included (1 = BOS only)
    max_new_tokens=300,  # the response cap; lowered to what the model's context leaves after the prompt
    temperature=1.0,  # sampling temperature; the log-probs are those of the tempered distribution
)
REWARD = dict(  # every method: the online ones train on it, all are evaluated on it
    reward="length",  # 'length', 'rm', or a weighted sum such as 'length:1.0,rm:0.5'
    target_len=200,  # length: the target RESPONSE length in tokens (the fork also counted the prompt)
    missing_eos_penalty=1.0,  # subtracted from the score of a response cut off at max_new_tokens
    rm_path="out/rm.pt",  # rm: a reward model written by reward_model.py
)
ROLLOUTS = dict(  # the online methods: PPO, GRPO, RLOO
    prompt_split="train",  # where the training prompts come from (the evaluation's: always 'val')
    num_mini_batches=8,  # rollouts per iteration and rank = num_mini_batches * batch_size (the fork: 8 x 50)
    ppo_epochs=1,  # passes over an iteration's rollouts, in shuffled minibatches
    cliprange=0.2,  # the policy ratio stays within 1 +- cliprange
)
KL = dict(  # the online methods: the KL to the starting model (the reference)
    init_kl_coef=0.2,  # its coefficient (Ziegler's beta, GRPO's beta)
    adap_kl_ctrl=True,  # adapt the coefficient toward target_kl (Ziegler et al.); False: fixed
    target_kl=6.0,  # nats per response
    kl_horizon=10000,  # rollouts over which the controller closes a relative error of 1
    kl_estimator="k1",  # per token: 'k1' = log p/p_ref, 'k3' = r - 1 - log r with r = p_ref/p (both unbiased, k3 >= 0)
    kl_in="reward",  # 'reward': a per-token penalty in the rewards (Ziegler, TRL's PPO and RLOO); 'loss': a loss term (GRPO)
    kl_reduction="sum",  # a response's KL: 'sum' over its tokens, or 'mean' per token (a long story pays no more than a short one)
)
CHOICES = {"kl_estimator": ("k1", "k3"), "kl_in": ("reward", "loss"), "kl_reduction": ("sum", "mean")}
# train.py's keys that the RL stages accept and ignore: rl and ppo choose the method (train.py reads them), the
# model's shape is its checkpoint's, dropout is off (ratios and KL compare passes of one deterministic function),
# and pretraining's evaluation, saving and accumulation keys have no meaning here
IGNORED = ("rl", "ppo", "preset", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "dropout",
           "compile", "eval_iters", "eval_only", "log_interval", "always_save_checkpoint", "gradient_accumulation_steps")


# -----------------------------------------------------------------------------
# the policy, log-probabilities and masked statistics

class Policy(nn.Module):
    """A language model as a policy: forward(tokens (B, P+R), P) -> the logits (B, R, vocab_size) at the
    R positions that predict tokens[:, P:], in fp32 where the log-probability bookkeeping happens, and no
    values (ppo.py's policy adds a value head). The trunk runs in the caller's autocast."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, P):
        h = self.model.hidden(tokens[:, :-1])[:, P - 1:]  # (B, R, dim)
        with torch.autocast(h.device.type, enabled=False):
            return self.model.output(h.float()), None


def unwrap(policy):
    """The policy inside a DDP wrapper."""
    return policy.module if isinstance(policy, DDP) else policy


def log_softmax(logits, temperature):
    """logits (B, R, V) -> log-probabilities of the tempered distribution, in fp32 (at temperature 1,
    without a copy of the logits)."""
    logits = logits.float()
    return (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """logits (B, R, V), tokens (B, R) -> log p(token) (B, R) under the tempered distribution, in fp32."""
    return log_softmax(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)


def entropy_from_logprobs(logp):
    """log-probabilities (B, R, V) -> entropy of each position's distribution (B, R)."""
    return -(logp.exp() * logp).sum(-1)


def forward_logprobs(policy, tokens, P, temperature, ctx=nullcontext()):
    """One forward pass of a policy over tokens (B, P+R) -> log p of the response tokens (B, R), the
    log-probabilities of every token (B, R, V) and the values (B, R) or None."""
    with ctx:
        logits, values = policy(tokens, P)
    logp = log_softmax(logits, temperature)
    return logp.gather(-1, tokens[:, P:, None]).squeeze(-1), logp, values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask):
    """Unbiased variance over the entries where mask is 1."""
    n = mask.sum()
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask) * n / (n - 1)


def masked_whiten(x, mask, shift_mean=True):
    """x scaled to std 1 (and mean 0 if shift_mean) over the masked entries; 0 elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


# -----------------------------------------------------------------------------
# prompts and rollouts

def reuse_freed_memory():
    """Make glibc keep freed memory for reuse. By default it unmaps freed blocks of over 32 MB and trims
    the heap, so generation steps can page-fault their KV-cache-sized buffers back in every time: 400
    rollouts of 300 tokens from the 260K model took 27 s of CPU (11M page faults) instead of 10 s."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    except (OSError, AttributeError):  # not glibc
        pass


def story_starts(bin_path, bos_id, start_len):
    """The token file and the offsets of its stories that go on after their first start_len tokens:
    the prompts come from the very tokens pretraining saw."""
    if not os.path.exists(bin_path):
        raise DataError(f"no token file {bin_path}; run `python tinystories.py pretokenize` first")
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    starts = np.flatnonzero(data == bos_id)
    starts = starts[np.diff(np.append(starts, len(data))) > start_len]
    if len(starts) == 0:
        raise DataError(f"no story in {bin_path} is longer than --start_len={start_len} tokens")
    return data, starts


def prompts_at(data, starts, start_len, device):
    return torch.from_numpy(data[starts[:, None] + np.arange(start_len)].astype(np.int64)).to(device)  # (N, start_len)


def collate(prompts, responses, stop_tokens):
    """prompts (B, P) and the response token lists of generate() -> tokens (B, P+R), the responses
    right-padded with 0; mask (B, R), 1 on each response's tokens (its stop token included); and
    ended (B,), True where the response stopped by itself rather than at the length cap."""
    B, R = len(responses), max(len(r) for r in responses)
    padded = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R)
    for i, r in enumerate(responses):
        padded[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    ended = torch.tensor([r[-1] in stop_tokens for r in responses])
    device = prompts.device
    return torch.cat([prompts, padded.to(device)], 1), mask.to(device), ended.to(device)


def response_lengths(mask, ended):
    """Story tokens in each response: the stop token is the end of the story, not part of it."""
    return mask.sum(1) - ended.float()


@torch.no_grad()
def rollout(policy, reference, prompts, score_fn, cfg, generator, stop_tokens, ctx=nullcontext(), gen_ctx=nullcontext()):
    """A response to each prompt (prompts (B, P)) from ONE batched KV-cache generate() call, then a
    forward pass of the policy and one of the reference over prompt + response (batch_size rows at a
    time), and the scores. policy and reference are Policy-like (forward(tokens, P) -> logits, values);
    ctx is the autocast of the forward passes, gen_ctx that of generation. Returns the batch, a dict:
    tokens (B, P+R), mask (B, R), ended (B,), P, logprobs and ref_logprobs (B, R), values (B, R) or None,
    scores (B,); and timings."""
    t0 = time.perf_counter()
    with gen_ctx:
        responses = policy.model.generate(prompts, cfg["max_new_tokens"], cfg["temperature"], stop_tokens=stop_tokens,
                                          generator=generator)
    tokens, mask, ended = collate(prompts, responses, stop_tokens)
    P = prompts.size(1)
    t1 = time.perf_counter()
    logprobs, ref_logprobs, values = [], [], []
    for i in range(0, len(tokens), cfg["batch_size"]):
        chunk = tokens[i:i + cfg["batch_size"]]
        with ctx:
            logits, v = policy(chunk, P)
            ref_logits, _ = reference(chunk, P)
        logprobs.append(logprobs_from_logits(logits, chunk[:, P:], cfg["temperature"]))
        ref_logprobs.append(logprobs_from_logits(ref_logits, chunk[:, P:], cfg["temperature"]))
        values.append(v)
    logprobs, ref_logprobs = torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask
    values = None if values[0] is None else torch.cat(values) * mask
    t2 = time.perf_counter()
    scores = score_fn(tokens, mask, ended)  # (B,)
    batch = dict(tokens=tokens, mask=mask, ended=ended, P=P, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                 scores=scores)
    return batch, {"time/rollout": t1 - t0, "time/forward_pass": t2 - t1, "time/score": time.perf_counter() - t2}


def rollout_stats(batch):
    """What every online method logs of its rollouts, with TRL PPOTrainer's names: the KL to the reference
    (k1, nats per response), the scores, the lengths, and the rollouts' per-token negative log-likelihood
    under the reference (fluency/nll; the loop divides it by the starting model's own, fluency/nll_ratio)."""
    m, lengths = batch["mask"], response_lengths(batch["mask"], batch["ended"])
    return {"objective/kl": (batch["logprobs"] - batch["ref_logprobs"]).sum(1).mean().item(),
            "env/reward_mean": batch["scores"].mean().item(), "env/reward_std": batch["scores"].std().item(),
            "env/ended_frac": batch["ended"].float().mean().item(),
            "tokens/responses_len_mean": lengths.mean().item(), "tokens/responses_len_std": lengths.std().item(),
            "fluency/nll": -(batch["ref_logprobs"].sum() / m.sum()).item()}


def minibatches(batch, batch_size, epochs, generator):
    """epochs passes over the rollouts of batch in shuffled minibatches of batch_size rows (generator: a
    CPU torch.Generator). Yields (epoch, minibatch): the rows' tensors, cut to their longest response."""
    B, P = len(batch["tokens"]), batch["P"]
    for epoch in range(epochs):
        order = torch.randperm(B, generator=generator).to(batch["tokens"].device)
        for start in range(0, B, batch_size):
            idx = order[start:start + batch_size]
            R = int(batch["mask"][idx].sum(1).max())  # no wasted padding
            mb = {k: v[idx, :R] if torch.is_tensor(v) and v.dim() == 2 else v[idx] if torch.is_tensor(v) else v
                  for k, v in batch.items() if k != "tokens"}
            yield epoch, {**mb, "tokens": batch["tokens"][idx, :P + R]}


# -----------------------------------------------------------------------------
# rewards

def length_reward(lengths, target_len):
    """0 at the target response length, falling linearly by 1 per target_len tokens of distance either way."""
    return -(lengths - target_len).abs() / target_len


def parse_reward(spec):
    """'length', 'rm' or 'length:1.0,rm:0.5' -> {name: weight}."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.partition(":")
        if name not in ("length", "rm"):
            raise ValueError(f"--reward={spec}: unknown reward {name!r}; use length, rm or a sum like length:1.0,rm:0.5")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward={spec}: {weight!r} is not a weight") from None
    return weights


@torch.no_grad()
def score_rollouts(tokens, mask, ended, P, weights, target_len, missing_eos_penalty, reward_model=None, chunk=64, ctx=nullcontext()):
    """The scalar score of each rollout (B,): the weighted rewards, minus missing_eos_penalty where the
    response was cut off instead of ending its story."""
    score = torch.zeros(len(tokens), device=tokens.device)
    if "length" in weights:
        score += weights["length"] * length_reward(response_lengths(mask, ended), target_len)
    if "rm" in weights:
        lengths = P + mask.sum(1).long()  # real tokens, from BOS to the stop token
        with ctx:
            rm = torch.cat([reward_model.score(tokens[i:i + chunk], lengths[i:i + chunk]) for i in range(0, len(tokens), chunk)])
        score += weights["rm"] * rm.float()
    return score - missing_eos_penalty * (~ended).float()


def whiten_scores(scores):
    """Reward normalisation: the batch's scores at mean 0 and std 1, so that the KL coefficient means the
    same whatever the reward's scale."""
    return (scores - scores.mean()) / (scores.std() + 1e-8)


# -----------------------------------------------------------------------------
# KL to the reference: estimators, penalties, controllers

def kl_estimate(logprobs, ref_logprobs, estimator):
    """Per-token estimates (B, R) of KL(policy || reference) from tokens the policy sampled (Schulman 2020,
    "Approximating KL divergence"): k1 = log p - log p_ref, unbiased but often negative; k3 = (r - 1) - log r
    with r = p_ref / p, unbiased too and never negative, with less variance where the two are close."""
    log_ratio = logprobs - ref_logprobs
    return log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio


def kl_penalty(kl, mask, reduction):
    """Per-token KL (B, R) -> the share each token carries of its response's KL: all of its own ('sum': a
    response's total is the sum over its tokens, Ziegler et al.) or that divided by the response's length
    ('mean': the total is the mean per token, so a long story pays no more than a short one)."""
    kl = kl * mask
    return kl if reduction == "sum" else kl / mask.sum(1, keepdim=True)


def kl_loss(logprobs, ref_logprobs, mask, cfg):
    """The KL term of a loss (kl_in='loss'): the responses' KL to the reference by kl_estimator and
    kl_reduction, averaged over responses, differentiable through logprobs (B, R). Note that k1's expected
    gradient on the policy's own samples is zero: in a loss it needs k3 (GRPO's choice)."""
    return kl_penalty(kl_estimate(logprobs, ref_logprobs, cfg["kl_estimator"]), mask, cfg["kl_reduction"]).sum(1).mean()


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: a proportional controller on log(kl_coef), the error clipped to
    +-0.2, that steers the KL per response toward target over about horizon rollouts."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current, n_steps):
        pass


def kl_controller(cfg):
    if cfg["adap_kl_ctrl"]:
        return AdaptiveKLController(cfg["init_kl_coef"], cfg["target_kl"], cfg["kl_horizon"])
    return FixedKLController(cfg["init_kl_coef"])


# -----------------------------------------------------------------------------
# one optimizer step, with the pretraining loss mixed in (PPO-ptx)

def ptx_backward(policy, ptx_batches, coef, ctx, scaler):
    """PPO-ptx (Ouyang et al. 2022): backpropagate coef x the pretraining loss (the mean next-token
    cross-entropy) on the next (X, Y) batch of windows of the training token file; returns the loss.
    Called before the step's RL forward, so that under DDP these gradients wait (no_sync) and are
    all-reduced once, with the RL loss's."""
    X, Y = next(ptx_batches)
    with policy.no_sync() if isinstance(policy, DDP) else nullcontext():
        with ctx:
            logits, _ = policy(torch.cat([X, Y[:, -1:]], 1), 1)  # (B, T, V): the predictions of Y
        loss = F.cross_entropy(logits.flatten(0, 1), Y.flatten())
        scaler.scale(coef * loss).backward()
    return loss.detach()


def optimizer_step(policy, optimizer, loss_fn, cfg, scaler, ptx_batches=None, ctx=nullcontext()):
    """One optimizer step: the PPO-ptx gradients first (if ptx_batches), then loss_fn() -> (loss, stats)
    and its gradients, clipped at grad_clip. Returns the stats as floats, with ptx/loss."""
    optimizer.zero_grad(set_to_none=True)
    ptx = None if ptx_batches is None else ptx_backward(policy, ptx_batches, cfg["ptx_coef"], ctx, scaler)
    loss, stats = loss_fn()
    scaler.scale(loss).backward()
    if cfg["grad_clip"] != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    stats = {**stats, **({} if ptx is None else {"ptx/loss": ptx})}
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in stats.items()}


def update(policy, optimizer, batch, kl_coef, cfg, shuffle, policy_loss, ctx=nullcontext(), scaler=None, ptx_batches=None,
           stop=None):
    """The optimisation of an online method: ppo_epochs passes over the rollouts of batch in shuffled
    minibatches of batch_size, one optimizer_step() each. policy_loss(mb, logprobs, logp, values) ->
    (loss, stats) gets a minibatch and one forward pass of the policy over it: log p of its response
    tokens (b, R), every log-probability (b, R, V) and PPO's values. With kl_in='loss', kl_coef x the KL
    term joins the loss (logged as loss/kl). stop(stats) -> True ends the passes early. Returns the mean
    statistics and the number of epochs run."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # float16 needs a real one; disabled it is a pass-through
    steps, epochs = [], 0
    for epoch, mb in minibatches(batch, cfg["batch_size"], cfg["ppo_epochs"], shuffle):
        def loss_fn():
            logprobs, logp, values = forward_logprobs(policy, mb["tokens"], mb["P"], cfg["temperature"], ctx)
            loss, stats = policy_loss(mb, logprobs, logp, values)
            if cfg["kl_in"] == "loss":
                stats["loss/kl"] = kl_loss(logprobs, mb["ref_logprobs"], mb["mask"], cfg)
                loss = loss + kl_coef * stats["loss/kl"]
            return loss, stats
        steps.append(optimizer_step(policy, optimizer, loss_fn, cfg, scaler, ptx_batches, ctx))
        epochs = epoch + 1
        if stop is not None and stop(steps[-1]):
            break
    return mean_stats(steps), epochs


def mean_stats(steps):
    """The mean of each statistic over a list of {name: float}."""
    return {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}


def check_group_size(run):
    """The set-up check of the methods that sample group_size responses to each prompt (GRPO, RLOO)."""
    cfg = run.cfg
    rollouts = cfg["num_mini_batches"] * cfg["batch_size"]
    if cfg["group_size"] < 2 or rollouts % cfg["group_size"]:
        raise DataError(f"--group_size={cfg['group_size']} must be at least 2 and divide the {rollouts} rollouts "
                        "of an iteration (num_mini_batches x batch_size)")


# -----------------------------------------------------------------------------
# evaluation: samples on held-out prompts, and the fluency metrics

def letter_words(text):
    """The words of a text, letters only, lower-cased: 'Lily's 2 cats!' -> ['lily', 's', 'cats']."""
    return re.findall(r"[^\W\d_]+", text.lower())


def training_words(data_dir):
    """Every word (letters only, lower-cased) of the training text: the vocabulary of fluent stories."""
    return {w for story in load_text(data_dir, "train") for w in letter_words(story)}


def word_share(texts, vocabulary):
    """The share of the texts' words that occur in vocabulary (made-up words and byte soup do not)."""
    found = [w in vocabulary for t in texts for w in letter_words(t)]
    return sum(found) / len(found) if found else 0.0


@torch.no_grad()
def val_perplexity(model, bin_path, windows, seed, batch_size=16, ctx=nullcontext()):
    """exp of the mean token cross-entropy over the same `windows` random windows of a token file."""
    stream = iter_batches(bin_path, batch_size, model.params.max_seq_len, str(model.freqs_cos.device), seed=seed)
    losses = []
    for _ in range(max(1, windows // batch_size)):
        with ctx:
            losses.append(model(*next(stream))[1].item())
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def evaluate(model, reference, prompts, cfg, tok, seed, vocabulary, score_fn=None, ref_nll=None, ctx=nullcontext()):
    """One sample per prompt (prompts (N, P)) from model (a Transformer), from a generator seeded with seed,
    so that two models draw from the same random stream, and its metrics against reference:
      len_mean, len_std, ended (share that ended by themselves), within_10pct (share within 10% of
          target_len, if cfg has one), score (if score_fn)
      kl        KL(model || reference), nats per response: the sum of log p - log p_ref over the samples
      nll       mean per-token negative log-likelihood of the responses under the reference; nll_ratio =
                nll / ref_nll, with ref_nll that of the reference's own samples on the same prompts:
                1.0 = as plausible as before (a fluency measure)
      word_share share of the responses' words (letters only, lower-cased) found in the training text
      distinct_1, distinct_2, judge (prefs.py's judge: ending, no loops, substance, the prompt's names)
    Returns the metrics and the samples: responses (token lists, stop token included) and texts."""
    generator = torch.Generator(prompts.device).manual_seed(seed)
    batch, _ = rollout(Policy(model), Policy(reference), prompts, score_fn or (lambda t, m, e: torch.zeros(len(t), device=t.device)), cfg,
                       generator, (tok.bos_id, tok.eos_id), ctx)
    mask, P = batch["mask"], batch["P"]
    lengths = response_lengths(mask, batch["ended"])
    responses = [batch["tokens"][i, P:P + int(n)].tolist() for i, n in enumerate(mask.sum(1))]
    prompt_ids = prompts.tolist()
    texts = [response_text(tok, p, r) for p, r in zip(prompt_ids, responses)]
    bodies = [t.removesuffix(END) for t in texts]
    m = {"len_mean": lengths.mean().item(), "len_std": lengths.std().item(), "ended": batch["ended"].float().mean().item()}
    if "target_len" in cfg:
        m["within_10pct"] = ((lengths - cfg["target_len"]).abs() <= 0.1 * cfg["target_len"]).float().mean().item()
    if score_fn:
        m["score"] = batch["scores"].mean().item()
    m["kl"] = (batch["logprobs"] - batch["ref_logprobs"]).sum(1).mean().item()
    m["nll"] = -(batch["ref_logprobs"].sum() / mask.sum()).item()
    if ref_nll:
        m["nll_ratio"] = m["nll"] / ref_nll
    m["word_share"] = word_share(bodies, vocabulary)
    m["distinct_1"], m["distinct_2"] = distinct_n(bodies, 1), distinct_n(bodies, 2)
    m["judge"] = float(np.mean([judge(tok.decode(p[1:]), t) for p, t in zip(prompt_ids, texts)]))
    return m, {"responses": responses, "texts": texts}


# -----------------------------------------------------------------------------
# the training loop every method shares

def setup(cfg, method, make_policy):
    """Everything a method's iterations need, in one namespace: the device and DDP, the tokenizer, the
    policy (make_policy(model)) and the frozen reference, from out_dir/ckpt.pt or, resuming, from
    out_dir/{method}_ckpt.pt, the optimizer, the KL controller, the reward, the prompts. Bad input
    raises DataError or ValueError: the command line shows it as one line."""
    if cfg["init_from"] != "resume":
        raise DataError(f"RL starts from a trained model (out_dir/ckpt.pt): --init_from must be 'resume' or left out, not {cfg['init_from']!r}")
    for key, choices in CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise DataError(f"--{key} must be one of {', '.join(choices)}, not {cfg[key]!r}")
    if cfg["temperature"] <= 0:
        raise DataError(f"RL samples: --temperature must be > 0, not {cfg['temperature']}")
    reuse_freed_memory()
    device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
    ddp, rank, local_rank, world_size, device = init_ddp(device, device_type)
    ctx = autocast(device_type, dtype)
    # decoding a small model on a CPU is overhead-bound: autocast's casts cost more than bf16 saves
    # (bench/ppo_speed.py, 400 rollouts of 260K: 1.4x), so only GPUs generate under autocast
    gen_ctx = ctx if device_type == "cuda" else nullcontext()

    vocab_size = cfg["vocab_size"]
    tok = Tokenizer(resolve_tokenizer(cfg["data_dir"], 0 if cfg["vocab_source"] == "llama2" else vocab_size))
    bin_dir = token_dir(cfg["data_dir"], vocab_size)
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, f"{method}_ckpt.pt")
    resuming = os.path.exists(ckpt_path)
    path = ckpt_path if resuming else os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, device)
    if resuming and not {"reference", "optimizer", "heads", "kl_coef"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint written by {method}.py")
    if ckpt["model_args"]["vocab_size"] != vocab_size:
        raise DataError(f"{path} has vocab_size {ckpt['model_args']['vocab_size']}, not --vocab_size={vocab_size}")
    model_args = {**ckpt["model_args"], "dropout": 0.0}  # dropout off: the ratios and the KL compare passes of one function
    policy = make_policy(model_from_checkpoint({**ckpt, "model_args": model_args}))
    for name, state in ckpt.get("heads", {}).items():  # ppo.py's value head
        getattr(policy, name).load_state_dict(state)
    reference = Policy(model_from_checkpoint({"model": ckpt["reference" if resuming else "model"], "model_args": model_args}))
    policy.to(device).eval()  # eval: no dropout
    reference.to(device).eval().requires_grad_(False)

    max_new = min(cfg["max_new_tokens"], model_args["max_seq_len"] - cfg["start_len"])
    if max_new < 1:
        raise DataError(f"--start_len={cfg['start_len']} leaves no room in the model's context of {model_args['max_seq_len']}")
    weights = parse_reward(cfg["reward"])
    if "length" in weights and cfg["target_len"] >= max_new:
        raise DataError(f"--target_len={cfg['target_len']} is not below the response cap of {max_new} tokens")
    cfg = {**cfg, "max_new_tokens": max_new}
    reward_model = load_reward_model(cfg["rm_path"], device) if "rm" in weights else None

    def score_fn(tokens, mask, ended):
        return score_rollouts(tokens, mask, ended, cfg["start_len"], weights, cfg["target_len"], cfg["missing_eos_penalty"],
                              reward_model, cfg["batch_size"], ctx)

    # the online methods' prompts; the evaluation's, from the validation split
    prompt_data = story_starts(os.path.join(bin_dir, f"{cfg['prompt_split']}.bin"), tok.bos_id, cfg["start_len"]) \
        if "prompt_split" in cfg else None
    val_data, val_starts = story_starts(os.path.join(bin_dir, "val.bin"), tok.bos_id, cfg["start_len"])
    eval_prompts = prompts_at(val_data, val_starts[:cfg["eval_prompts"]], cfg["start_len"], device)

    optimizer = make_optimizer(policy, cfg, device_type)
    kl_ctl = kl_controller(cfg) if "init_kl_coef" in cfg else None
    iter_num = 0
    if resuming:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num = ckpt["iter_num"]
        if kl_ctl:
            kl_ctl.value = ckpt["kl_coef"]
    return SimpleNamespace(
        cfg=cfg, method=method, device=device, device_type=device_type, dtype=dtype, ctx=ctx, gen_ctx=gen_ctx,
        ddp=ddp, rank=rank, world_size=world_size, master=rank == 0, tok=tok, stop_tokens=(tok.bos_id, tok.eos_id),
        policy=policy, train_policy=DDP(policy, device_ids=[local_rank] if device_type == "cuda" else None) if ddp else policy,
        reference=reference, model_args=model_args, optimizer=optimizer, kl_ctl=kl_ctl, iter_num=iter_num,
        scaler=torch.amp.GradScaler(device_type, enabled=dtype == "float16"), score=score_fn, prompt_data=prompt_data,
        eval_prompts=eval_prompts, train_bin=os.path.join(bin_dir, "train.bin"), val_bin=os.path.join(bin_dir, "val.bin"),
        resuming=resuming, start_path=path, ckpt_path=ckpt_path, log_path=os.path.join(out_dir, f"{method}_log.jsonl"),
        source={k: ckpt[k] for k in ("tokenizer", "best_val_loss") if k in ckpt})


def make_optimizer(policy, cfg, device_type):
    """AdamW over the policy: the model's groups (decay on matrices only) and its heads, undecayed."""
    optimizer = policy.model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type)
    heads = [p for name, p in policy.named_parameters() if not name.startswith("model.")]
    if heads:
        optimizer.add_param_group({"params": heads, "weight_decay": 0.0})
    return optimizer


def ptx_batches(run, rng):
    """This iteration's stream of pretraining windows for PPO-ptx (their draws follow from rng)."""
    return iter_batches(run.train_bin, run.cfg["ptx_batch_size"], run.model_args["max_seq_len"], run.device,
                        seed=int(rng.integers(2**31)), rank=run.rank)


def online_step(run, rng, iteration, group_size=1):
    """One iteration of an online method: num_mini_batches * batch_size rollouts on fresh training prompts
    (each prompt group_size times in a row), through the method's iteration(). Returns its stats, with
    rollout_stats(), and the rollouts' tokens."""
    cfg = run.cfg
    generator = torch.Generator(run.device).manual_seed(int(rng.integers(2**62)))
    shuffle = torch.Generator().manual_seed(int(rng.integers(2**62)))
    data, starts = run.prompt_data
    n = cfg["num_mini_batches"] * cfg["batch_size"] // group_size
    prompts = prompts_at(data, starts[rng.integers(len(starts), size=n)], cfg["start_len"], run.device)
    ptx = ptx_batches(run, rng) if cfg["ptx_coef"] else None
    batch, stats = iteration(run.train_policy, run.reference, run.optimizer, prompts, run.score, run.kl_ctl.value, cfg,
                             generator, shuffle, run.stop_tokens, run.ctx, run.gen_ctx, run.scaler, run.ddp, ptx)
    return {**rollout_stats(batch), **stats}, batch["tokens"]


def evaluate_run(run, model, ref_nll=None):
    """evaluate() on the run's held-out prompts, and the validation perplexity: the 'eval/' columns of the log."""
    m, _ = evaluate(model, run.reference.model, run.eval_prompts, run.cfg, run.tok, run.cfg["seed"], run.vocabulary,
                    run.score, ref_nll, run.ctx)
    m["val_ppl"] = val_perplexity(model, run.val_bin, 32, run.cfg["seed"], ctx=run.ctx)
    return {f"eval/{k}": v for k, v in m.items()}


def save(run):
    heads = {name: module.state_dict() for name, module in run.policy.named_children() if name != "model"}
    with one_line_errors():  # e.g. a full disk: one line, and the earlier checkpoint stays
        save_atomic({"model": run.policy.model.state_dict(), "model_args": run.model_args, "iter_num": run.iter_num,
                     "config": run.cfg, **run.source, "method": run.method, "optimizer": run.optimizer.state_dict(),
                     "heads": heads, "kl_coef": run.kl_ctl.value if run.kl_ctl else None,
                     "reference": run.reference.model.state_dict()}, run.ckpt_path)
        plot_log(run.log_path, os.path.splitext(run.log_path)[0] + ".png", run.cfg.get("target_len"))


def plot_log(log_path, png_path, target_len=None):
    """Four panels against episodes (rollouts, or DPO's pairs): score, KL, length and fluency, from the
    training batches (lines) and the held-out evaluations (dots)."""
    rows = read_jsonl(log_path)
    evals = [r for r in rows if "eval/kl" in r]
    fig, axes = pyplot().subplots(1, 4, figsize=(16, 3.6))
    panels = (("env/reward_mean", "eval/score", "score"), ("objective/kl", "eval/kl", "KL to the start (nats/response)"),
              ("tokens/responses_len_mean", "eval/len_mean", "response length (tokens)"),
              ("fluency/nll_ratio", "eval/nll_ratio", "NLL ratio (1 = as fluent as the start)"))
    for ax, (train_key, eval_key, title) in zip(axes, panels):
        steps = [r for r in rows if train_key in r]
        ax.plot([r["episode"] for r in steps], [r[train_key] for r in steps], "-", alpha=0.6, label="training batches")
        ax.plot([r["episode"] for r in evals if eval_key in r], [r[eval_key] for r in evals if eval_key in r], "o-", ms=3,
                label="held-out prompts")
        ax.set_xlabel("episodes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if target_len:
        axes[2].axhline(target_len, color="k", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    save_figure(fig, png_path)


def train(cfg, method, make_policy, step, prepare=None):
    """The loop every method shares. make_policy(model) -> the module to train (its children other than
    .model, such as PPO's value head, are saved as 'heads'); prepare(run), if given, adds the method's own
    set-up (DPO's pairs); step(run, rng) -> (stats, the iteration's data tensor) is one iteration, every
    random draw of which comes from rng, seeded by (seed, rank, iteration): a resumed run continues the
    same streams. Every eval_interval iterations, rank 0 evaluates on held-out prompts and writes the
    checkpoint; every iteration's statistics (the mean over ranks) go to {method}_log.jsonl."""
    with one_line_errors():
        run = setup(cfg, method, make_policy)
        if prepare:
            prepare(run)
        run.vocabulary = training_words(cfg["data_dir"]) if run.rank == 0 else None
        wandb_run = start_wandb(run.cfg, cfg["out_dir"]) if run.rank == 0 else None
    cfg = run.cfg
    episodes = cfg["batch_size"] * cfg.get("num_mini_batches", 1) * run.world_size  # rollouts (DPO: pairs) per iteration
    log = jsonl_log(run.log_path, run.iter_num if run.resuming else None, run.master, wandb_run)
    if run.master:
        print(f"{method.upper()} from {run.start_path} at iteration {run.iter_num}: {episodes} "
              f"{'pairs' if method == 'dpo' else 'rollouts'} per iteration, reward {cfg['reward']}, {run.dtype}")
        # the starting model's own samples: the baseline of the fluency ratio, and the curves' first point
        start = evaluate_run(run, run.reference.model)
        run.ref_nll = start["eval/nll"]
        if not run.resuming:
            log({"iter": 0, "episode": 0, **start, "eval/nll_ratio": 1.0})
    bar = tqdm(total=cfg["max_iters"], initial=run.iter_num, disable=not run.master, unit="it", dynamic_ncols=True)
    while run.iter_num < cfg["max_iters"]:
        t0 = time.perf_counter()
        lr = get_lr(run.iter_num, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        stats, data = step(run, np.random.default_rng([cfg["seed"], run.rank, run.iter_num]))
        stats = {**stats, "time/total": time.perf_counter() - t0, "learning_rate": lr}
        if run.kl_ctl:
            stats["objective/kl_coef"] = run.kl_ctl.value
        if run.ddp:  # the mean over ranks, so that the controller and the log see every rank's data
            stats = {**mean_over_ranks(stats, run.device), **rank_sums(run.policy, data)}
        if run.kl_ctl:
            run.kl_ctl.update(stats["objective/kl"], episodes)
        run.iter_num += 1
        bar.update(1)
        if not run.master:
            continue
        row = {"iter": run.iter_num, "episode": run.iter_num * episodes, **stats}
        if "fluency/nll" in row:
            row["fluency/nll_ratio"] = row["fluency/nll"] / run.ref_nll
        if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num == cfg["max_iters"]:
            row.update(evaluate_run(run, run.policy.model, run.ref_nll))
        log(row)
        if "eval/kl" in row:
            save(run)
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in ("env/reward_mean", "loss", "objective/kl",
                                                                      "tokens/responses_len_mean") if k in row})
    bar.close()
    if run.ddp:
        dist.destroy_process_group()


def main(argv, config, method, make_policy, step, prepare=None):
    """A method's command line: its config with the --key=value arguments (train.py's other keys ignored), then train()."""
    train(configurator.configure(config, argv, ignored=IGNORED), method, make_policy, step, prepare)

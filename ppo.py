"""
PPO for the pretrained story model: the reinforcement-learning stage of RLHF, as in Ziegler et al.
2019 ("Fine-Tuning Language Models from Human Preferences") and TRL's PPOTrainer, whose log names
it keeps. A stage of train.py, with the same --key=value command lines plus PPO's keys:

    python train.py --init_from=resume --ppo=True      # out_dir/ckpt.pt -> out_dir/ppo_ckpt.pt
    python ppo.py --reward=length --target_len=150     # the same, called directly
    python ppo.py --reward=length:1.0,rm:0.5 --rm_path=out/rm.pt
    python ppo.py --report=True                        # reports/ppo_length.md: before vs after
    torchrun --standalone --nproc_per_node=2 train.py --init_from=resume --ppo=True

The first run starts from out_dir/ckpt.pt; later runs resume from out_dir/ppo_ckpt.pt (policy, value
head, reference, optimizer, KL coefficient, iteration; the random streams follow from seed, rank and
iteration). One iteration, with the llama2.c PPO fork's meanings of the keys:
  1. rollouts: num_mini_batches * batch_size prompts per rank (8 x 50 = 400 in the fork's runs), the
     first start_len tokens of real stories, answered in ONE batched KV-cache generate() call. A row
     stops at the end of its story (BOS, as in the token files, or EOS); all after it is masked.
  2. forward pass: the policy (log-probs and values from one trunk) and the frozen reference over the
     right-padded prompt + response.
  3. rewards: the score at the last response token, -kl_coef * (log p - log p_ref) at every response
     token; GAE advantages (gamma, lam), whitened.
  4. optimisation: ppo_epochs passes over the rollouts in shuffled minibatches of batch_size, one AdamW
     step each (the fork: 4 epochs x 8 minibatches of 50).

The value head is a Linear(dim, 1) on the policy's own final hidden state: the trunk is shared, so one
forward gives log-probs and values. It starts at zero (weights and bias), so the first values are 0
rather than random: early value-loss gradients then carry the returns, not noise, into the shared trunk.

The length reward counts the response's story tokens only (the fork also counted the prompt), and a
response cut off at max_new_tokens pays missing_eos_penalty (the fork had none). Measured on a 260K
model: with a KL penalty (init_kl_coef=0.2), its sum over a long story outweighs the length score, so
PPO keeps shortening stories past the target; the fork's --init_kl_coef=0.0 settles on it.
"""
import copy
import ctypes
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from common import (DataError, atomic_open, autocast, get_lr, init_ddp, jsonl_log, mean_over_ranks, one_line_errors, pyplot,
                    rank_sums, read_jsonl, resolve_device_dtype, save_atomic, save_figure, start_wandb)
from model import load_checkpoint, model_from_checkpoint
from tinystories import resolve_tokenizer, token_dir
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: the keys PPO reads, with train.py's names, so that its command lines (and the llama2.c PPO
# fork's) run unchanged; train.py's other keys are accepted and ignored (IGNORED below).
# I/O
out_dir = "out"  # starts from out_dir/ckpt.pt, writes and resumes from out_dir/ppo_ckpt.pt
eval_interval = 10  # write ppo_ckpt.pt and ppo_log.png every this many iterations, and at the end
init_from = "resume"  # RL starts from a pretrained model
seed = 1337
# data
data_dir = "data"
vocab_source = "custom"
vocab_size = 512
batch_size = 32  # rollouts per minibatch
# adamw optimizer
learning_rate = 1e-4  # the fork's; pretraining's 1e-3 wrecks a pretrained policy
max_iters = 1100  # PPO iterations
weight_decay = 0.0  # decay would pull the weights toward 0, not toward the reference
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
decay_lr = False  # constant, as the fork and TRL
warmup_iters = 100  # with decay_lr
lr_decay_iters = 0  # 0 = max_iters
min_lr = 0.0  # 0.0 = learning_rate / 10
# system
device = "auto"
dtype = "auto"
# experiment tracking (llama2.c's keys): every row of ppo_log.jsonl also goes to Weights & Biases
wandb_log = False
wandb_project = "tinystories-rl"
wandb_run_name = ""  # empty: wandb names the run
# rollouts
ppo = True  # train.py hands over to this file when --ppo=True
start_len = 30  # prompt = the first start_len tokens of a real story (1 = BOS only)
prompt_split = "train"  # where the training prompts come from; the report uses held-out 'val' stories
num_mini_batches = 8  # rollouts per iteration and rank = num_mini_batches * batch_size
max_new_tokens = 300  # the response cap; lowered if the prompt and it do not fit the context
temperature = 1.0  # sampling temperature; the log-probs are those of the tempered distribution
# rewards
reward = "length"  # 'length', 'rm', or a weighted sum such as 'length:1.0,rm:0.5'
target_len = 200  # length: the target RESPONSE length in tokens (the fork also counted the prompt)
missing_eos_penalty = 1.0  # subtracted from the score of a response cut off at max_new_tokens
rm_path = "out/rm.pt"  # rm: a reward model written by `python reward_model.py train`
init_kl_coef = 0.2  # coefficient of the per-token KL penalty against the reference
adap_kl_ctrl = True  # adapt the coefficient toward target_kl (Ziegler et al.); False: fixed
target_kl = 6.0  # nats per response
kl_horizon = 10000  # rollouts over which the controller closes a relative error of 1
# PPO
ppo_epochs = 4
gamma = 1.0  # GAE discount
lam = 0.95  # GAE lambda
cliprange = 0.2  # policy ratio clip
cliprange_value = 0.2  # value clip, around the values of the forward pass
vf_coef = 0.1  # value loss coefficient
ent_coef = 0.0  # entropy bonus coefficient
whiten_rewards = False  # whiten the per-token rewards before GAE (the advantages always are)
early_stop_kl = 0.0  # stop an iteration's epochs once a minibatch's approx KL exceeds this; 0 = never
# report
report = False  # evaluate the starting and the PPO model on held-out prompts -> report_path
report_prompts = 200  # validation stories for the report
report_path = "reports/ppo_length.md"  # and its histogram beside it, .png
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# train.py's keys that PPO accepts and ignores: the shape (the checkpoint's), dropout (off: PPO's ratios
# compare two passes of the same function), and pretraining's evaluation, saving and batching keys
IGNORED = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "dropout", "compile",
           "eval_iters", "eval_only", "log_interval", "always_save_checkpoint", "gradient_accumulation_steps")
# -----------------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.params.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens, P):
        """tokens (B, P+R): prompts of P tokens, then responses -> logits (B, R, vocab_size) and values
        (B, R) at the R positions that predict the response tokens. The trunk runs in the caller's
        autocast; both heads in fp32, where the log-probability bookkeeping happens."""
        h = self.model.hidden(tokens[:, :-1])[:, P - 1:]  # (B, R, dim)
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            return self.model.output(h), self.value_head(h).squeeze(-1)


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
# rollouts

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


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef * KL at every response token, the score added at the last one.
    The KL estimate is log p - log p_ref of the sampled token, whose expectation is KL(policy || ref)."""
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards, kl


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


def compute_gae(values, rewards, mask, gamma, lam):
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016). values,
    rewards, mask (B, R) -> advantages, returns (B, R), zero after each row's end: the value after the
    last token is 0, as the story is over."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    R = rewards.size(1)
    for t in reversed(range(R)):
        next_values = values[:, t + 1] if t + 1 < R else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages * mask, (advantages + values) * mask


# -----------------------------------------------------------------------------
# one PPO iteration

@torch.no_grad()
def make_experience(policy, reference, prompts, score_fn, kl_coef, cfg, generator, stop_tokens, ctx=nullcontext(), gen_ctx=nullcontext()):
    """Rollouts, the forward passes, rewards and advantages for one iteration. prompts (B, P);
    score_fn(tokens, mask, ended) -> scores (B,); ctx: the autocast of the forward passes, gen_ctx that
    of generation. Returns the batch (a dict of tensors) and timings."""
    t0 = time.perf_counter()
    with gen_ctx:
        responses = policy.model.generate(prompts, cfg["max_new_tokens"], cfg["temperature"], stop_tokens=stop_tokens,
                                          generator=generator)
    tokens, mask, ended = collate(prompts, responses, stop_tokens)
    P = prompts.size(1)
    t1 = time.perf_counter()
    logprobs, values, ref_logprobs = [], [], []
    for i in range(0, len(tokens), cfg["batch_size"]):
        chunk = tokens[i:i + cfg["batch_size"]]
        with ctx:
            logits, v = policy(chunk, P)
            ref_logits, _ = reference(chunk, P)
        logprobs.append(logprobs_from_logits(logits, chunk[:, P:], cfg["temperature"]))
        ref_logprobs.append(logprobs_from_logits(ref_logits, chunk[:, P:], cfg["temperature"]))
        values.append(v)
    logprobs, values, ref_logprobs = (torch.cat(x) * mask for x in (logprobs, values, ref_logprobs))  # (B, R) each
    t2 = time.perf_counter()
    scores = score_fn(tokens, mask, ended)  # (B,)
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(values, rewards, mask, cfg["gamma"], cfg["lam"])
    advantages = masked_whiten(advantages, mask)
    t3 = time.perf_counter()
    batch = dict(tokens=tokens, mask=mask, ended=ended, P=P, logprobs=logprobs, values=values, ref_logprobs=ref_logprobs,
                 scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns)
    return batch, {"time/ppo/rollout": t1 - t0, "time/ppo/forward_pass": t2 - t1, "time/ppo/compute_rewards": t3 - t2}


def ppo_loss(logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, cliprange, cliprange_value):
    """The clipped surrogate policy loss and the clipped value loss (PPO, Schulman et al. 2017), over
    the masked response tokens, and their statistics."""
    vpredclipped = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {"ppo/policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
                 "ppo/policy/policykl": masked_mean(old_logprobs - logprobs, mask),
                 "ppo/policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
                 "ppo/val/vpred": masked_mean(vpreds, mask),
                 "ppo/val/error": masked_mean((vpreds - returns) ** 2, mask),
                 "ppo/val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask)}
    return pg_loss, vf_loss, stats


def ppo_update(policy, optimizer, batch, cfg, generator, ctx=nullcontext(), scaler=None, ddp=False):
    """ppo_epochs passes over the rollouts in shuffled minibatches of batch_size, one optimizer step
    each, until a minibatch's approx KL (the mean over ranks) exceeds early_stop_kl. generator: a CPU
    torch.Generator for the shuffles. Returns the mean statistics and the number of epochs run."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # float16 needs a real one; disabled it is a pass-through
    P, B, bs = batch["P"], len(batch["tokens"]), cfg["batch_size"]
    all_stats, epochs, stop = [], 0, False
    while epochs < cfg["ppo_epochs"] and not stop:
        order = torch.randperm(B, generator=generator).to(batch["tokens"].device)
        for start in range(0, B, bs):
            idx = order[start:start + bs]
            R = int(batch["mask"][idx].sum(1).max())  # this minibatch's longest response: no wasted padding
            tokens = batch["tokens"][idx, :P + R]
            mask, old_logprobs, old_values, advantages, returns = (
                batch[k][idx, :R] for k in ("mask", "logprobs", "values", "advantages", "returns"))
            with ctx:
                logits, vpreds = policy(tokens, P)  # (b, R, V), (b, R), fp32
            logp = log_softmax(logits, cfg["temperature"])  # (b, R, V)
            logprobs = logp.gather(-1, tokens[:, P:, None]).squeeze(-1)
            pg_loss, vf_loss, stats = ppo_loss(logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask,
                                               cfg["cliprange"], cfg["cliprange_value"])
            with torch.enable_grad() if cfg["ent_coef"] else torch.no_grad():
                entropy = masked_mean(entropy_from_logprobs(logp), mask)
            loss = pg_loss + cfg["vf_coef"] * vf_loss - cfg["ent_coef"] * entropy
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg["grad_clip"] != 0.0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            stats.update({"ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss, "ppo/policy/entropy": entropy})
            all_stats.append({k: v.item() for k, v in stats.items()})
            if cfg["early_stop_kl"]:
                approxkl = stats["ppo/policy/approxkl"].detach().clone()
                if ddp:  # every rank must take the same decision
                    dist.all_reduce(approxkl)
                    approxkl /= dist.get_world_size()
                if approxkl > cfg["early_stop_kl"]:
                    stop = True
                    break
        epochs += 1
    return {**{k: float(np.mean([s[k] for s in all_stats])) for k in all_stats[0]}, "ppo/epochs": epochs}


def iteration_stats(batch, kl_coef):
    m, lengths = batch["mask"], response_lengths(batch["mask"], batch["ended"])
    return {"objective/kl": batch["kl"].sum(1).mean().item(), "objective/kl_coef": kl_coef,
            "env/reward_mean": batch["scores"].mean().item(), "env/reward_std": batch["scores"].std().item(),
            "env/ended_frac": batch["ended"].float().mean().item(),
            "tokens/responses_len_mean": lengths.mean().item(), "tokens/responses_len_std": lengths.std().item(),
            "ppo/returns/mean": masked_mean(batch["returns"], m).item(), "ppo/returns/var": masked_var(batch["returns"], m).item(),
            "ppo/val/mean": masked_mean(batch["values"], m).item(), "ppo/policy/advantages_mean": masked_mean(batch["advantages"], m).item()}


# -----------------------------------------------------------------------------
# logs, plots and the report

def plot_log(log_path, png_path, target_len=None):
    rows = read_jsonl(log_path)
    it = [r["iter"] for r in rows]
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("env/reward_mean", "objective/kl", "tokens/responses_len_mean"),
                              ("score (mean)", "KL to the reference (nats/response)", "response length (tokens)")):
        ax.plot(it, [r[key] for r in rows], "o-", ms=3)
        ax.set_xlabel("PPO iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if target_len:
        axes[2].axhline(target_len, color="k", ls="--", lw=1, label="target")
        axes[2].legend()
    save_figure(fig, png_path)


@torch.no_grad()
def evaluate(model, prompts, max_new_tokens, temperature, stop_tokens, seed, ctx=nullcontext()):
    """One sample per prompt (prompts (B, P)) from a generator seeded with seed, so two models given
    the same seed draw from the same random stream. Returns per-sample lists: 'responses' (new token
    ids, the stop token included), 'lengths' (story tokens, the stop token not counted) and 'ended'."""
    generator = torch.Generator(prompts.device).manual_seed(seed)
    with ctx:
        responses = model.generate(prompts, max_new_tokens, temperature, stop_tokens=stop_tokens, generator=generator)
    ended = [r[-1] in stop_tokens for r in responses]
    return {"responses": responses, "lengths": [len(r) - e for r, e in zip(responses, ended)], "ended": ended}


def length_stats(lengths, ended, target_len):
    lengths = np.array(lengths, dtype=float)
    distance = np.abs(lengths - target_len)
    return {"mean length": lengths.mean(), "std of length": lengths.std(), "mean distance to target": distance.mean(),
            "std of distance to target": distance.std(), "within ±10% of target": (distance <= 0.1 * target_len).mean(),
            "ended by itself": np.mean(ended)}


def printable(text):
    """Text for a markdown page: the byte soup of a degenerate policy shown as U+FFFD, not as control codes."""
    return "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text)


def write_length_report(cfg):
    """The starting model (the reference stored in ppo_ckpt.pt) and the PPO model on the same held-out
    prompts and seed, with the settings PPO was trained with: a table, samples side by side, a histogram."""
    from reward_model import response_logprobs
    md_path = cfg["report_path"]
    reuse_freed_memory()
    device = resolve_device_dtype(cfg["device"], cfg["dtype"])[0]
    path = os.path.join(cfg["out_dir"], "ppo_ckpt.pt")
    ckpt = load_checkpoint(path, device)
    if "reference" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by ppo.py")
    run = ckpt["config"]
    models = {"before": model_from_checkpoint({**ckpt, "model": ckpt["reference"]}), "after": model_from_checkpoint(ckpt)}
    tok = Tokenizer(ckpt["tokenizer"]["tokenizer"])
    data, starts = story_starts(os.path.join(token_dir(cfg["data_dir"], tok.n_words), "val.bin"), tok.bos_id, run["start_len"])
    prompts = prompts_at(data, starts[:cfg["report_prompts"]], run["start_len"], device)
    n_new = min(run["max_new_tokens"], models["after"].params.max_seq_len - run["start_len"])
    results, stats = {}, {}
    for name, model in models.items():
        results[name] = evaluate(model.to(device).eval(), prompts, n_new, run["temperature"], (tok.bos_id, tok.eos_id), cfg["seed"])
        stats[name] = length_stats(results[name]["lengths"], results[name]["ended"], run["target_len"])
    # KL(after || before), estimated on the PPO model's own samples
    after_samples = (prompts.tolist(), results["after"]["responses"])
    kl = response_logprobs(models["after"], *after_samples) - response_logprobs(models["before"], *after_samples)
    stats["before"]["KL to the starting model (nats/response)"], stats["after"]["KL to the starting model (nats/response)"] = 0.0, kl.mean().item()
    rows = read_jsonl(os.path.join(cfg["out_dir"], "ppo_log.jsonl"))
    minutes = np.cumsum([r["time/ppo/total"] for r in rows]) / 60
    near = [i for i, r in enumerate(rows) if abs(r["tokens/responses_len_mean"] - run["target_len"]) <= 0.1 * run["target_len"]]
    md = ["# PPO on the length task: before and after\n",
          f"- `{path}`: {ckpt['iter_num']} PPO iterations of {run['num_mini_batches'] * run['batch_size']} rollouts, "
          f"{minutes[-1]:.1f} minutes of PPO; reward `{run['reward']}`, target {run['target_len']} response tokens "
          f"(the prompt does not count), missing-EOS penalty {run['missing_eos_penalty']}, init_kl_coef {run['init_kl_coef']}, "
          f"learning rate {run['learning_rate']}",
          f"- the mean response length of the training rollouts first came within ±10% of the target at iteration "
          f"{rows[near[0]]['iter']}, after {minutes[near[0]]:.1f} minutes" if near else
          "- the mean response length of the training rollouts never came within ±10% of the target",
          f"- {len(prompts)} held-out prompts: the first {run['start_len']} tokens of the first validation stories; one "
          f"sample each, both models from seed {cfg['seed']}, temperature {run['temperature']}, at most {n_new} new tokens",
          "- length: story tokens in the response, the stop token not counted; distance: |length - target|\n",
          ]
    table = ["| metric | before | after |", "|---|---|---|"] + [
        f"| {k} | {stats['before'][k]:.3g} | {stats['after'][k]:.3g} |" for k in stats["before"]]
    md += table + [f"\n![response lengths before and after]({os.path.basename(os.path.splitext(md_path)[0])}.png)\n",
                   "## Samples side by side (same prompt, same seed)\n"]
    for i in range(min(3, len(prompts))):
        md.append(f"**prompt:** {tok.decode(prompts[i, 1:].tolist())}\n")
        for name in models:
            r, ended = results[name]["responses"][i], results[name]["ended"][i]
            text = tok.decode(prompts[i, 1:].tolist() + r[:len(r) - ended])[len(tok.decode(prompts[i, 1:].tolist())):]
            md.append(f"- *{name}* ({results[name]['lengths'][i]} tokens, {'ended' if ended else 'cut off'}): {printable(text.strip())}")
        md.append("")
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    with atomic_open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    for name in models:
        ax.hist(results[name]["lengths"], bins=np.linspace(0, n_new + 1, 40), alpha=0.5, label=name)
    ax.axvline(run["target_len"], color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("samples")
    ax.legend()
    png = os.path.splitext(md_path)[0] + ".png"
    save_figure(fig, png)
    print("\n".join(table))
    print(f"wrote {md_path} and {png}")


# -----------------------------------------------------------------------------
# the training loop

def train_ppo(cfg):
    if cfg["init_from"] != "resume":
        raise DataError("PPO starts from a pretrained model: pass --init_from=resume (out_dir/ckpt.pt, or ppo_ckpt.pt to continue)")
    if cfg["temperature"] <= 0:
        raise DataError(f"PPO samples: --temperature must be > 0, not {cfg['temperature']}")
    weights = parse_reward(cfg["reward"])
    reuse_freed_memory()
    device, device_type, dtype = resolve_device_dtype(cfg["device"], cfg["dtype"])
    ddp, rank, local_rank, world_size, device = init_ddp(device, device_type)
    master = rank == 0
    ctx = autocast(device_type, dtype)
    # decoding a small model on a CPU is overhead-bound: autocast's casts cost more than bf16 saves
    # (bench/ppo_speed.py, 400 rollouts of 260K: 1.4x), so only GPUs generate under autocast
    gen_ctx = ctx if device_type == "cuda" else nullcontext()

    # the tokenizer, the prompts and the checkpoint
    vocab_size = cfg["vocab_size"]
    tok = Tokenizer(resolve_tokenizer(cfg["data_dir"], 0 if cfg["vocab_source"] == "llama2" else vocab_size))
    stop_tokens = (tok.bos_id, tok.eos_id)
    data, starts = story_starts(os.path.join(token_dir(cfg["data_dir"], vocab_size), f"{cfg['prompt_split']}.bin"),
                                tok.bos_id, cfg["start_len"])
    out_dir = cfg["out_dir"]
    ppo_path = os.path.join(out_dir, "ppo_ckpt.pt")
    resuming = os.path.exists(ppo_path)
    path = ppo_path if resuming else os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, device)
    if resuming and not {"value_head", "reference", "optimizer", "kl_coef"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint written by ppo.py")
    if ckpt["model_args"]["vocab_size"] != vocab_size:
        raise DataError(f"{path} has vocab_size {ckpt['model_args']['vocab_size']}, not --vocab_size={vocab_size}")
    model_args = {**ckpt["model_args"], "dropout": 0.0}
    policy = PolicyWithValueHead(model_from_checkpoint({**ckpt, "model_args": model_args}))
    if resuming:
        policy.value_head.load_state_dict(ckpt["value_head"])
        reference = PolicyWithValueHead(model_from_checkpoint({"model": ckpt["reference"], "model_args": model_args}))
    else:
        reference = copy.deepcopy(policy)
    policy.to(device).eval()  # eval: no dropout; PPO's ratios compare two passes of the same function
    reference.to(device).eval().requires_grad_(False)
    max_new = min(cfg["max_new_tokens"], model_args["max_seq_len"] - cfg["start_len"])
    if max_new < 1:
        raise DataError(f"--start_len={cfg['start_len']} leaves no room in the model's context of {model_args['max_seq_len']}")
    if "length" in weights and cfg["target_len"] >= max_new:
        raise DataError(f"--target_len={cfg['target_len']} is not below the response cap of {max_new} tokens")
    cfg = {**cfg, "max_new_tokens": max_new}
    reward_model = None
    if "rm" in weights:
        from reward_model import load_reward_model
        reward_model = load_reward_model(cfg["rm_path"], device)

    optimizer = policy.model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type)
    optimizer.add_param_group({"params": list(policy.value_head.parameters()), "weight_decay": 0.0})
    if cfg["adap_kl_ctrl"]:
        kl_ctl = AdaptiveKLController(cfg["init_kl_coef"], cfg["target_kl"], cfg["kl_horizon"])
    else:
        kl_ctl = FixedKLController(cfg["init_kl_coef"])
    iter_num = 0
    if resuming:
        optimizer.load_state_dict(ckpt["optimizer"])
        kl_ctl.value, iter_num = ckpt["kl_coef"], ckpt["iter_num"]
    source = {k: ckpt[k] for k in ("tokenizer", "best_val_loss") if k in ckpt}
    ckpt = None
    scaler = torch.amp.GradScaler(device_type) if dtype == "float16" else None
    train_policy = DDP(policy, device_ids=[local_rank] if device_type == "cuda" else None) if ddp else policy

    n_rollouts = cfg["num_mini_batches"] * cfg["batch_size"]
    log_path = os.path.join(out_dir, "ppo_log.jsonl")
    wandb_run = start_wandb(cfg, out_dir) if master else None
    log = jsonl_log(log_path, iter_num if resuming else None, master, wandb_run)

    def score_fn(tokens, mask, ended):
        return score_rollouts(tokens, mask, ended, cfg["start_len"], weights, cfg["target_len"], cfg["missing_eos_penalty"],
                              reward_model, cfg["batch_size"], ctx)

    def save():
        save_atomic({"model": policy.model.state_dict(), "model_args": model_args, "iter_num": iter_num, "config": cfg,
                     **source, "optimizer": optimizer.state_dict(), "value_head": policy.value_head.state_dict(),
                     "kl_coef": kl_ctl.value, "reference": reference.model.state_dict()}, ppo_path)
        plot_log(log_path, os.path.join(out_dir, "ppo_log.png"), cfg["target_len"] if "length" in weights else None)

    if master:
        print(f"PPO from {path} at iteration {iter_num}: {n_rollouts} rollouts per iteration and rank "
              f"({cfg['num_mini_batches']} x {cfg['batch_size']}), up to {max_new} new tokens, reward {cfg['reward']}, {dtype}")
    bar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not master, unit="it", dynamic_ncols=True)
    while iter_num < cfg["max_iters"]:
        t0 = time.perf_counter()
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every random draw of an iteration follows from (seed, rank, iteration): resuming continues the same streams
        rng = np.random.default_rng([cfg["seed"], rank, iter_num])
        generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        shuffle_generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        prompts = prompts_at(data, starts[rng.integers(len(starts), size=n_rollouts)], cfg["start_len"], device)
        batch, timing = make_experience(policy, reference, prompts, score_fn, kl_ctl.value, cfg, generator, stop_tokens, ctx, gen_ctx)
        t1 = time.perf_counter()
        stats = ppo_update(train_policy, optimizer, batch, cfg, shuffle_generator, ctx, scaler, ddp)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t1
        timing["time/ppo/total"] = time.perf_counter() - t0
        stats = {**iteration_stats(batch, kl_ctl.value), **stats, **timing, "ppo/learning_rate": lr}
        if ddp:  # the mean over ranks, so that the controller and the log see every rank's rollouts
            stats = {**mean_over_ranks(stats, device), **rank_sums(policy, batch["tokens"])}
        kl_ctl.update(stats["objective/kl"], n_rollouts * world_size)
        iter_num += 1
        bar.update(1)
        if master:
            log({"iter": iter_num, "rollouts": iter_num * n_rollouts * world_size, **stats})
            bar.set_postfix(score=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.2f}",
                            len=f"{stats['tokens/responses_len_mean']:.0f}", s_it=f"{timing['time/ppo/total']:.1f}")
            if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
                save()
    bar.close()
    if ddp:
        dist.destroy_process_group()


def main(argv):
    cfg = configurator.configure(config, argv, ignored=IGNORED)
    with one_line_errors():
        write_length_report(cfg) if cfg["report"] else train_ppo(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])

"""
PPO for the pretrained story model: the reinforcement-learning stage of RLHF, as in Ziegler et al.
2019 ("Fine-Tuning Language Models from Human Preferences") and TRL's PPOTrainer, whose stat names it
logs. rl.py holds what it shares with GRPO, RLOO and DPO (rollouts, rewards, KL, the loop).

    python train.py --rl=ppo --reward=length --target_len=150   # out/ckpt.pt -> out/ppo_ckpt.pt
    python train.py --ppo=True                                  # the same: the llama2.c PPO fork's switch
    python ppo.py --reward=length:1.0,rm:0.5 --rm_path=out/rm.pt   # called directly
    torchrun --standalone --nproc_per_node=2 train.py --ppo=True

One iteration, with the llama2.c PPO fork's meanings of the keys:
  1. rollouts: num_mini_batches * batch_size prompts per rank (8 x 50 = 400 in the fork's runs), the
     first start_len tokens of real stories, answered in ONE batched KV-cache generate() call. A row
     stops at the end of its story (BOS, as in the token files, or EOS); all after it is masked.
  2. forward pass: the policy (log-probs and values from one trunk) and the frozen reference over the
     right-padded prompt + response.
  3. rewards: the score at the last response token and, with kl_in='reward', -kl_coef x the KL
     estimate at every response token; GAE advantages (gamma, lam), whitened.
  4. optimisation: ppo_epochs passes over the rollouts in shuffled minibatches of batch_size, one AdamW
     step each (the fork: 4 epochs x 8 minibatches of 50): the clipped policy loss, the clipped value
     loss, with kl_in='loss' the KL term, with ptx_coef the pretraining loss (PPO-ptx).

The value head is a Linear(dim, 1) on the policy's own final hidden state: the trunk is shared, so one
forward gives log-probs and values. It starts at zero (weights and bias), so the first values are 0
rather than random: early value-loss gradients then carry the returns, not noise, into the shared trunk.

The length reward counts the response's story tokens only (the fork also counted the prompt), and a
response cut off at max_new_tokens pays missing_eos_penalty (the fork had none).
"""
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

import rl
from common import collective
from rl import masked_mean, masked_var, masked_whiten

# -----------------------------------------------------------------------------
# config: rl.py's groups (the run, sampling, the reward, the rollouts, the KL) and PPO's own keys
config = {
    **rl.RUN, **rl.SAMPLING, **rl.REWARD, **rl.ROLLOUTS, **rl.KL,
    "ppo_epochs": 4,  # passes over an iteration's rollouts (the fork's)
    "gamma": 1.0,  # GAE discount
    "lam": 0.95,  # GAE lambda
    "cliprange_value": 0.2,  # value clip, around the values of the rollouts' forward pass
    "vf_coef": 0.1,  # value loss coefficient
    "ent_coef": 0.0,  # entropy bonus coefficient
    "whiten_rewards": False,  # whiten the per-token rewards before GAE (the advantages always are)
    "score_norm": False,  # reward normalisation: whiten each batch's scores (then the KL coefficient is relative to their spread)
    "early_stop_kl": 0.0,  # stop an iteration's epochs once a minibatch's approx KL exceeds this; 0 = never
}
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


def compute_rewards(scores, kl_penalties, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef x each token's KL penalty (rl.kl_penalty), and the score added
    at the last token."""
    rewards = -kl_coef * kl_penalties
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards


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


@torch.no_grad()
def make_experience(policy, reference, prompts, score_fn, kl_coef, cfg, generator, stop_tokens, ctx=nullcontext(), gen_ctx=nullcontext()):
    """rl.rollout(), then the rewards and advantages. prompts (B, P); score_fn(tokens, mask, ended) ->
    scores (B,). Returns the batch (a dict of tensors) and timings."""
    batch, timing = rl.rollout(policy, reference, prompts, score_fn, cfg, generator, stop_tokens, ctx, gen_ctx)
    t0 = time.perf_counter()
    mask, scores = batch["mask"], batch["scores"]
    if cfg["score_norm"]:
        scores = rl.whiten_scores(scores)
    kl = rl.kl_penalty(rl.kl_estimate(batch["logprobs"], batch["ref_logprobs"], cfg["kl_estimator"]), mask, cfg["kl_reduction"])
    rewards = compute_rewards(scores, kl, mask, kl_coef if cfg["kl_in"] == "reward" else 0.0)
    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(batch["values"], rewards, mask, cfg["gamma"], cfg["lam"])
    advantages = masked_whiten(advantages, mask)
    timing["time/compute_advantages"] = time.perf_counter() - t0
    return {**batch, "kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}, timing


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


def ppo_update(policy, optimizer, batch, kl_coef, cfg, generator, ctx=nullcontext(), scaler=None, ddp=False, ptx_batches=None):
    """ppo_epochs passes over the rollouts in shuffled minibatches of batch_size, one optimizer step
    each (rl.update), until a minibatch's approx KL (the mean over ranks) exceeds early_stop_kl.
    generator: a CPU torch.Generator for the shuffles. Returns the mean statistics and the number of
    epochs run."""
    def policy_loss(mb, logprobs, logp, vpreds):
        mask = mb["mask"]
        pg_loss, vf_loss, stats = ppo_loss(logprobs, vpreds, mb["logprobs"], mb["values"], mb["advantages"], mb["returns"], mask,
                                           cfg["cliprange"], cfg["cliprange_value"])
        with torch.enable_grad() if cfg["ent_coef"] else torch.no_grad():
            entropy = masked_mean(rl.entropy_from_logprobs(logp), mask)
        loss = pg_loss + cfg["vf_coef"] * vf_loss - cfg["ent_coef"] * entropy
        return loss, {**stats, "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss, "ppo/policy/entropy": entropy}

    def stop(stats):
        if not cfg["early_stop_kl"]:
            return False
        approxkl = torch.tensor(stats["ppo/policy/approxkl"], device=batch["tokens"].device)
        if ddp:  # every rank must take the same decision
            collective(dist.all_reduce, approxkl)
            approxkl /= dist.get_world_size()
        return approxkl.item() > cfg["early_stop_kl"]
    stats, epochs = rl.update(policy, optimizer, batch, kl_coef, cfg, generator, policy_loss, ctx, scaler, ptx_batches, stop)
    return {**stats, "ppo/epochs": epochs}


def iteration(policy, reference, optimizer, prompts, score_fn, kl_coef, cfg, generator, shuffle, stop_tokens, ctx=nullcontext(),
              gen_ctx=nullcontext(), scaler=None, ddp=False, ptx_batches=None):
    """One PPO iteration: make_experience() on prompts (B, P), then ppo_update(). policy: a
    PolicyWithValueHead or its DDP wrapper; generator draws the samples, shuffle the minibatches.
    Returns the batch and the statistics, with TRL's names."""
    batch, timing = make_experience(rl.unwrap(policy), reference, prompts, score_fn, kl_coef, cfg, generator, stop_tokens, ctx,
                                    gen_ctx)
    t0 = time.perf_counter()
    stats = ppo_update(policy, optimizer, batch, kl_coef, cfg, shuffle, ctx, scaler, ddp, ptx_batches)
    m = batch["mask"]
    stats.update({"ppo/returns/mean": masked_mean(batch["returns"], m).item(), "ppo/returns/var": masked_var(batch["returns"], m).item(),
                  "ppo/val/mean": masked_mean(batch["values"], m).item(),
                  "ppo/policy/advantages_mean": masked_mean(batch["advantages"], m).item(),
                  "time/optimize_step": time.perf_counter() - t0, **timing})
    return batch, stats


def step(run, rng):
    return rl.online_step(run, rng, iteration)


def main(argv):
    rl.main(argv, config, "ppo", PolicyWithValueHead, step)


if __name__ == "__main__":
    main(sys.argv[1:])

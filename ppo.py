"""
PPO for the pretrained story model: the reinforcement-learning stage of RLHF, as in Ziegler et al.
2019 ("Fine-Tuning Language Models from Human Preferences") and TRL's PPOTrainer, whose stat names it
logs. rl.py holds what it shares with the other methods (rollouts, KL, the optimisation) and
rl_train.py the loop.

    python train.py --rl=ppo --reward=length --target_len=150   # out/ckpt.pt -> out/ppo_ckpt.pt
    python train.py --ppo=True                                  # the same: the llama2.c PPO fork's switch
    python train.py recipes/length_ppo.conf                     # the length task's recipe
    torchrun --standalone --nproc_per_node=2 train.py --ppo=True

One iteration, with the llama2.c PPO fork's meanings of the keys:
  1. rollouts (the loop's): num_mini_batches * batch_size prompts per rank (8 x 50 = 400 in the
     fork's runs), answered in ONE batched KV-cache generate() call. A row stops at the end of its
     story (BOS, as in the token files, or EOS); all after it is masked.
  2. forward pass (the loop's): the policy (log-probs and values from one trunk) and the frozen
     reference over the right-padded prompt + response.
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

import time

import torch
import torch.distributed as dist

import rl
from common import collective
from rl import masked_mean, masked_var, masked_whiten

UNIT = "rollouts"
VALUE_HEAD = True
config = rl.method_config(
    rl.RUN,
    rl.SAMPLING,
    rl.ONLINE,
    ppo_epochs=(4, "> 0"),  # passes over an iteration's rollouts (the fork's)
    gamma=(1.0, "[0, 1]"),  # GAE discount
    lam=(0.95, "[0, 1]"),  # GAE lambda
    cliprange_value=(0.2, "> 0"),  # value clip, around the values of the rollouts' forward pass
    vf_coef=(0.1, ">= 0"),  # value loss coefficient
    ent_coef=(0.0, ">= 0"),  # entropy bonus coefficient
    whiten_rewards=False,  # whiten the per-token rewards before GAE (the advantages always are)
    score_norm=False,  # reward normalisation: whiten each batch's scores (the KL coefficient then means the same)
    early_stop_kl=(0.0, ">= 0"),  # stop an iteration's epochs once a minibatch's approx KL exceeds this; 0 = never
)


def compute_rewards(scores, kl_penalties, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef x each token's KL penalty (rl.kl_penalty), and the score added
    at the last token (scores (B,)) or on the tokens that earned it (scores (B, R): rl.at_tokens)."""
    return -kl_coef * kl_penalties + rl.at_tokens(scores, mask)


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
        stats = {
            "ppo/policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
            "ppo/policy/policykl": masked_mean(old_logprobs - logprobs, mask),
            "ppo/policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "ppo/val/vpred": masked_mean(vpreds, mask),
            "ppo/val/error": masked_mean((vpreds - returns) ** 2, mask),
            "ppo/val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask),
        }
    return pg_loss, vf_loss, stats


def advantages(batch, kl_coef, cfg):
    """The rewards (the score, and -kl_coef x each token's KL with kl_in='reward'), then GAE: fills
    batch.advantages (whitened) and batch.returns; returns the per-token rewards (B, R)."""
    mask = batch.mask
    # reward normalisation whitens each response's score; without it, a score spread over tokens stays so
    scores = rl.whiten(batch.scores) if cfg["score_norm"] else batch.earned()
    kl = rl.kl_penalty(
        rl.kl_estimate(batch.logprobs, batch.ref_logprobs, cfg["kl_estimator"]), mask, cfg["kl_reduction"]
    )
    rewards = compute_rewards(scores, kl, mask, kl_coef if cfg["kl_in"] == "reward" else 0.0)
    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    batch.advantages, batch.returns = compute_gae(batch.values, rewards, mask, cfg["gamma"], cfg["lam"])
    batch.advantages = masked_whiten(batch.advantages, mask)
    return rewards


def iteration(run, batch):
    """One PPO iteration on the loop's rollouts: the advantages, then ppo_epochs passes of clipped
    updates of the policy and its value head (rl.optimize), until a minibatch's approx KL (the mean
    over ranks) exceeds early_stop_kl. Returns the statistics, with TRL's names."""
    cfg = run.cfg
    t0 = time.perf_counter()
    advantages(batch, run.kl_ctl.value, cfg)
    t1 = time.perf_counter()

    def policy_loss(mb, logprobs, entropy, vpreds):
        pg_loss, vf_loss, stats = ppo_loss(
            logprobs,
            vpreds,
            mb.logprobs,
            mb.values,
            mb.advantages,
            mb.returns,
            mb.mask,
            cfg["cliprange"],
            cfg["cliprange_value"],
        )
        entropy = masked_mean(entropy, mb.mask)
        loss = pg_loss + cfg["vf_coef"] * vf_loss
        if cfg["ent_coef"]:  # else the entropy is a statistic, and its gradient is not computed
            loss = loss - cfg["ent_coef"] * entropy
        return loss, {
            **stats,
            "ppo/loss/policy": pg_loss,
            "ppo/loss/value": vf_loss,
            "ppo/loss/total": loss,
            "ppo/policy/entropy": entropy,
        }

    def stop(stats):
        if not cfg["early_stop_kl"]:
            return False
        approxkl = torch.tensor(stats["ppo/policy/approxkl"], device=batch.tokens.device)
        if run.ddp:  # every rank must take the same decision
            collective(dist.all_reduce, approxkl)
            approxkl /= dist.get_world_size()
        return approxkl.item() > cfg["early_stop_kl"]

    stats = rl.optimize(run, batch, policy_loss, stop)
    stats["ppo/epochs"] = stats.pop("epochs")
    m = batch.mask
    return {
        **stats,
        "ppo/returns/mean": masked_mean(batch.returns, m).item(),
        "ppo/returns/var": masked_var(batch.returns, m).item(),
        "ppo/val/mean": masked_mean(batch.values, m).item(),
        "ppo/policy/advantages_mean": masked_mean(batch.advantages, m).item(),
        "time/compute_advantages": t1 - t0,
        "time/optimize_step": time.perf_counter() - t1,
    }

"""
RLOO, REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"), as in TRL's
RLOOTrainer: group_size samples of each prompt; a response's reward is its score minus kl_coef x its
KL to the reference (k1, summed over its tokens, TRL's choice); its advantage is that reward minus the
mean reward of the other group_size - 1 samples of the same prompt, an unbiased baseline that needs
no value head. The whole response is one action: the ratio is that of the response's probability,
clipped as in PPO (with one epoch and one minibatch this is REINFORCE). rl.py and rl_train.py hold
the rest.

    python train.py --rl=rloo --reward=length --target_len=170     # out/ckpt.pt -> out/rloo_ckpt.pt
"""

import time

import torch

import rl

UNIT = "groups"
config = rl.method_config(
    rl.RUN,
    rl.SAMPLING,
    rl.ONLINE,
    init_kl_coef=(0.05, ">= 0"),  # TRL's kl_coef
    adap_kl_ctrl=False,
    group_size=(4, ">= 2"),  # k, samples per prompt (TRL: rloo_k); must divide batch_size
    score_norm=False,  # reward normalisation: whiten each batch's scores before the KL is subtracted
    whiten_advantages=False,  # whiten the batch's advantages (TRL: normalize_advantage)
)


def leave_one_out_advantages(rewards, group_size):
    """rewards (B,) of B / group_size groups of consecutive rollouts -> advantages (B,): each reward minus
    the mean of the other rewards of its group."""
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).flatten()


def rloo_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """The clipped surrogate with the response as one action: logprobs, old_logprobs, mask (B, R),
    advantages (B,) -> the policy loss (mean over responses), the share of clipped responses, and the
    ratios (B,)."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(1))  # p_new(response) / p_old(response)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    return losses.mean(), ((ratio - 1).abs() > cliprange).float().mean(), ratio


def iteration(run, batch):
    """One RLOO iteration on the loop's groups of rollouts: rewards with the KL subtracted (kl_in='reward')
    and leave-one-out advantages, then ppo_epochs passes of clipped updates (rl.optimize). Returns the
    statistics, with TRL's names."""
    cfg = run.cfg
    t0 = time.perf_counter()
    scores = rl.whiten(batch.scores) if cfg["score_norm"] else batch.scores
    kl = rl.kl_penalty(
        rl.kl_estimate(batch.logprobs, batch.ref_logprobs, cfg["kl_estimator"]), batch.mask, cfg["kl_reduction"]
    ).sum(1)  # (B,)
    non_score_reward = -run.kl_ctl.value * kl if cfg["kl_in"] == "reward" else torch.zeros_like(kl)
    rewards = scores + non_score_reward
    advantages = leave_one_out_advantages(rewards, batch.group_size)
    batch.advantages = rl.whiten(advantages) if cfg["whiten_advantages"] else advantages

    def policy_loss(mb, logprobs, entropy, _):
        loss, clipfrac, ratio = rloo_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, cfg["cliprange"])
        with torch.no_grad():
            return loss, {
                "loss/policy_avg": loss,
                "policy/clipfrac_avg": clipfrac,
                "val/ratio": ratio.mean(),
                "policy/approxkl_avg": 0.5 * rl.masked_mean((logprobs - mb.logprobs) ** 2, mb.mask),
                "policy/entropy_avg": rl.masked_mean(entropy, mb.mask),
            }

    stats = rl.optimize(run, batch, policy_loss)
    return {
        **stats,
        "objective/scores": batch.scores.mean().item(),
        "objective/non_score_reward": non_score_reward.mean().item(),
        "objective/rlhf_reward": rewards.mean().item(),
        "time/optimize_step": time.perf_counter() - t0,
    }

"""
GRPO, Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), as in TRL's GRPOTrainer:
group_size samples of each prompt, each scored against its group (the score minus the group's mean,
over the group's std), no value head, PPO's clipped ratio, and the KL to the reference as a term of
the loss (k3 per token) rather than a penalty in the reward. rl.py and rl_train.py hold the rest.

    python train.py --rl=grpo --reward=length --target_len=170     # out/ckpt.pt -> out/grpo_ckpt.pt
    python train.py --rl=grpo --loss_type=dr_grpo --scale_rewards=False
    python train.py recipes/instruct_grpo.conf                      # stories that follow instructions

The loss types differ in how the token losses of a minibatch are averaged:
  grpo     per sequence, then over sequences (DeepSeekMath): a token of a short response weighs more,
           so short responses with a positive advantage are favoured and long ones with a negative one
           are let off lightly
  dapo     over all tokens of the minibatch (Yu et al. 2025, DAPO): every token weighs the same
  dr_grpo  the sum over tokens divided by a constant, rows x max_new_tokens (Liu et al. 2025, Dr. GRPO),
           with scale_rewards=False: no length bias and no bias from the group's spread
"""

import time

import torch

import rl
from rl import masked_mean

UNIT = "groups"
config = rl.method_config(
    rl.RUN,
    rl.SAMPLING,
    rl.ONLINE,
    init_kl_coef=(0.04, ">= 0"),  # beta (TRL's former default)
    adap_kl_ctrl=False,
    kl_estimator=("k3", "k1 | k3"),
    kl_in=("loss", "reward | loss"),
    kl_reduction=("mean", "sum | mean"),  # as each token's KL is averaged in the 'grpo' loss
    group_size=(8, ">= 2"),  # G, samples per prompt (TRL: num_generations); must divide batch_size
    loss_type=("grpo", "grpo | dapo | dr_grpo"),  # how a minibatch's token losses are averaged (above)
    scale_rewards=True,  # divide the advantages by the group's std (DeepSeekMath); False: Dr. GRPO
)


def group_advantages(scores, group_size, scale_rewards=True):
    """scores (B,) of B / group_size groups of consecutive rollouts -> advantages (B,): each score minus
    its group's mean, divided by the group's (unbiased) std if scale_rewards. A group whose scores are
    all equal teaches nothing: its advantages are 0."""
    groups = scores.view(-1, group_size)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (groups.std(1, keepdim=True) + 1e-4)
    return advantages.flatten()


def grpo_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_type, max_new_tokens):
    """The clipped surrogate with one advantage per response: logprobs, old_logprobs, mask (B, R),
    advantages (B,) -> the policy loss, averaged as loss_type says, and the share of clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - cliprange, 1 + cliprange) * A)  # (B, R)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    elif loss_type == "dapo":
        loss = masked_mean(per_token, mask)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (mask.size(0) * max_new_tokens)
    clipped = ((ratio < 1 - cliprange) & (A < 0)) | ((ratio > 1 + cliprange) & (A > 0))
    return loss, masked_mean(clipped.float(), mask)


def iteration(run, batch):
    """One GRPO iteration on the loop's groups of rollouts: group-normalised advantages, then
    ppo_epochs passes of clipped updates (rl.optimize). Returns the statistics, with TRL's names."""
    cfg, G = run.cfg, batch.group_size
    t0 = time.perf_counter()
    scores = batch.scores
    if cfg["kl_in"] == "reward":
        kl = rl.kl_estimate(batch.logprobs, batch.ref_logprobs, cfg["kl_estimator"])
        scores = scores - run.kl_ctl.value * rl.kl_penalty(kl, batch.mask, cfg["kl_reduction"]).sum(1)
    batch.advantages = group_advantages(scores, G, cfg["scale_rewards"])

    def policy_loss(mb, logprobs, entropy, _):
        loss, clip_ratio = grpo_loss(
            logprobs,
            mb.logprobs,
            mb.advantages,
            mb.mask,
            cfg["cliprange"],
            cfg["loss_type"],
            min(cfg["max_new_tokens"], run.model_args["max_seq_len"] - 1),
        )
        with torch.no_grad():
            return loss, {
                "loss": loss,
                "clip_ratio/region_mean": clip_ratio,
                "entropy": masked_mean(entropy, mb.mask),
                "kl": masked_mean(rl.kl_estimate(logprobs, mb.ref_logprobs, "k3"), mb.mask),
            }

    stats = rl.optimize(run, batch, policy_loss)
    groups = batch.scores.view(-1, G)
    return {
        **stats,
        "reward": batch.scores.mean().item(),
        "reward_std": groups.std(1).mean().item(),
        "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item(),
        "completions/mean_length": batch.lengths().mean().item(),
        "time/optimize_step": time.perf_counter() - t0,
    }

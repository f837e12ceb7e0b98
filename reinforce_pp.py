"""
REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models"), as in OpenRLHF's advantage_estimator=reinforce: PPO's clipped token-level surrogate with no
critic. Each token's reward is -kl_coef x its KL estimate to the reference, the score added at the
last token; its advantage is the return from that token on,

    A_t = score - kl_coef * sum over i >= t of KL_i          (gamma = 1)

normalised over every response token of the whole batch (mean 0, std 1), not per prompt: one
sample a prompt suffices, and the global statistics are steadier than a group's. rl.py and
rl_train.py hold the rest.

    python train.py --rl=reinforce_pp --reward=length --target_len=170   # out/ckpt.pt -> out/reinforce_pp_ckpt.pt
"""

import time

import torch

import rl
from rl import masked_mean, masked_whiten

UNIT = "rollouts"
config = rl.method_config(
    rl.RUN,
    rl.SAMPLING,
    rl.ONLINE,
    init_kl_coef=(0.01, ">= 0"),  # beta, per token in the reward (OpenRLHF's examples)
    adap_kl_ctrl=False,
    gamma=(1.0, "[0, 1]"),  # discount of the rewards that follow a token
)


def token_returns(scores, kl, mask, kl_coef, gamma):
    """scores (B,) at each row's last token, or (B, R) on the tokens that earned them (rl.at_tokens),
    per-token KL estimates and mask (B, R) -> the discounted return of each response token (B, R): the
    rewards from it to the end, -kl_coef x KL at every token and the scores; zero after each row's end."""
    rewards = -kl_coef * kl * mask + rl.at_tokens(scores, mask)
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def iteration(run, batch):
    """One REINFORCE++ iteration on the loop's rollouts: token returns, whitened over the batch, then
    ppo_epochs passes of PPO's clipped token-level updates (rl.optimize). Returns the statistics."""
    cfg = run.cfg
    t0 = time.perf_counter()
    kl = rl.kl_estimate(batch.logprobs, batch.ref_logprobs, cfg["kl_estimator"])
    kl_coef = run.kl_ctl.value if cfg["kl_in"] == "reward" else 0.0
    batch.returns = token_returns(batch.earned(), kl, batch.mask, kl_coef, cfg["gamma"])
    batch.advantages = masked_whiten(batch.returns, batch.mask)

    def policy_loss(mb, logprobs, entropy, _):
        ratio = torch.exp(logprobs - mb.logprobs)
        losses = -mb.advantages * ratio
        clipped = -mb.advantages * ratio.clamp(1 - cfg["cliprange"], 1 + cfg["cliprange"])
        loss = masked_mean(torch.max(losses, clipped), mb.mask)
        with torch.no_grad():
            return loss, {
                "loss": loss,
                "clipfrac": masked_mean((clipped > losses).float(), mb.mask),
                "entropy": masked_mean(entropy, mb.mask),
            }

    stats = rl.optimize(run, batch, policy_loss)
    return {
        **stats,
        "returns_mean": masked_mean(batch.returns, batch.mask).item(),
        "time/optimize_step": time.perf_counter() - t0,
    }

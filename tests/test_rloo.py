"""rloo.py: the leave-one-out baseline, the KL summed into the reward, the sequence-level clipped loss
against hand computations, and learning on a tiny model through rloo.iteration."""

import math

import pytest
import torch
from conftest import bos_prompts, learn_short_stories, tiny_model, tiny_run

import configurator
import rl
import rloo
import rollouts
from rloo import leave_one_out_advantages, rloo_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def test_each_reward_is_measured_against_the_mean_of_the_others_of_its_prompt():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - 1.5 = 4.5; 0 - 1.5, 0 - 1.5, 3 - 0
    assert leave_one_out_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    assert leave_one_out_advantages(torch.tensor([5.0, 5.0]), 2).tolist() == [0.0, 0.0]


def test_the_response_is_one_action_with_a_clipped_ratio():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[math.log(2.0), math.log(0.75), 5.0], [math.log(0.9), 0.0, 0.0]]).requires_grad_()
    advantages = torch.tensor([1.0, -2.0])
    # ratios: 2 x 0.75 = 1.5 (the padding's 5.0 is masked out), 0.9; losses: max(-1.5, -1.2) = -1.2, max(1.8, 1.8) = 1.8
    loss, clipfrac, ratio = rloo_loss(logprobs, old, advantages, mask, 0.2)
    assert ratio.tolist() == pytest.approx([1.5, 0.9]) and loss.item() == pytest.approx((-1.2 + 1.8) / 2)
    assert clipfrac.item() == 0.5
    loss.backward()
    assert (logprobs.grad[0] == 0).all() and logprobs.grad[1, 0] == pytest.approx(-2.0 * -0.9 / 2)


def test_the_kl_is_summed_into_the_reward_before_the_baseline():
    policy = rl.Policy(tiny_model(std=0.3))
    reference = rl.Policy(tiny_model(seed=1, std=0.3)).requires_grad_(False)
    cfg = {
        **configurator.split(rloo.config)[0],
        "batch_size": 8,
        "num_mini_batches": 1,
        "max_new_tokens": 6,
        "group_size": 4,
        "init_kl_coef": 0.5,
    }
    run = tiny_run(rloo, policy, reference, lambda batch: torch.ones(len(batch.tokens)), cfg, prompts=bos_prompts(2, 3))
    run.optimizer, run.shuffle = torch.optim.SGD(policy.parameters(), lr=0.0), torch.Generator().manual_seed(1)
    batch, _ = rollouts.rollout(
        policy,
        reference,
        [p for p in bos_prompts(2, 3) for _ in range(4)],
        run.task.score,
        cfg,
        torch.Generator().manual_seed(0),
        run.stop_tokens,
    )
    batch.group_size = 4
    stats = rloo.iteration(run, batch)
    kl = ((batch.logprobs - batch.ref_logprobs) * batch.mask).sum(1)  # k1, summed over each response
    rewards = 1.0 - 0.5 * kl
    torch.testing.assert_close(batch.advantages, leave_one_out_advantages(rewards, 4))
    assert stats["objective/non_score_reward"] == pytest.approx(-0.5 * kl.mean().item(), rel=1e-5)
    assert stats["objective/rlhf_reward"] == pytest.approx(rewards.mean().item(), rel=1e-5)


def test_rloo_learns_to_end_stories_at_a_short_target_length():
    before, after, _ = learn_short_stories(rloo, group_size=4, ppo_epochs=2)
    assert before < -1.5 and after > -0.5, (before, after)

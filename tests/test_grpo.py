"""grpo.py: group-normalised advantages, the three loss types against hand computations, and learning
on a tiny model through grpo.iteration."""

import math

import pytest
import torch
from conftest import learn_short_stories

import grpo
from grpo import group_advantages, grpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def test_advantages_are_scores_against_their_own_group():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])  # three groups of two
    # group 0: mean 2, std sqrt(2): -1/sqrt2, +1/sqrt2; group 1: all equal, no signal; group 2: mean 2, std 2*sqrt2
    expected = [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert group_advantages(scores, 2).tolist() == pytest.approx(expected, abs=1e-3)
    assert group_advantages(scores, 2, scale_rewards=False).tolist() == [-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]  # Dr. GRPO
    assert group_advantages(scores, 3, scale_rewards=False).tolist() == pytest.approx(
        [-1, 1, 0, 0, -2, 2]
    )  # [1,3,2] and [2,0,4]


def test_the_three_loss_types_on_a_hand_example():
    # two responses: 3 tokens with advantage +1, 1 token with advantage -1; the first at ratio 1, 1, 1.5 (clipped: 1.2)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.0, 1.0, 1.5], [0.5, 1.0, 1.0]])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0])
    # per token: -min(r A, clip(r) A): -1, -1, -1.2 | -min(-0.5, -0.8) = 0.8 (the bad token is already less likely than
    # the clip allows: no further push)
    loss, clipped = grpo_loss(logprobs, old, advantages, mask, 0.2, "grpo", 10)
    assert loss.item() == pytest.approx(((-3.2 / 3) + 0.8) / 2)  # each response's mean, then their mean
    assert clipped.item() == pytest.approx(2 / 4)
    assert grpo_loss(logprobs, old, advantages, mask, 0.2, "dapo", 10)[0].item() == pytest.approx((-3.2 + 0.8) / 4)
    assert grpo_loss(logprobs, old, advantages, mask, 0.2, "dr_grpo", 10)[0].item() == pytest.approx(
        (-3.2 + 0.8) / (2 * 10)
    )
    loss.backward()
    assert logprobs.grad[0, 2] == 0 and logprobs.grad[1, 0] == 0 and logprobs.grad[0, 0] < 0


def test_grpo_learns_to_end_stories_at_a_short_target_length_with_the_kl_in_the_loss():
    before, after, history = learn_short_stories(grpo, group_size=8, ppo_epochs=2)
    # at the start a row rarely emits one of the two stop tokens out of 64 (mostly cut off at 12 tokens: score -3)
    assert before < -1.5 and after > -0.5, (before, after)
    assert all(history[-1][1][k] >= 0 for k in ("kl", "entropy", "reward_std", "clip_ratio/region_mean"))
    assert history[-1][1]["kl"] > 0  # k3 against the reference: the policy moved

"""reinforce_pp.py: the token returns with the KL in the reward, their whitening over the whole batch, the
clipped token-level loss against hand computations, and learning on a tiny model through
reinforce_pp.iteration."""

import math

import pytest
import torch
from conftest import bos_prompts, learn_short_stories, tiny_model, tiny_run

import configurator
import reinforce_pp
import rl
import rollouts
from reinforce_pp import token_returns

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def test_token_returns_sum_the_rewards_that_follow_and_stop_at_each_rows_end():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens
    # rewards: row 0: -0.05, -0.1, -0.15 + 1; row 1: -0.25, -0.2 - 2 (the padding's KL of 9 is masked out)
    returns = token_returns(scores, kl, mask, kl_coef=0.5, gamma=1.0)
    expected = torch.tensor([[1 - 0.3, 1 - 0.25, 1 - 0.15], [-2 - 0.45, -2 - 0.2, 0.0]])
    torch.testing.assert_close(returns, expected)
    # discounted: from the end, r_t + 0.5 * (the return after it)
    discounted = token_returns(scores, kl, mask, kl_coef=0.5, gamma=0.5)
    torch.testing.assert_close(
        discounted[0], torch.tensor([-0.05 + 0.5 * (-0.1 + 0.5 * 0.85), -0.1 + 0.5 * 0.85, 0.85])
    )


def test_advantages_are_whitened_over_every_token_of_the_batch_and_the_loss_is_clipped_per_token():
    policy = rl.Policy(tiny_model(std=0.3))
    reference = rl.Policy(tiny_model(seed=1, std=0.3)).requires_grad_(False)
    cfg = {
        **configurator.split(reinforce_pp.config)[0],
        "batch_size": 8,
        "num_mini_batches": 1,
        "max_new_tokens": 6,
        "init_kl_coef": 0.5,
    }

    def score(batch):
        return batch.lengths()  # differs across rollouts

    run = tiny_run(reinforce_pp, policy, reference, score, cfg)
    run.optimizer, run.shuffle = torch.optim.SGD(policy.parameters(), lr=0.0), torch.Generator().manual_seed(1)
    batch, _ = rollouts.rollout(
        policy, reference, bos_prompts(8, 2), score, cfg, torch.Generator().manual_seed(0), run.stop_tokens
    )
    stats = reinforce_pp.iteration(run, batch)
    kl = batch.logprobs - batch.ref_logprobs  # k1
    torch.testing.assert_close(batch.returns, token_returns(batch.scores, kl, batch.mask, 0.5, 1.0))
    kept = batch.advantages[batch.mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5) and kept.std().item() == pytest.approx(1.0, abs=1e-3)
    assert stats["loss"] == pytest.approx(0.0, abs=1e-5)  # ratio 1 and whitened advantages: the surrogate's mean is 0
    assert stats["clipfrac"] == 0.0 and math.isfinite(stats["entropy"])


def test_reinforce_pp_learns_to_end_stories_at_a_short_target_length():
    before, after, history = learn_short_stories(reinforce_pp, ppo_epochs=2)
    assert before < -1.5 and after > -0.5, (before, after)
    assert all(math.isfinite(s["loss"]) for _, s in history)


def test_a_score_spread_over_tokens_is_credited_from_where_it_was_earned():
    mask = torch.ones(1, 4)
    spread = torch.tensor([[0.0, 0.5, 0.0, 0.25]])  # a constraint met at token 1, the rest at the end
    returns = token_returns(spread, torch.zeros(1, 4), mask, kl_coef=0.0, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[0.5 * 0.5 + 0.25 * 0.125, 0.5 + 0.25 * 0.25, 0.125, 0.25]]))
    # all at the end, the same score: the tokens before get less of it
    assert token_returns(torch.tensor([0.75]), torch.zeros(1, 4), mask, 0.0, 0.5)[0, 1] < returns[0, 1]

"""ppo.py: GAE, the clipped objective and value loss, masking, the KL in the reward or in the loss, early
stop, and learning on a tiny model through ppo.iteration (test_rl.py covers what the methods share)."""

import copy
import math

import pytest
import torch
from conftest import bos_prompts, learn, length_score, tiny_model, tiny_run

import configurator
import ppo
import rl
import rollouts
from ppo import compute_gae, ppo_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def cfg(**overrides):
    defaults = configurator.split(ppo.config)[0]
    return {**defaults, "batch_size": 16, "num_mini_batches": 2, "max_new_tokens": 12, "temperature": 1.0, **overrides}


def policy_and_reference(std=0.3):
    policy = rl.Policy(tiny_model(std=std), value_head=True).eval()
    return policy, rl.Policy(copy.deepcopy(policy.model)).requires_grad_(False)


def experience(policy, reference, settings, stop, kl_coef=0.1, score=None):
    """The loop's rollouts of 32 prompts of 3 tokens, then PPO's rewards and advantages."""
    score = score or (lambda batch: torch.ones(len(batch.tokens)))
    batch, _ = rollouts.rollout(
        policy, reference, bos_prompts(32, 3), score, settings, torch.Generator().manual_seed(0), stop
    )
    rewards = ppo.advantages(batch, kl_coef, settings)
    return batch, rewards


# ---------------------------------------------------------------------------
# the math


def test_gae_matches_a_hand_computation_and_stops_at_each_rows_end():
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    rewards = torch.tensor([[0.5, -1.0, 2.0], [0.5, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens
    advantages, returns = compute_gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # row 0: deltas from the end: 2 - 3 = -1; -1 + 0.9*3 - 2 = -0.3; 0.5 + 0.9*2 - 1 = 1.3,
    # each plus 0.72 * the next advantage
    # row 1: its last token sees no next value: -1 - 2 = -3; then 1.3 + 0.72 * -3
    expected = torch.tensor([[1.3 + 0.72 * (-0.3 - 0.72), -0.3 - 0.72, -1.0], [1.3 - 2.16, -3.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)  # returns = advantages + values, 0 after the end


def test_clipped_objective_has_zero_gradient_where_the_ratio_is_clipped():
    # four tokens: ratio 1.5 and 0.5 with the advantage sign that clips them, then the same ratios with the other sign
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.05]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    old_logprobs = torch.full((1, 5), -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    values = torch.zeros(1, 5)
    pg_loss, _, stats = ppo_loss(logprobs, values, old_logprobs, values, advantages, values, torch.ones(1, 5), 0.2, 0.2)
    # the hand computation: max(-A r, -A clip(r)) per token, averaged: -1.2, 0.8, 1.5, -0.5, -1.05
    assert pg_loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 0.5 - 1.05) / 5)
    pg_loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0 and grad[1] == 0  # beyond 1 +- 0.2 in the direction the advantage pushes: no gradient
    assert grad[2] != 0 and grad[3] != 0 and grad[4] != 0  # the pessimistic bound keeps these, and 1.05 is inside
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(2 / 5)


def test_value_loss_is_clipped_around_the_old_values():
    old, returns, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    vpreds = torch.tensor([[0.5, 0.1]], requires_grad=True)  # the first moved beyond cliprange_value=0.2
    logprobs = torch.zeros(1, 2)
    _, vf_loss, stats = ppo_loss(logprobs, vpreds, logprobs, old, torch.zeros(1, 2), returns, mask, 0.2, 0.2)
    vf_loss.backward()
    # token 0: max((0.5-1)^2, (0.2-1)^2) is the clipped one, with no gradient; token 1 is inside the clip range
    assert vf_loss.item() == pytest.approx(0.5 * ((0.2 - 1) ** 2 + (0.1 - 1) ** 2) / 2)
    assert vpreds.grad[0, 0] == 0 and vpreds.grad[0, 1] != 0 and stats["ppo/val/clipfrac"].item() == 0.5


# ---------------------------------------------------------------------------
# rollouts, rewards and the KL on a tiny model


def test_everything_after_a_rows_end_is_masked():
    policy, _ = policy_and_reference()
    torch.nn.init.normal_(policy.value_head.weight)  # non-zero values, so that masking them shows
    stop = tuple(range(0, 64, 5))  # frequent stop tokens: rows end at different steps
    reference = rl.Policy(tiny_model(seed=1, std=0.3)).requires_grad_(False)
    batch, rewards = experience(policy, reference, cfg(max_new_tokens=10), stop)
    mask, response = batch.mask, batch.responses()
    ends = mask.sum(1).long()
    assert 1 < len(set(ends.tolist())) and batch.ended.any() and not batch.ended.all()
    for i, n in enumerate(ends.tolist()):
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert batch.ended[i] == (response[i, n - 1].item() in stop)  # the stop token is the last masked-in token
        assert not any(t in stop for t in response[i, : n - 1].tolist())
    kl = (batch.logprobs - batch.ref_logprobs) * mask
    for name, t in (
        ("logprobs", batch.logprobs),
        ("ref_logprobs", batch.ref_logprobs),
        ("values", batch.values),
        ("rewards", rewards),
        ("advantages", batch.advantages),
        ("returns", batch.returns),
    ):
        assert (t[mask == 0] == 0).all(), name
        assert (t[mask == 1] != 0).any(), name
    last = torch.nn.functional.one_hot(ends - 1, mask.size(1))
    torch.testing.assert_close(
        rewards, -0.1 * kl + last
    )  # k1, summed: each token its own penalty; the score of 1 at the end


def test_the_kl_penalty_per_token_or_in_the_loss_instead_of_the_rewards():
    policy, _ = policy_and_reference()
    reference = rl.Policy(tiny_model(seed=1, std=0.3)).requires_grad_(False)
    stop = tuple(range(0, 64, 5))

    def rewards(**overrides):
        return experience(policy, reference, cfg(max_new_tokens=10, **overrides), stop)

    (summed, _), (_, mean_rewards) = rewards(), rewards(kl_reduction="mean")
    in_loss, loss_rewards = rewards(kl_in="loss")
    mask = summed.mask
    kl = (summed.logprobs - summed.ref_logprobs) * mask
    last = torch.nn.functional.one_hot(mask.sum(1).long() - 1, mask.size(1))
    # 'mean': each token carries its KL over the response's length, so a response's total is its mean per-token KL
    torch.testing.assert_close(mean_rewards, -0.1 * kl / mask.sum(1, keepdim=True) + last)
    torch.testing.assert_close(loss_rewards, last.float())  # the KL left the rewards: only the score remains
    k3 = rl.kl_estimate(summed.logprobs, summed.ref_logprobs, "k3") * mask
    torch.testing.assert_close(rewards(kl_estimator="k3")[1], -0.1 * k3 + last)

    # in the loss: the responses' KL (k1, summed) is a term of the loss, differentiated through the policy's log-probs
    def update(batch, settings):
        run = tiny_run(ppo, policy, reference, None, settings)
        run.optimizer, run.shuffle = torch.optim.SGD(policy.parameters(), lr=0.0), torch.Generator().manual_seed(0)
        run.kl_ctl.value = 0.5
        return ppo.iteration(run, batch)

    with_kl = update(in_loss, cfg(kl_in="loss", ppo_epochs=1))
    assert with_kl["loss/kl"] == pytest.approx((in_loss.logprobs - in_loss.ref_logprobs).sum(1).mean().item(), rel=1e-4)
    assert "loss/kl" not in update(summed, cfg(ppo_epochs=1))


def test_kl_estimate_is_zero_against_itself_and_positive_after_the_policy_moves():
    policy, reference = policy_and_reference()
    batch, _ = experience(policy, reference, cfg(), ())
    assert ((batch.logprobs - batch.ref_logprobs) == 0).all()
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch, _ = experience(policy, reference, cfg(), ())
    assert (batch.logprobs - batch.ref_logprobs).sum(1).mean() > 0.5  # nats per response, from the policy's own samples


# ---------------------------------------------------------------------------
# iterations on a tiny model: ppo.iteration, as the training loop calls it


def test_ppo_learns_to_end_stories_at_a_short_target_length_and_never_touches_the_reference():
    torch.manual_seed(0)
    policy, reference = policy_and_reference(std=None)
    frozen = copy.deepcopy(reference.state_dict())
    history = learn(tiny_run(ppo, policy, reference, length_score(4), cfg(learning_rate=3e-3, init_kl_coef=0.01)), 30)
    before = sum(s for s, _ in history[:3]) / 3
    after = sum(s for s, _ in history[-3:]) / 3
    # at the start a row rarely emits one of the two stop tokens out of 64 (mostly cut off at 12 tokens: score -3)
    assert before < -1.5 and after > -0.5, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert not torch.equal(policy.model.output.weight, reference.model.output.weight)
    assert policy.value_head.weight.abs().sum() > 0  # the zero-initialised value head learned
    for key in (
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/loss/total",
        "ppo/policy/entropy",
        "ppo/policy/approxkl",
        "ppo/policy/policykl",
        "ppo/policy/clipfrac",
        "ppo/val/vpred",
        "ppo/val/clipfrac",
        "ppo/returns/mean",
    ):
        assert all(math.isfinite(s[key]) for _, s in history), key


def test_early_stop_ends_the_epochs_once_the_approx_kl_exceeds_the_threshold():
    def score(batch):  # varies across rollouts: a gradient to follow
        return ((batch.responses() < 32) & (batch.mask > 0)).float().sum(1)

    for lr, threshold, epochs in ((0.05, 1e-6, 1), (1e-5, 1.0, 4)):
        policy, reference = policy_and_reference()
        run = tiny_run(ppo, policy, reference, score, cfg(learning_rate=lr, ppo_epochs=4, early_stop_kl=threshold))
        run.stop_tokens = ()
        ((_, stats),) = learn(run, 1)
        assert stats["ppo/epochs"] == epochs

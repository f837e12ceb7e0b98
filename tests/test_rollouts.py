"""rollouts.py: the C engine samples the policy's own distribution. On every kernel path, its rollouts'
log-probabilities (the sampler's), the reference's (its scoring) and PPO's values (a value head on its
hidden states) match PyTorch's forward passes over the same tokens within 1e-4, and a greedy rollout
is PyTorch's token for token."""

import copy

import pytest
import torch
from conftest import bos_prompts, tiny_model

import rl
import rollouts

pytestmark = pytest.mark.usefixtures("one_thread")


def policy_and_reference():
    policy = rl.Policy(tiny_model(std=0.3, vocab_size=96), value_head=True).eval()
    torch.nn.init.normal_(policy.value_head.weight)  # non-zero values
    reference = rl.Policy(tiny_model(seed=1, std=0.3, vocab_size=96)).requires_grad_(False)
    return policy, reference


def test_the_c_engines_rollouts_carry_pytorchs_log_probs_and_values(kernel_build):
    policy, reference = policy_and_reference()
    engines = rollouts.Engines(policy.model, reference.model, lib=kernel_build.engine_lib())
    prompts = bos_prompts(12, 3) + bos_prompts(4, 7, seed=1)  # prompts of two lengths
    for temperature in (1.0, 0.7):
        cfg = {"max_new_tokens": 20, "temperature": temperature, "batch_size": 8}
        stop = tuple(range(0, 96, 7))  # rows end at different steps
        batch, _ = rollouts.rollout(
            policy,
            reference,
            prompts,
            lambda b: torch.zeros(len(b.tokens)),
            cfg,
            torch.Generator().manual_seed(0),
            stop,
            engines=engines,
        )
        assert 1 < len(set(batch.mask.sum(1).tolist())) and batch.ended.any()
        torch_side = copy.copy(batch)
        rollouts.torch_logprobs(torch_side, policy, reference, cfg, torch.no_grad())
        for name in ("logprobs", "ref_logprobs", "values"):
            c, t = getattr(batch, name), getattr(torch_side, name)
            assert (c[batch.mask == 0] == 0).all() and (t[batch.mask == 0] == 0).all(), name
            assert (c - t).abs().max().item() < 1e-4, (name, temperature, (c - t).abs().max().item())


def test_a_greedy_rollout_of_the_c_engine_is_pytorchs_token_for_token(kernel_build):
    policy, reference = policy_and_reference()
    engines = rollouts.Engines(policy.model, reference.model, lib=kernel_build.engine_lib())
    prompts = bos_prompts(8, 2) + bos_prompts(4, 5, seed=2)
    engines.sync(policy.model)
    c, _ = engines.policy.generate(prompts, 40, 0.0, stop_tokens=(1, 2))  # what rollout() samples, at temperature 0
    assert c == policy.model.generate(prompts, 40, 0.0, stop_tokens=(1, 2))


def test_the_engine_follows_the_policys_weights_as_it_trains():
    policy, reference = policy_and_reference()
    engines = rollouts.Engines(policy.model, reference.model)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # an optimizer step, say
    cfg = {"max_new_tokens": 12, "temperature": 1.0, "batch_size": 8}
    batch, _ = rollouts.rollout(
        policy,
        reference,
        bos_prompts(8, 2),
        lambda b: torch.zeros(len(b.tokens)),
        cfg,
        torch.Generator().manual_seed(0),
        (),
        engines=engines,
    )  # syncs before sampling
    torch_side = copy.copy(batch)
    rollouts.torch_logprobs(torch_side, policy, reference, cfg, torch.no_grad())
    assert (batch.logprobs - torch_side.logprobs).abs().max().item() < 1e-4
    assert (batch.logprobs - batch.ref_logprobs).abs().sum() > 1.0  # and the policy is no longer the reference


def test_the_rollout_engine_setting_is_checked():
    model = tiny_model()
    assert (
        rollouts.choose_engine("auto", "cpu", model) == "c" and rollouts.choose_engine("auto", "cuda", model) == "torch"
    )
    assert rollouts.choose_engine("torch", "cpu", model) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        rollouts.choose_engine("c", "cuda", model)

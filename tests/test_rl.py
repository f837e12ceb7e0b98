"""rl.py and rl_train.py, what the RL methods share: log-probabilities and masked statistics, the KL
estimators, penalties and controller, rollouts and minibatches, rewards, PPO-ptx, dropout off, the
fluency measures; and the training loop of every method from the command line (train.py --rl=...,
the fork's --ppo=True, recipes, resume, DDP, errors)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STOP, bos_prompts, real_story_parts, tiny_model, tiny_run, wandb_history

import checkpoint
import common
import configurator
import grpo
import metrics
import ppo
import rl
import rl_train
import rollouts
import tasks
import train
from common import DataError
from model import ModelArgs, Transformer
from prefs import write_pairs
from tinystories import SEPARATOR as END
from tinystories import load_text
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


# ---------------------------------------------------------------------------
# the math


def test_token_logprobs_are_the_tempered_distributions_with_their_gradients_chunk_by_chunk():
    """TokenLogprobs against log_softmax, gather and the entropy formula on the whole logits, in float64:
    150 rows over a 4,096-token vocabulary are 3 chunks of 64, 64 and 22 rows; the gradients of both
    outputs, of either alone (the other's unused), and with the weights frozen."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4096, 8, generator=g, dtype=torch.float64)
    tokens = torch.randint(4096, (150,), generator=g)
    a, b = torch.randn(150, generator=g, dtype=torch.float64), torch.randn(150, generator=g, dtype=torch.float64)
    assert len(rl.chunks(h, w)) == 3
    for temperature in (1.0, 0.7):
        for weights in ((a, b), (a, None), (None, b)):
            results = []
            for fused in (True, False):
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                if fused:
                    logprobs, entropy = rl.TokenLogprobs.apply(hh, ww, tokens, temperature)
                else:
                    logp = (hh @ ww.t() / temperature).log_softmax(-1)
                    logprobs, entropy = logp.gather(1, tokens[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
                loss = sum((x * c).sum() for x, c in zip((logprobs, entropy), weights) if c is not None)
                loss.backward()
                results.append((logprobs, entropy, hh.grad, ww.grad))
            for x, y in zip(*results):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    p = torch.tensor([[0.2, 0.3, 0.5]]).log()  # logits whose softmax is p, through h = 1 and w = log p
    logprobs, entropy = rl.TokenLogprobs.apply(torch.ones(1, 1), p.t(), torch.tensor([2]), 1.0)
    assert logprobs.item() == pytest.approx(math.log(0.5)) and entropy.item() == pytest.approx(-(p.exp() * p).sum())
    hh = torch.randn(3, 8).requires_grad_()  # frozen weights (the reference model's): no gradient made for them
    rl.TokenLogprobs.apply(hh, torch.randn(16, 8), torch.tensor([1, 2, 3]), 1.0)[0].sum().backward()
    assert hh.grad.abs().sum() > 0


def test_a_policy_given_its_targets_gives_their_logprobs_and_entropy_at_real_positions_only():
    """Policy(..., targets) is log_softmax of its logits at each row's response positions, 0 past them,
    with the same gradients; without lengths every position is real (PPO-ptx, DPO)."""
    policy = rl.Policy(tiny_model(std=0.3), value_head=True)
    tokens = torch.randint(3, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    prompt_lens, lengths = torch.tensor([4, 6, 5]), torch.tensor([20, 12, 5])
    R = 16
    padded = torch.cat([tokens, torch.zeros(3, R, dtype=torch.long)], 1)
    targets = torch.stack([padded[b, p : p + R] for b, p in enumerate(prompt_lens.tolist())])
    mask = torch.arange(R) < (lengths - prompt_lens)[:, None]
    results = []
    for fused in (True, False):
        policy.zero_grad()
        if fused:
            logprobs, entropy, values = policy(tokens, prompt_lens, R, lengths, targets, 0.8)
        else:
            logits, values = policy(tokens, prompt_lens, R, lengths)
            logp = (logits / 0.8).log_softmax(-1)
            logprobs = logp.gather(-1, targets[..., None]).squeeze(-1) * mask
            entropy = -(logp.exp() * logp).sum(-1) * mask
        (logprobs.sum() + entropy.sum() + (values * mask).sum()).backward()
        results.append((logprobs, entropy, [p.grad.clone() for p in policy.parameters()]))
    assert (results[0][0][~mask] == 0).all() and (results[0][1][~mask] == 0).all() and (results[0][0][mask] < 0).all()
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    logprobs, entropy, _ = policy(tokens, 1, 19, targets=tokens[:, 1:])
    logp = policy(tokens, 1, 19)[0].log_softmax(-1)
    torch.testing.assert_close(logprobs, logp.gather(-1, tokens[:, 1:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    assert (entropy > 0).all()


def test_whitening_gives_mean_0_and_std_1_over_the_masked_entries_only():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mask = (torch.arange(10) < torch.tensor([[10], [7], [3], [1]])).float()
    w = rl.masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6) and kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = rl.masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)
    scores = torch.tensor([1.0, 3.0, 5.0])  # reward normalisation: mean 3, std 2
    assert rl.whiten(scores).tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)


def test_kl_estimators_on_a_hand_example_and_unbiased_on_samples():
    logprobs, ref = torch.tensor([[math.log(0.5), math.log(0.2)]]), torch.tensor([[math.log(0.25), math.log(0.4)]])
    # k1 = log p/q; k3 = q/p - 1 - log(q/p): token 0 has q/p = 0.5, token 1 has q/p = 2
    assert rl.kl_estimate(logprobs, ref, "k1")[0].tolist() == pytest.approx([math.log(2), -math.log(2)])
    assert rl.kl_estimate(logprobs, ref, "k3")[0].tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)])
    # both estimate KL(p || q) without bias from samples of p; k3 is never negative and varies less
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = (rl.kl_estimate(p.log()[x], q.log()[x], e) for e in ("k1", "k3"))
    assert k1.mean().item() == pytest.approx(kl, abs=0.01) and k3.mean().item() == pytest.approx(kl, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any() and k3.var() < k1.var()


def test_kl_penalty_summed_or_per_token_and_the_kl_loss():
    kl = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert rl.kl_penalty(kl, mask, "sum").sum(1).tolist() == [6.0, 4.0]  # a response's KL: the sum over its tokens
    assert rl.kl_penalty(kl, mask, "mean").sum(1).tolist() == [2.0, 4.0]  # the mean per token: length does not count
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9], [0.5, 0.9, 0.9, 0.9]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.1], [0.25, 0.1, 0.1, 0.1]]))
    cfg = {"kl_estimator": "k1", "kl_reduction": "sum"}
    assert rl.kl_loss(logprobs, ref, mask, cfg).item() == pytest.approx((3 + 1) * math.log(2) / 2)  # two responses
    assert rl.kl_loss(logprobs, ref, mask, {**cfg, "kl_reduction": "mean"}).item() == pytest.approx(math.log(2))
    assert rl.kl_loss(ref, ref, mask, {**cfg, "kl_estimator": "k3"}).item() == 0.0


def test_adaptive_kl_controller_raises_the_coefficient_above_target_and_lowers_it_below():
    ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=400)  # error +1, clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 400 / 10000))
    up = ctl.value
    ctl.update(4.5, n_steps=400)  # error -0.25, clipped to -0.2
    assert ctl.value == pytest.approx(up * (1 - 0.2 * 400 / 10000)) and ctl.value < up
    ctl.update(6.0, n_steps=400)  # on target: unchanged
    assert ctl.value == pytest.approx(up * (1 - 0.2 * 400 / 10000))
    fixed = rl.kl_controller({**configurator.split(ppo.config)[0], "adap_kl_ctrl": False, "init_kl_coef": 0.0})
    fixed.update(100.0, n_steps=400)
    assert fixed.value == 0.0


# ---------------------------------------------------------------------------
# rewards


def test_length_reward_peaks_at_the_target_and_a_cut_off_response_pays_the_missing_eos_penalty():
    lengths = torch.arange(0, 401).float()
    r = tasks.length_reward(lengths, 200)
    assert r.argmax().item() == 200 and r[200] == 0
    assert (r[1:201] > r[:200]).all() and (r[201:] < r[200:400]).all()  # strictly better toward the target
    # two responses of 6 story tokens: one ended (its stop token is the 7th), one cut off at the cap of 6
    batch = rollouts.collate(bos_prompts(2), [[5, 6, 7, 8, 9, 10, 1], [5, 6, 7, 8, 9, 10]], STOP, "cpu")
    assert batch.ended.tolist() == [True, False] and batch.lengths().tolist() == [6, 6]
    score = tasks.score_rollouts(batch, {"length": 1.0}, {"target_len": 6, "missing_eos_penalty": 0.7})
    assert score.tolist() == pytest.approx([0.0, -0.7])


def test_reward_specs_and_the_reward_model_wiring():
    assert tasks.parse_reward("length") == {"length": 1.0}
    assert tasks.parse_reward("length:1.0,rm:0.5") == {"length": 1.0, "rm": 0.5}
    for bad in ("lenght", "length:x", "rm:1,judge:2"):
        with pytest.raises(DataError, match="--reward="):
            tasks.parse_reward(bad)

    class StandInRewardModel:  # reward_model.load_reward_model's interface: score(tokens, lengths) -> (B,)
        def score(self, tokens, lengths):
            assert (tokens[:, 0] == 1).all()  # BOS first
            return torch.tensor([float(tokens[i, :n].sum()) for i, n in enumerate(lengths)])

    batch = rollouts.collate([[1, 40, 41], [1, 50]], [[5, 1], [6, 7, 8, 9]], STOP, "cpu")  # prompts of two lengths
    cfg = {"target_len": 4, "missing_eos_penalty": 0.0, "batch_size": 1}
    score = tasks.score_rollouts(batch, {"rm": 2.0, "length": 0.0}, cfg, StandInRewardModel())
    # the reward model sees prompt + response up to and with the stop token, never the padding
    assert score.tolist() == [2.0 * (1 + 40 + 41 + 5 + 1), 2.0 * (1 + 50 + 6 + 7 + 8 + 9)]


def test_rollouts_of_prompts_of_different_lengths_line_up_with_their_responses():
    policy = rl.Policy(tiny_model(std=0.3))
    prompts = [[1, 7], [1, 9, 10, 11, 12], [1]]
    batch, _ = rollouts.rollout(
        policy,
        policy,
        prompts,
        lambda b: torch.zeros(3),
        {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 2},
        torch.Generator().manual_seed(0),
        (),
    )
    assert batch.prompt_lens.tolist() == [2, 5, 1] and batch.mask.sum(1).tolist() == [6, 6, 6]
    for i, p in enumerate(prompts):
        assert batch.tokens[i, : len(p)].tolist() == p
        assert batch.responses()[i].tolist() == batch.tokens[i, len(p) : len(p) + 6].tolist()
    # the log-probs of each row's response tokens, as one forward pass of that row alone gives them
    for i, p in enumerate(prompts):
        row = batch.tokens[i : i + 1, : len(p) + 6]
        logits, _ = policy(row, len(p), 6)
        expected = logits.log_softmax(-1).gather(-1, row[:, len(p) :, None]).squeeze(-1)
        torch.testing.assert_close(batch.logprobs[i], expected[0], atol=1e-5, rtol=1e-5)
    assert (batch.logprobs == batch.ref_logprobs).all()


def test_a_packed_pass_gives_the_padded_passs_logits_values_and_gradients(monkeypatch):
    """Rows of different lengths (one response empty), three of them a group sharing its prompt: with the
    C attention the trunk runs on them packed, without padding and with the group's prompt once, and the
    results at every response position are the padded pass's. PyTorch's attention takes the same pack under a mask
    (model.packed_mask), but the policy pads for it (it would attend over the whole pack)."""
    policy = rl.Policy(tiny_model(std=0.3), value_head=True)
    torch.nn.init.normal_(policy.value_head.weight)
    tokens = torch.randint(3, 64, (7, 40), generator=torch.Generator().manual_seed(0))
    prompt_lens, lengths = torch.tensor([7, 7, 7, 7, 5, 9, 6]), torch.tensor([40, 21, 8, 30, 31, 20, 6])
    tokens[1:3, :7] = tokens[0, :7]  # rows 0-2: a group; row 3 has another prompt of the same length
    R = int((lengths - prompt_lens).max())
    mask = (torch.arange(R) < (lengths - prompt_lens)[:, None]).float()
    seen, hidden = [], policy.model.hidden
    monkeypatch.setattr(
        policy.model, "hidden", lambda tokens, *a, **k: seen.append(tuple(tokens.shape)) or hidden(tokens, *a, **k)
    )
    results = []
    for attention, row_lengths in (("c", None), ("c", lengths), ("torch", lengths)):
        policy.model.set_attention(attention)
        policy.zero_grad()
        logits, values = policy(tokens, prompt_lens, R, row_lengths)
        (logits.square().sum(-1) * mask + values * mask).sum().backward()
        results.append((logits * mask[..., None], values * mask, [p.grad.clone() for p in policy.parameters()]))
    # prompts 7 + 7 + 5 + 9 + 6, then each row's response but its last token (the last row's is empty)
    assert seen == [(7, 39), (1, 34 + 32 + 13 + 0 + 22 + 25 + 10 + 0), (7, 39)]
    policy.model.set_attention("c")  # rows as long as the padding, no prompt shared: nothing to gain, padded
    policy(tokens[3:6], prompt_lens[3:6], 33, torch.full((3,), 40))
    assert seen[-1] == (3, 39)
    for logits, values, grads in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, results[0][1], atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, results[0][2]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # sums of thousands of terms, in another order
    # the pack's hidden states under PyTorch's masked attention are the C attention's
    packed = policy.packed_hidden
    by_c = packed(tokens, prompt_lens, R, lengths)
    policy.model.set_attention("torch")
    torch.testing.assert_close(packed(tokens, prompt_lens, R, lengths), by_c, atol=1e-5, rtol=1e-5)


def test_minibatches_keep_each_group_whole_and_cover_every_row_once_an_epoch():
    batch = rollouts.collate([[1]] * 12, [[5 + i] for i in range(12)], STOP, "cpu")
    batch.group_size = 3
    seen = []
    for epoch, mb in rl.minibatches(batch, 6, 2, torch.Generator().manual_seed(0)):
        rows = [int(t) - 5 for t in mb.responses()[:, 0]]
        assert len(rows) == 6 and rows[0] % 3 == 0 and rows[:3] == list(range(rows[0], rows[0] + 3))  # whole groups
        seen.append((epoch, rows))
    for epoch in (0, 1):
        assert sorted(r for e, rows in seen if e == epoch for r in rows) == list(range(12))
    assert seen[0][1] != seen[2][1] or seen[1][1] != seen[3][1]  # shuffled anew each epoch


# ---------------------------------------------------------------------------
# PPO-ptx and dropout


def test_ptx_adds_its_coefficient_times_the_pretraining_gradient_to_the_step():
    policy = rl.Policy(tiny_model(std=0.3))
    X = torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    batches = iter([(X[:, :-1], X[:, 1:])] * 2)

    def rl_loss():
        logits, _ = policy(X, 3, 6)
        return logits.square().mean(), {}

    def grads(ptx_coef):
        run = tiny_run(None, policy, policy, None, {"ptx_coef": ptx_coef, "grad_clip": 0.0, "learning_rate": 1.0})
        run.optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        stats = rl.optimizer_step(run, rl_loss, batches if ptx_coef else None)
        return [p.grad.clone() for p in policy.parameters()], stats

    (with_ptx, stats), (alone, _) = grads(0.5), grads(0.0)
    _, ce = policy.model(X[:, :-1], X[:, 1:])  # the pretraining loss, by the model's own forward
    expected = torch.autograd.grad(ce, list(policy.parameters()))
    assert stats["ptx/loss"] == pytest.approx(ce.item(), rel=1e-5)
    for a, b, e in zip(with_ptx, alone, expected):
        torch.testing.assert_close(a, b + 0.5 * e, atol=1e-6, rtol=1e-4)


def test_dropout_is_off_in_every_rl_stage(small_data, pretrained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "dropout": 0.3}}, out / "ckpt.pt")  # trained with dropout
    cfg = {**configurator.split(grpo.config)[0], "out_dir": str(out), "data_dir": small_data, "device": "cpu"}
    run = rl_train.setup(cfg, {}, grpo)
    assert run.model_args["dropout"] == 0.0
    model = run.policy.model.train()  # even in training mode: nothing to drop
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randint(3, 512, (2, 16))
    assert torch.equal(model(x)[0], model(x)[0])


# ---------------------------------------------------------------------------
# evaluation and the fluency metrics


def test_word_share_counts_letter_words_found_in_the_training_text():
    assert metrics.letter_words("Lily's 2 big-dogs, ÉTÉ!") == ["lily", "s", "big", "dogs", "été"]
    vocabulary = {"the", "cat", "sat"}
    assert metrics.word_share(["The cat sat.", "the ca7t zq"], vocabulary) == pytest.approx(
        4 / 7
    )  # the cat sat the | ca t zq
    assert metrics.word_share([""], vocabulary) == 0.0


def test_the_starting_models_own_samples_are_the_fluency_baseline_and_byte_soup_falls_short(small_data, tiny_ckpt):
    trained = checkpoint.model_from(checkpoint.load(tiny_ckpt)).eval()
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    cfg = {
        **configurator.split(grpo.config)[0],
        "max_new_tokens": 40,
        "batch_size": 16,
        "target_len": 20,
        "start_len": 16,
        "eval_prompts": 16,
    }
    task = tasks.make_task(cfg, tok, small_data, trained.params.max_seq_len)
    vocabulary = metrics.training_words(small_data)
    start, _ = rl_train.evaluate_model(trained, trained, task, cfg, tok, 0, vocabulary)
    assert start["kl"] == 0.0 and start["nll"] > 0
    soup = Transformer(ModelArgs(**trained.params.__dict__))  # a random model: nearly uniform over tokens, byte soup
    after, samples = rl_train.evaluate_model(soup, trained, task, cfg, tok, 0, vocabulary, ref_nll=start["nll"])
    assert after["nll_ratio"] > 1.3 and after["kl"] > 20  # measured: 1.75 and 90 nats
    assert (
        after["word_share"] < 0.5 < 0.9 < metrics.word_share(load_text(small_data, "val"), vocabulary)
    )  # real stories
    assert len(samples["texts"]) == 16 and 0 <= after["within_10pct"] <= 1 and 0 <= after["judge"] <= 1


# ---------------------------------------------------------------------------
# the training loop of every method, from the command line

FORK = [
    "--out_dir={out}",
    "--batch_size=50",
    "--max_seq_len=512",
    "--gradient_accumulation_steps=1",
    "--vocab_source=custom",
    "--vocab_size=512",
    "--dim=64",
    "--n_layers=5",
    "--n_heads=8",
    "--n_kv_heads=4",
    "--multiple_of=4",
    "--learning_rate=1e-4",
    "--dropout=0.00",
    "--weight_decay=0.01",
    "--beta2=0.99",
    "--warmup_iters=1000",
    "--eval_interval=20",
    "--eval_iters=5",
    "--compile=False",
    "--eval_only=False",
    "--init_from=resume",
    "--ppo=True",
    "--decay_lr=False",
    "--always_save_checkpoint=True",
    "--start_len=30",
    "--init_kl_coef=0.0",
]  # the llama2.c PPO fork's line, on a CPU
SMALL = [
    "--batch_size=4",
    "--num_mini_batches=2",
    "--max_new_tokens=8",
    "--target_len=4",
    "--device=cpu",
    "--dtype=float32",
    "--eval_interval=2",
    "--eval_prompts=4",
]
FLAGS = {
    "ppo": ["--ppo_epochs=2"],
    "grpo": ["--group_size=4", "--ptx_coef=0.5"],
    "rloo": ["--group_size=2", "--ptx_coef=0.5"],
    "reinforce_pp": ["--ppo_epochs=2", "--ptx_coef=0.5"],  # ptx: the policy moves even where every score ties
    "dpo": [
        "--batch_size=4",
        "--device=cpu",
        "--dtype=float32",
        "--eval_interval=2",
        "--eval_prompts=4",
        "--max_new_tokens=8",
        "--target_len=4",
    ],
}
STATS = {
    "ppo": ("ppo/loss/total", "ppo/policy/clipfrac", "ppo/val/vpred"),
    "grpo": ("loss", "kl", "clip_ratio/region_mean", "reward_std"),
    "rloo": ("loss/policy_avg", "objective/rlhf_reward", "ptx/loss"),
    "reinforce_pp": ("loss", "clipfrac", "returns_mean"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
}


def run_dir(pretrained, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(pretrained, out)
    return out


def method_argv(method, small_data, out, pairs=None):
    common = [f"--out_dir={out}", f"--data_dir={small_data}", f"--rl={method}"]
    if method == "dpo":
        return common + FLAGS["dpo"] + [f"--pairs={pairs}"]
    return common + SMALL + FLAGS[method]


def rl_main(argv):
    """What `python train.py ARGV` runs for an RL stage, in this process."""
    rl_train.main(train.stage(argv), argv, ignored=configurator.split(train.config)[0])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pairs") / "prefs.jsonl")
    write_pairs([{"prompt": p, "chosen": r[:80] + END, "rejected": r[:40]} for p, r in real_story_parts(12)], path)
    return path


def log_rows(path):
    return [json.loads(line) for line in open(path)]


def train_py(*argv, launcher=(sys.executable,)):
    return subprocess.run(
        [*launcher, str(ROOT / "train.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_the_forks_command_line_runs_and_a_second_run_resumes_where_the_first_stopped(
    small_data, pretrained, tmp_path, capsys
):
    whole, part = run_dir(pretrained, tmp_path, "whole"), run_dir(pretrained, tmp_path, "part")
    argv = lambda out, n: [f.format(out=out) for f in FORK] + [f"--data_dir={small_data}", *SMALL, f"--max_iters={n}"]  # noqa: E731
    p = train_py(*argv(whole, 3))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PPO from" in p.stdout and "ckpt.pt at iteration 0" in p.stdout
    rl_main(argv(part, 2))
    rl_main(argv(part, 3))
    out = capsys.readouterr().out
    assert "ppo_ckpt.pt at iteration 2" in out and "resuming with max_iters 3 (was 2)" in out
    a, b = log_rows(whole / "ppo_log.jsonl"), log_rows(part / "ppo_log.jsonl")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [0, 1, 2, 3]
    for key in (
        "env/reward_mean",
        "objective/kl",
        "ppo/loss/total",
        "tokens/responses_len_mean",
        "eval/kl",
        "eval/nll_ratio",
    ):
        assert [r.get(key) for r in a] == pytest.approx([r.get(key) for r in b], abs=1e-6), key
    ckpt = checkpoint.load(str(part / "ppo_ckpt.pt"))
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["kind"] == "rl" and ckpt["data_dir"] == small_data
    assert ckpt["iter_num"] == 3 and ckpt["rl"]["kl_coef"] == 0.0 and ckpt["config"]["batch_size"] == 4
    assert (
        ckpt["config"]["weight_decay"] == 0.01 and ckpt["config"]["beta2"] == 0.99
    )  # the fork's optimizer keys are read
    assert ckpt["rl"]["method"] == "ppo" and "value_head" in ckpt["rl"]["heads"] and "optimizer" in ckpt
    assert os.path.exists(part / "ppo_log.png")
    start = torch.load(pretrained / "ckpt.pt", weights_only=True)["model"]
    assert all(
        torch.equal(v, start[k]) for k, v in ckpt["rl"]["reference"].items()
    )  # the reference is the starting model
    assert not torch.equal(
        checkpoint.model_from(ckpt).output.weight, start["output.weight"]
    )  # loads like any checkpoint


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_pp", "dpo"])
def test_each_method_trains_logs_its_stats_and_resumes_exactly(
    method, small_data, pretrained, pairs_file, tmp_path, capsys
):
    whole, part = run_dir(pretrained, tmp_path, "whole"), run_dir(pretrained, tmp_path, "part")
    for out, iters in ((whole, [3]), (part, [2, 3])):
        for n in iters:
            rl_main(method_argv(method, small_data, out, pairs_file) + [f"--max_iters={n}"])
    assert f"{method}_ckpt.pt at iteration 2" in capsys.readouterr().out
    a, b = log_rows(whole / f"{method}_log.jsonl"), log_rows(part / f"{method}_log.jsonl")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [0, 1, 2, 3]
    assert (
        a[0]["eval/kl"] == 0.0 and a[0]["eval/nll_ratio"] == 1.0 and a[-1]["eval/kl"] != 0.0
    )  # the start, then a move
    for key in STATS[method] + ("eval/kl", "eval/word_share", "eval/val_ppl", "learning_rate"):
        assert [r.get(key) for r in a[1:]] == pytest.approx([r.get(key) for r in b[1:]], abs=1e-6), key
        values = [r[key] for r in a[1:] if key in r]
        assert values and all(math.isfinite(v) for v in values), key
    assert (
        all(r["time/cpu"] > 0 for r in a[1:]) and "time/eval_cpu" in a[-1]
    )  # CPU seconds: a shared machine's fair cost
    ckpt = checkpoint.load(str(part / f"{method}_ckpt.pt"))
    assert ckpt["iter_num"] == 3 and ckpt["rl"]["method"] == method and ckpt["rl"]["heads"] == {}
    assert a[-1]["episode"] == 3 * (4 if method == "dpo" else 8)  # rollouts (DPO: pairs) so far


def test_a_recipe_file_sets_the_method_and_its_settings_and_flags_win_over_it(small_data, pretrained, tmp_path):
    out = run_dir(pretrained, tmp_path, "recipe")
    recipe = tmp_path / "tiny_grpo.conf"
    recipe.write_text("# a GRPO recipe\nrl = grpo\ngroup_size = 4\nmax_iters = 5  # overridden below\n")
    p = train_py(str(recipe), f"--out_dir={out}", f"--data_dir={small_data}", *SMALL, "--max_iters=1")
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = checkpoint.load(str(out / "grpo_ckpt.pt"))
    assert ckpt["iter_num"] == 1 and ckpt["config"]["group_size"] == 4
    recipe.write_text("rl = grpo\ngroup_sise = 4\n")
    p = train_py(str(recipe), f"--out_dir={out}", *SMALL)
    assert p.returncode != 0 and p.stderr.strip() == f"error: {recipe}:2: unknown config key group_sise"


def test_two_process_gloo_ddp_keeps_the_ranks_in_sync_on_different_data(small_data, pretrained, pairs_file, tmp_path):
    for method in ("grpo", "dpo"):
        out, logs = run_dir(pretrained, tmp_path, method), tmp_path / f"{method}_ranks"
        # each rank's output to its own file, so that a failure shows the rank's own error rather
        # than only torchrun's summary of it
        p = train_py(
            *method_argv(method, small_data, out, pairs_file),
            "--max_iters=2",
            "--ptx_coef=0.5",  # ptx: its own backward
            launcher=(
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                f"--log-dir={logs}",
                "--redirects=3",
            ),
        )
        ranks = "".join(f"--- {f.relative_to(logs)}:\n{f.read_text()[-1500:]}\n" for f in sorted(logs.rglob("*.log")))
        assert p.returncode == 0, ranks + p.stderr[-1000:]
        rows = log_rows(out / f"{method}_log.jsonl")[1:]
        assert [r["iter"] for r in rows] == [1, 2] and rows[-1]["episode"] == 2 * 2 * (4 if method == "dpo" else 8)
        for r in rows:
            assert r["ddp/param_sum"][0] == r["ddp/param_sum"][1] and r["ptx/loss"] > 0
            assert r["ddp/batch_sum"][0] != r["ddp/batch_sum"][1]
        assert rows[0]["ddp/param_sum"][0] != rows[1]["ddp/param_sum"][0]


def test_wandb_offline_receives_every_row_of_the_log(small_data, pretrained, tmp_path):
    out = run_dir(pretrained, tmp_path, "wandb")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *method_argv("rloo", small_data, out),
            "--max_iters=2",
            "--wandb_log=True",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = log_rows(out / "rloo_log.jsonl")
    assert len(rows) == 3 and wandb_history(out) == rows


def test_ppo_as_typed_in_the_usage_line_starts_from_out_dirs_checkpoint(small_data, pretrained, tmp_path):
    out = run_dir(pretrained, tmp_path, "typed")
    p = train_py(
        "--ppo=True", f"--out_dir={out}", f"--data_dir={small_data}", *SMALL, "--max_iters=1"
    )  # no --init_from
    assert p.returncode == 0, p.stderr[-2000:]
    assert checkpoint.load(str(out / "ppo_ckpt.pt"))["iter_num"] == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rl=ppo", "--reward=lenght"], "error: --reward=lenght: unknown reward 'lenght'"),
        (["--rl=ppo", "--init_from=scratch"], "error: --init_from=scratch: must be resume"),
        (["--rl=grpo", "--no_such_key=1"], "error: unknown config key --no_such_key"),
        (
            ["--rl=ppo", "--max_new_tokens=8", "--target_len=8"],
            "error: --target_len=8 is not below the response cap of 8 tokens",
        ),
        (["--rl=rloo", "--out_dir=/nonexistent/run"], "error: no checkpoint at /nonexistent/run/ckpt.pt"),
        (["--rl=grpo", "--batch_size=4", "--group_size=3"], "error: --group_size=3 must divide --batch_size=4"),
        (["--rl=grpo", "--loss_type=bnpo"], "error: --loss_type=bnpo: must be one of grpo, dapo, dr_grpo"),
        (["--rl=ppo", "--kl_estimator=k2"], "error: --kl_estimator=k2: must be one of k1, k3"),
        (["--rl=dpo", "--pairs=/nonexistent.jsonl"], "error: no pairs file /nonexistent.jsonl"),
        (["--rl=dpo", "--start_len=1", "--num_mini_batches=2"], "error: unknown config key --num_mini_batches"),
        (["--rl=a2c"], "error: unknown --rl=a2c; choose from dpo, grpo, ppo, reinforce_pp, rloo"),
        (["--ppo=True", "--rl=dpo"], "error: --ppo=True means --rl=ppo, not --rl=dpo"),
        (["--rl=grpo", "--vocab_size=4096"], "error: --vocab_size=4096 contradicts"),
        (["--rl=grpo", "--dim=128"], "error: --dim=128 contradicts"),
    ],
)
def test_bad_input_is_a_one_line_error(small_data, pretrained, flags, message):
    argv = [f"--out_dir={pretrained}", f"--data_dir={small_data}", "--device=cpu", "--max_iters=1", *flags]
    with pytest.raises(SystemExit) as e:
        with common.one_line_errors():  # what `python train.py ...` runs
            rl_main(argv)
    assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code), e.value.code


def test_train_py_imports_no_rl_module_until_asked():
    """The pretraining script stands alone: the RL stages hang off it, not the other way round."""
    modules = ("rl", "rl_train", "ppo", "grpo", "rloo", "reinforce_pp", "dpo", "report", "tasks", "metrics")
    code = f"import sys, train; print(sorted(m for m in {modules} if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr

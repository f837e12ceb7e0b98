"""ppo.py: GAE, whitening, masking, the KL estimate and controller, the clipped objective, the length
reward, the frozen reference, learning on a tiny model, and the command line (the fork's, resume, DDP)."""
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import ppo
from conftest import ROOT, wandb_history
from model import PRESETS, ModelArgs, Transformer, load_checkpoint, model_from_checkpoint
from ppo import (AdaptiveKLController, FixedKLController, PolicyWithValueHead, collate, compute_gae, config,
                 entropy_from_logprobs, length_reward, log_softmax, logprobs_from_logits, make_experience, masked_mean,
                 masked_whiten, parse_reward, ppo_loss, ppo_update, score_rollouts, write_length_report)
from common import save_atomic

STOP = (1, 2)  # BOS and EOS, as in the tokenizers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: more threads than free cores is 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_policy(seed=0, vocab_size=64, std=None):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=8, max_seq_len=64))
    if std:  # a random model far from uniform, so that policies differ visibly
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return PolicyWithValueHead(model).eval()


def cfg(**overrides):
    return {**config, "batch_size": 16, "num_mini_batches": 2, "max_new_tokens": 12, "temperature": 1.0, **overrides}


def bos_prompts(n, length=1):
    return torch.cat([torch.ones(n, 1, dtype=torch.long), torch.randint(3, 64, (n, length - 1))], 1)


# ---------------------------------------------------------------------------
# the math

def test_gae_matches_a_hand_computation_and_stops_at_each_rows_end():
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    rewards = torch.tensor([[0.5, -1.0, 2.0], [0.5, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens
    advantages, returns = compute_gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # row 0: deltas from the end: 2 - 3 = -1; -1 + 0.9*3 - 2 = -0.3; 0.5 + 0.9*2 - 1 = 1.3, each plus 0.72 * the next advantage
    # row 1: its last token sees no next value: -1 - 2 = -3; then 1.3 + 0.72 * -3
    expected = torch.tensor([[1.3 + 0.72 * (-0.3 - 0.72), -0.3 - 0.72, -1.0], [1.3 - 2.16, -3.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)  # returns = advantages + values, 0 after the end


def test_whitening_gives_mean_0_and_std_1_over_the_masked_entries_only():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mask = (torch.arange(10) < torch.tensor([[10], [7], [3], [1]])).float()
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6) and kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)


def test_adaptive_kl_controller_raises_the_coefficient_above_target_and_lowers_it_below():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=400)  # error +1, clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 400 / 10000))
    up = ctl.value
    ctl.update(4.5, n_steps=400)  # error -0.25, clipped to -0.2
    assert ctl.value == pytest.approx(up * (1 - 0.2 * 400 / 10000)) and ctl.value < up
    ctl.update(6.0, n_steps=400)  # on target: unchanged
    assert ctl.value == pytest.approx(up * (1 - 0.2 * 400 / 10000))
    fixed = FixedKLController(0.0)
    fixed.update(100.0, n_steps=400)
    assert fixed.value == 0.0


def test_clipped_objective_has_zero_gradient_where_the_ratio_is_clipped():
    # four tokens: ratio 1.5 and 0.5 with the advantage sign that clips them, then the same ratios with the other sign
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.05]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    old_logprobs = torch.full((1, 5), -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    values = torch.zeros(1, 5)
    pg_loss, _, stats = ppo_loss(logprobs, values, old_logprobs, values, advantages, values, torch.ones(1, 5), 0.2, 0.2)
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


def test_length_reward_peaks_at_the_target_and_a_cut_off_response_pays_the_missing_eos_penalty():
    lengths = torch.arange(0, 401).float()
    r = length_reward(lengths, 200)
    assert r.argmax().item() == 200 and r[200] == 0
    assert (r[1:201] > r[:200]).all() and (r[201:] < r[200:400]).all()  # strictly better toward the target
    # two responses of 6 story tokens: one ended (its stop token is the 7th), one cut off at the cap of 6
    tokens, mask, ended = collate(bos_prompts(2), [[5, 6, 7, 8, 9, 10, 1], [5, 6, 7, 8, 9, 10]], STOP)
    assert ended.tolist() == [True, False]
    score = score_rollouts(tokens, mask, ended, 1, {"length": 1.0}, target_len=6, missing_eos_penalty=0.7)
    assert score.tolist() == pytest.approx([0.0, -0.7])


def test_reward_specs_and_the_reward_model_wiring():
    assert parse_reward("length") == {"length": 1.0}
    assert parse_reward("length:1.0,rm:0.5") == {"length": 1.0, "rm": 0.5}
    for bad in ("lenght", "length:x", "rm:1,judge:2"):
        with pytest.raises(ValueError, match="--reward="):
            parse_reward(bad)

    class StandInRewardModel:  # reward_model.load_reward_model's interface: score(tokens, lengths) -> (B,)
        def score(self, tokens, lengths):
            assert (tokens[:, 0] == 1).all()  # BOS first
            return torch.tensor([float(tokens[i, :n].sum()) for i, n in enumerate(lengths)])

    prompts = torch.tensor([[1, 40, 41], [1, 50, 51]])
    tokens, mask, ended = collate(prompts, [[5, 1], [6, 7, 8, 9]], STOP)
    score = score_rollouts(tokens, mask, ended, 3, {"rm": 2.0, "length": 0.0}, 4, 0.0, StandInRewardModel(), chunk=1)
    # the reward model sees prompt + response up to and with the stop token, never the padding
    assert score.tolist() == [2.0 * (1 + 40 + 41 + 5 + 1), 2.0 * (1 + 50 + 51 + 6 + 7 + 8 + 9)]


# ---------------------------------------------------------------------------
# an iteration on a tiny model

def test_log_probs_and_entropy_of_the_tempered_distribution():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(7, (2, 3), generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 0.7):
        p = (logits / temperature).softmax(-1)
        taken = logprobs_from_logits(logits, tokens, temperature)
        assert torch.allclose(taken, p.gather(-1, tokens[..., None]).squeeze(-1).log(), atol=1e-6)
        entropy = entropy_from_logprobs(log_softmax(logits, temperature))
        assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-6)
    assert torch.allclose(entropy_from_logprobs(log_softmax(torch.zeros(1, 7), 1.0)), torch.tensor([math.log(7)]))


def test_everything_after_a_rows_end_is_masked():
    policy = tiny_policy(std=0.3)
    torch.nn.init.normal_(policy.value_head.weight)  # non-zero values, so that masking them shows
    stop = tuple(range(0, 64, 5))  # frequent stop tokens: rows end at different steps
    reference = tiny_policy(seed=1, std=0.3).requires_grad_(False)
    batch, _ = make_experience(policy, reference, bos_prompts(32, 3), lambda t, m, e: torch.ones(len(t)), 0.1,
                               cfg(max_new_tokens=10), torch.Generator().manual_seed(0), stop)
    mask, response = batch["mask"], batch["tokens"][:, 3:]
    ends = mask.sum(1).long()
    assert 1 < len(set(ends.tolist())) and batch["ended"].any() and not batch["ended"].all()
    for i, n in enumerate(ends.tolist()):
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert batch["ended"][i] == (response[i, n - 1].item() in stop)  # the stop token is the last masked-in token
        assert not any(t in stop for t in response[i, :n - 1].tolist())
    for key in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        assert (batch[key][mask == 0] == 0).all(), key
        assert (batch[key][mask == 1] != 0).any(), key
    last = torch.nn.functional.one_hot(ends - 1, mask.size(1))
    torch.testing.assert_close(batch["rewards"], -0.1 * batch["kl"] + last)  # the KL penalty everywhere, the score of 1 at the end


def test_kl_estimate_is_zero_against_itself_and_positive_after_the_policy_moves():
    policy = tiny_policy(std=0.3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    prompts, score = bos_prompts(64), (lambda t, m, e: torch.zeros(len(t)))
    batch, _ = make_experience(policy, reference, prompts, score, 0.1, cfg(), torch.Generator().manual_seed(0), ())
    assert (batch["kl"] == 0).all()
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch, _ = make_experience(policy, reference, prompts, score, 0.1, cfg(), torch.Generator().manual_seed(0), ())
    assert batch["kl"].sum(1).mean() > 0.5  # nats per response, estimated from the policy's own samples


def train_tiny(policy, reference, score_fn, iters, stop, **overrides):
    """The loop of ppo.train_ppo without its I/O: rollouts, rewards, PPO epochs, the KL controller."""
    c = cfg(**overrides)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=c["learning_rate"], weight_decay=0.0)
    kl_ctl = AdaptiveKLController(c["init_kl_coef"], c["target_kl"], c["kl_horizon"])
    history = []
    for it in range(iters):
        generator = torch.Generator().manual_seed(it)
        batch, _ = make_experience(policy, reference, bos_prompts(c["batch_size"] * c["num_mini_batches"]), score_fn,
                                   kl_ctl.value, c, generator, stop)
        stats = ppo_update(policy, optimizer, batch, c, generator)
        kl_ctl.update(batch["kl"].sum(1).mean().item(), len(batch["tokens"]))
        history.append((batch["scores"].mean().item(), stats))
    return history


def test_ppo_learns_to_end_stories_at_a_short_target_length_and_never_touches_the_reference():
    torch.manual_seed(0)
    policy = tiny_policy()
    reference = copy.deepcopy(policy).requires_grad_(False)
    frozen = copy.deepcopy(reference.state_dict())

    def score_fn(tokens, mask, ended):
        return score_rollouts(tokens, mask, ended, 1, {"length": 1.0}, target_len=4, missing_eos_penalty=1.0)

    history = train_tiny(policy, reference, score_fn, 30, STOP, learning_rate=3e-3, init_kl_coef=0.01)
    before = sum(s for s, _ in history[:3]) / 3
    after = sum(s for s, _ in history[-3:]) / 3
    # at the start a row rarely emits one of the two stop tokens out of 64 (mostly cut off at 12 tokens: score -3)
    assert before < -1.5 and after > -0.5, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert not torch.equal(policy.model.output.weight, reference.model.output.weight)
    assert policy.value_head.weight.abs().sum() > 0  # the zero-initialised value head learned
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
                "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/val/vpred", "ppo/val/clipfrac"):
        assert all(math.isfinite(s[key]) for _, s in history), key


def test_early_stop_ends_the_epochs_once_the_approx_kl_exceeds_the_threshold():
    policy = tiny_policy(std=0.3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    score = lambda t, m, e: (t[:, 1:] < 32).float().sum(1)  # noqa: E731  (varies across rollouts: a gradient to follow)
    (_, stats), = train_tiny(policy, reference, score, 1, (), learning_rate=0.05, ppo_epochs=4, early_stop_kl=1e-6)
    assert stats["ppo/epochs"] == 1
    (_, stats), = train_tiny(policy, reference, score, 1, (), learning_rate=1e-5, ppo_epochs=4, early_stop_kl=1.0)
    assert stats["ppo/epochs"] == 4


# ---------------------------------------------------------------------------
# the command line

FORK = ["--out_dir={out}", "--batch_size=50", "--max_seq_len=512", "--vocab_source=custom", "--vocab_size=512", "--dim=64",
        "--n_layers=5", "--n_heads=8", "--n_kv_heads=4", "--multiple_of=4", "--learning_rate=1e-4", "--init_from=resume",
        "--ppo=True", "--decay_lr=False", "--always_save_checkpoint=True", "--start_len=30", "--init_kl_coef=0.0"]
SMALL = ["--batch_size=4", "--num_mini_batches=2", "--max_new_tokens=8", "--target_len=4", "--ppo_epochs=2",
         "--device=cpu", "--dtype=float32", "--eval_interval=1"]


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """A directory holding a 260K-shaped ckpt.pt as train.py writes it (random weights)."""
    out = tmp_path_factory.mktemp("stories260K")
    torch.manual_seed(0)
    args = {**PRESETS["260K"], "dropout": 0.0}
    meta = json.load(open(os.path.join(small_data, "tok512", "meta.json")))
    save_atomic({"model": Transformer(ModelArgs(**args)).state_dict(), "model_args": args, "iter_num": 100,
                 "best_val_loss": 3.0, "config": {}, "tokenizer": {k: meta[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "bos_id")}},
                str(out / "ckpt.pt"))
    return out


def argv(small_data, out, *flags):
    return [f.format(out=out) for f in FORK] + [f"--data_dir={small_data}", *SMALL, *flags]


def log_rows(out):
    return [json.loads(line) for line in open(out / "ppo_log.jsonl")]


def test_the_forks_command_line_runs_and_a_second_run_resumes_where_the_first_stopped(small_data, pretrained, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    for d in (whole, part):
        shutil.copytree(pretrained, d)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(small_data, whole, "--max_iters=3")], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PPO from" in p.stdout and "ckpt.pt at iteration 0" in p.stdout
    ppo.main(argv(small_data, part, "--max_iters=2"))
    ppo.main(argv(small_data, part, "--max_iters=3"))
    assert "ppo_ckpt.pt at iteration 2" in capsys.readouterr().out
    a, b = log_rows(whole), log_rows(part)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [1, 2, 3]
    for key in ("env/reward_mean", "objective/kl", "ppo/loss/total", "tokens/responses_len_mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key
    ckpt = load_checkpoint(str(part / "ppo_ckpt.pt"))
    assert ckpt["iter_num"] == 3 and ckpt["kl_coef"] == 0.0 and ckpt["config"]["batch_size"] == 4
    assert {"model", "model_args", "tokenizer", "optimizer", "value_head", "reference"} <= ckpt.keys()
    assert os.path.exists(part / "ppo_log.png")
    start = torch.load(pretrained / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, start[k]) for k, v in ckpt["reference"].items())  # the reference is the starting model
    assert not torch.equal(model_from_checkpoint(ckpt).output.weight, start["output.weight"])  # loads like any checkpoint

    md = tmp_path / "reports" / "ppo_length.md"
    write_length_report({**config, "out_dir": str(part), "data_dir": small_data, "device": "cpu", "report_prompts": 8,
                         "report_path": str(md)})
    text = md.read_text()
    assert "| mean distance to target |" in text and "3 PPO iterations of 8 rollouts" in text and text.count("- *after*") == 3
    kl = float(re.search(r"\| KL to the starting model \(nats/response\) \| 0 \| ([-\d.e+]+) \|", text).group(1))
    assert kl != 0.0  # three updates moved the policy (an 8-sample estimate: its sign may go either way)
    assert (tmp_path / "reports" / "ppo_length.png").exists()


def test_two_process_gloo_ddp_keeps_the_ranks_in_sync_on_different_rollouts(small_data, pretrained, tmp_path):
    out = tmp_path / "ddp"
    shutil.copytree(pretrained, out)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
                        *argv(small_data, out, "--max_iters=2")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = log_rows(out)
    assert [r["iter"] for r in rows] == [1, 2] and rows[-1]["rollouts"] == 2 * 2 * 8
    for r in rows:
        assert r["ddp/param_sum"][0] == r["ddp/param_sum"][1]
        assert r["ddp/batch_sum"][0] != r["ddp/batch_sum"][1]
    assert rows[0]["ddp/param_sum"][0] != rows[1]["ddp/param_sum"][0]


@pytest.mark.parametrize("flags, message", [
    (["--reward=lenght"], "error: --reward=lenght: unknown reward 'lenght'"),
    (["--init_from=scratch"], "error: PPO starts from a pretrained model"),
    (["--no_such_key=1"], "error: unknown config key --no_such_key"),
    (["--target_len=8"], "error: --target_len=8 is not below the response cap of 8 tokens"),
    (["--out_dir=/nonexistent/run"], "error: no checkpoint at /nonexistent/run/ckpt.pt"),
])
def test_bad_input_is_a_one_line_error(small_data, pretrained, flags, message):
    with pytest.raises(SystemExit) as e:
        ppo.main(argv(small_data, pretrained, *flags))
    assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code), e.value.code


def test_wandb_offline_receives_every_row_of_the_ppo_log(small_data, pretrained, tmp_path):
    shutil.copytree(pretrained, tmp_path / "out")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(small_data, tmp_path / "out", "--max_iters=2", "--wandb_log=True")],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = log_rows(tmp_path / "out")
    assert len(rows) == 2 and wandb_history(tmp_path / "out") == rows

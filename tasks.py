"""
What the policy is asked to do, and how its answers are scored: each task's prompts and reward, wired
here once for the RL training loop (rl.py), report.py and prefs.py.

  length    prompts: the first start_len tokens of real stories; reward: length_reward at target_len
  rm        the same prompts; reward: a reward model's score (reward_model.py, --rm_path)
  instruct  prompts: instruction headers (tinystories.py instruct); reward: the share of the header's
            constraints the story meets (instruct.py's checker); starts from the SFT model
  a sum     'length:1.0,rm:0.5' weighs the rewards of tasks that share their prompts

Every reward pays missing_eos_penalty for a response cut off at the length cap instead of ending.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common import DataError

CONFIG = dict(  # every RL method's reward keys; report.py and prefs.py read them from the run
    reward="length",  # 'length', 'rm', 'instruct', or a weighted sum such as 'length:1.0,rm:0.5'
    target_len=(200, "> 0"),  # length: the target RESPONSE length in tokens (the fork also counted the prompt)
    missing_eos_penalty=(1.0, ">= 0"),  # subtracted from the score of a response cut off at max_new_tokens
    rm_path="out/rm.pt",  # rm: a reward model written by reward_model.py
    eval_set=("val", "val | ood"),  # instruct: the held-out headers: the validation stories', or unseen word pairings
    token_rewards=False,  # instruct: each constraint's share on the token that meets it (PPO, REINFORCE++ credit it)
)
REWARDS = ("length", "rm", "instruct")


@dataclass
class Task:
    """A task's prompts and reward. Prompts are token lists, BOS first."""

    reward: str  # the spec it was made from
    train_prompts: Callable  # (rng, n) -> n prompts drawn with rng
    eval_prompts: list  # the held-out prompts, in order
    score: Callable  # (rollouts.Rollouts) -> scores (B,)
    measures: (
        Callable  # (rollouts.Rollouts, prompt texts, response texts) -> {name: share}: the task's own held-out measures
    )


def length_reward(lengths, target_len):
    """0 at the target response length, falling linearly by 1 per target_len tokens of distance either way."""
    return -(lengths - target_len).abs() / target_len


def parse_reward(spec):
    """'length', 'rm' or 'length:1.0,rm:0.5' -> {name: weight}."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.partition(":")
        if name not in REWARDS:
            raise DataError(
                f"--reward={spec}: unknown reward {name!r}; use {', '.join(REWARDS)} or a sum like length:1.0,rm:0.5"
            )
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise DataError(f"--reward={spec}: {weight!r} is not a weight") from None
    return weights


def start_checkpoint(cfg):
    """The checkpoint in out_dir an RL stage starts from: the SFT model for instructions, else the pretrained one."""
    return "sft_ckpt.pt" if "instruct" in parse_reward(cfg["reward"]) else "ckpt.pt"


# -----------------------------------------------------------------------------
# story prompts: the beginnings of real stories, from the very token files pretraining read


def story_starts(bin_path, bos_id, start_len):
    """The token file and the offsets of its stories that go on after their first start_len tokens."""
    if not os.path.exists(bin_path):
        raise DataError(f"no token file {bin_path}; run `python tinystories.py pretokenize` first")
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    starts = np.flatnonzero(data == bos_id)
    starts = starts[np.diff(np.append(starts, len(data))) > start_len]
    if len(starts) == 0:
        raise DataError(f"no story in {bin_path} is longer than --start_len={start_len} tokens")
    return data, starts


def prompts_at(data, starts, start_len):
    return data[starts[:, None] + np.arange(start_len)].astype(np.int64).tolist()


def story_prompts(cfg, tok, data_dir, split):
    """(draw(rng, n), the first n held-out ones) of story beginnings from a split's token file."""
    data, starts = story_starts(
        os.path.join(data_dir, f"tok{tok.n_words}", f"{split}.bin"), tok.bos_id, cfg["start_len"]
    )
    return lambda rng, n: prompts_at(
        data, starts[rng.integers(len(starts), size=n)], cfg["start_len"]
    ), lambda n: prompts_at(data, starts[:n], cfg["start_len"])


# -----------------------------------------------------------------------------
# the task of a run


def make_task(cfg, tok, data_dir, max_seq_len, device="cpu", ctx=nullcontext(), trains=True):
    """The Task that cfg's reward (with start_len, target_len, missing_eos_penalty, rm_path, eval_prompts,
    prompt_split) asks for, on the data in data_dir. trains=False: the reward only measures (DPO's
    evaluation), so its settings need not suit training."""
    weights = parse_reward(cfg["reward"])
    if "instruct" in weights:
        import instruct

        if len(weights) > 1:
            raise DataError(f"--reward={cfg['reward']}: instruct takes header prompts, which no other reward shares")
        draw, held_out = instruct.prompts(tok, data_dir, cfg.get("prompt_split", "train"), cfg["eval_set"])
    else:
        if cfg["start_len"] >= max_seq_len:
            raise DataError(f"--start_len={cfg['start_len']} leaves no room in the model's context of {max_seq_len}")
        draw = story_prompts(cfg, tok, data_dir, cfg.get("prompt_split", "train"))[0]
        held_out = story_prompts(cfg, tok, data_dir, "val")[1]
    eval_prompts = held_out(cfg["eval_prompts"])
    cap = min(cfg["max_new_tokens"], max_seq_len - max(map(len, eval_prompts)))
    if "length" in weights and cfg["target_len"] >= cap and trains:
        raise DataError(
            f"--target_len={cfg['target_len']} is not below the response cap of {cap} tokens "
            "(--max_new_tokens, or the context left after the prompt)"
        )
    reward_model = None
    if "rm" in weights:
        from reward_model import load_reward_model

        reward_model = load_reward_model(cfg["rm_path"], device)

    def score(batch):
        return score_rollouts(batch, weights, cfg, reward_model, tok, ctx)

    def measures(batch, prompt_texts, texts):
        """The task's own held-out measures, shares in [0, 1]."""
        if "instruct" in weights:
            return instruct.measures(prompt_texts, texts)
        if "length" in weights:
            return {
                "within_10pct": float(
                    ((batch.lengths() - cfg["target_len"]).abs() <= 0.1 * cfg["target_len"]).float().mean()
                )
            }
        return {}

    return Task(cfg["reward"], draw, eval_prompts, score, measures)


@torch.no_grad()
def score_rollouts(batch, weights, cfg, reward_model=None, tok=None, ctx=nullcontext()):
    """The score of each of a batch of rollouts.Rollouts (B,): the rewards weighted by weights ({name:
    weight}, parse_reward), minus cfg's missing_eos_penalty where a response was cut off instead of
    ending. Sets batch.token_scores (B, R), the same spread over the response's tokens: all on its last
    token, but with token_rewards, an instruction's constraints on the tokens that meet them."""
    total = torch.zeros(len(batch.tokens), device=batch.tokens.device)
    placed = torch.zeros(batch.mask.shape, device=batch.tokens.device)
    if "length" in weights:
        total += weights["length"] * length_reward(batch.lengths(), cfg["target_len"])
    if "rm" in weights:
        lengths = batch.prompt_lens + batch.mask.sum(1).long()  # real tokens, from BOS to the stop token
        chunk = cfg["batch_size"]
        with ctx:
            rm = [
                reward_model.score(batch.tokens[i : i + chunk], lengths[i : i + chunk])
                for i in range(0, len(lengths), chunk)
            ]
        total += weights["rm"] * torch.cat(rm).float()
    if "instruct" in weights:
        import instruct

        scores, at_tokens = instruct.score(batch, tok)
        total += weights["instruct"] * scores.to(total.device)
        if cfg.get("token_rewards"):
            placed += weights["instruct"] * at_tokens.to(total.device)
    total = total - cfg["missing_eos_penalty"] * (~batch.ended).float()
    last = batch.mask.sum(1).long() - 1
    placed[torch.arange(len(total)), last] += total - placed.sum(1)  # the rest of the score at the story's end
    batch.token_scores = placed
    return total

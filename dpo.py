"""
DPO, Direct Preference Optimization (Rafailov et al. 2023): offline, on the preference pairs that
prefs.py writes, with no reward model and no sampling. The loss is the reward model's Bradley-Terry
loss, with the policy's own log-ratio to the reference, beta x (log p - log p_ref) of a response, as
the reward; TRL's DPOTrainer's stat names. rpo_alpha adds the negative log-likelihood of the chosen
response (Pang et al. 2024, TRL's rpo_alpha), against the repetition and the falling likelihood of
both responses that DPO alone can bring. rl_train.py holds the loop and the evaluation.

    python train.py --rl=dpo --pairs=data/prefs_train.jsonl --beta=0.1   # out/ckpt.pt -> out/dpo_ckpt.pt

An iteration is one optimizer step on batch_size pairs that the loop draws at random (per seed,
rank and iteration) from the pairs file. The evaluation still samples stories, on held-out prompts, and
scores them with --reward, so that DPO's runs compare with the online methods'.
"""

import torch
import torch.nn.functional as F

import rl
from common import DataError
from prefs import encode_story

UNIT = "pairs"
config = rl.method_config(
    rl.RUN,
    rl.SAMPLING,
    learning_rate=(1e-5, "> 0"),
    pairs="data/prefs_train.jsonl",  # written by prefs.py: {"prompt", "chosen", "rejected"} a line
    beta=(0.1, "> 0"),  # the strength of the implicit KL to the reference: larger stays closer
    rpo_alpha=(0.0, ">= 0"),  # + rpo_alpha x the chosen responses' NLL per token; 0 = plain DPO
)


def encode_pairs(tok, pairs, max_len):
    """Text pairs -> (chosen ids, rejected ids, P) token lists, each story cut to max_len tokens: the
    first P tokens (BOS and the prompt) are where both stories and the prompt alone agree, the rest is
    the response (a few characters of a prompt may merge with its response into one token). A pair
    whose response the context has no room for teaches nothing and is left out, with a note."""
    out, cut = [], 0
    for p in pairs:
        prompt = tok.encode(p["prompt"], bos=True)
        chosen, rejected = (encode_story(tok, p["prompt"], p[k], None) for k in ("chosen", "rejected"))
        cut += len(chosen) > max_len or len(rejected) > max_len
        chosen, rejected = chosen[:max_len], rejected[:max_len]
        P = 0
        while P < min(len(prompt), len(chosen), len(rejected)) and prompt[P] == chosen[P] == rejected[P]:
            P += 1
        if P < len(chosen) and P < len(rejected):
            out.append((chosen, rejected, P))
    if cut:
        print(f"note: {cut} of {len(pairs)} pairs are longer than the context of {max_len} tokens and were cut to it")
    if not out:
        raise DataError("no pair has a response that fits the model's context")
    return out


def collate_pairs(pairs, device):
    """Encoded pairs -> tokens (2B, T), the chosen stories then the rejected ones, right-padded with 0;
    and mask (2B, T-1), 1 where the predicted token tokens[:, 1:] is a response token."""
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    P = torch.tensor([P for _, _, P in pairs] * 2)
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    tokens = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    pos = torch.arange(1, T)  # the position of each predicted token
    mask = ((pos >= P[:, None]) & (pos < lengths[:, None])).float()
    return tokens.to(device), mask.to(device)


def dpo_loss(logps_chosen, logps_rejected, ref_chosen, ref_rejected, beta):
    """Sequence log-probabilities (B,) of the policy and the reference -> the DPO loss (mean over
    pairs) and the implicit rewards beta x (log p - log p_ref) of the chosen and rejected responses."""
    chosen_rewards, rejected_rewards = beta * (logps_chosen - ref_chosen), beta * (logps_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean(), chosen_rewards, rejected_rewards


def iteration(run, pairs):
    """One DPO step on the loop's list of encoded pairs. Returns the statistics, with TRL's names."""
    cfg = run.cfg
    tokens, mask = collate_pairs(pairs, run.device)
    B = len(pairs)
    with torch.no_grad():
        ref_logprobs, _, _ = rl.forward_logprobs(run.reference, tokens, 1, tokens[:, 1:], 1.0, run.ctx)
    ref = (ref_logprobs * mask).sum(1)

    def loss_fn():
        logprobs, _, _ = rl.forward_logprobs(run.train_policy, tokens, 1, tokens[:, 1:], 1.0, run.ctx)  # (2B, T-1)
        logps = (logprobs * mask).sum(1)
        loss, chosen_rewards, rejected_rewards = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], cfg["beta"])
        nll = -(logprobs[:B] * mask[:B]).sum() / mask[:B].sum()
        with torch.no_grad():
            stats = {
                "loss": loss,
                "nll_loss": nll,
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": logps[:B].mean(),
                "logps/rejected": logps[B:].mean(),
            }
        return loss + cfg["rpo_alpha"] * nll, stats

    return rl.optimizer_step(run, loss_fn, rl.ptx_batches(run) if cfg["ptx_coef"] else None)

"""
The reward model of RLHF: the pretrained transformer trunk and a scalar head on the last real token,
trained on preference pairs (prefs.py) with the Bradley-Terry loss. The RL stages score rollouts with
it (--reward=rm --rm_path=out/rm.pt).

    python reward_model.py --checkpoint=out/ckpt.pt --pairs=data/prefs_train.jsonl --rm_path=out/rm.pt
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import configurator
from common import MetricsLog, one_line_errors, resolve_device_dtype, start_wandb
from model import ModelArgs, Transformer
from prefs import encode_story, pad_right, read_pairs

# -----------------------------------------------------------------------------
config = dict(
    checkpoint="out/ckpt.pt",  # the pretrained model: the trunk the reward model starts from
    pairs="data/prefs_train.jsonl",  # written by prefs.py
    eval_pairs="data/prefs_eval.jsonl",  # held out: prompts from the validation split
    rm_path="out/rm.pt",  # the reward model; its log goes beside it, out/rm_log.jsonl
    seed=1337,
    device="auto",
    # experiment tracking (llama2.c's keys): every row of the log also goes to Weights & Biases
    wandb_log=False,
    wandb_project="tinystories-rl",
    wandb_run_name="",  # empty: wandb names the run
    epochs=(3, "> 0"),
    batch_size=(16, "> 0"),  # pairs per step
    learning_rate=(3e-4, "> 0"),
    weight_decay=(0.0, ">= 0"),
    grad_clip=(1.0, ">= 0"),  # 0.0 = off
)
# -----------------------------------------------------------------------------


class RewardModel(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.params.dim, 1)
        nn.init.zeros_(self.head.weight)  # every reward starts at 0: the first loss is log 2
        nn.init.zeros_(self.head.bias)
        self.tokenizer = None  # set by load_reward_model, for score_texts

    def forward(self, tokens, lengths):
        """tokens (B, T) right-padded, BOS first; lengths (B,) real tokens per row -> rewards (B,).
        The reward is read at position lengths-1: causal attention keeps padding out of it."""
        h = self.trunk.hidden(tokens)  # (B, T, dim)
        last = h[torch.arange(tokens.size(0), device=tokens.device), lengths - 1]  # (B, dim)
        return self.head(last).squeeze(-1).float()

    @torch.no_grad()
    def score(self, tokens, lengths):
        return self(tokens, lengths)

    @torch.no_grad()
    def score_texts(self, prompt_responses, batch_size=32):
        """[(prompt, response), ...] -> rewards, as floats."""
        device = self.head.weight.device
        ids = [encode_story(self.tokenizer, p, r, self.trunk.params.max_seq_len) for p, r in prompt_responses]
        rewards = []
        for i in range(0, len(ids), batch_size):
            tokens, lengths = pad_right(ids[i : i + batch_size], device)
            rewards += self.score(tokens, lengths).tolist()
        return rewards


def bradley_terry_loss(r_chosen, r_rejected):
    """-log P(chosen preferred), P = sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs whose chosen response gets the strictly higher reward."""
    return (r_chosen > r_rejected).float().mean().item()


def encode_pairs(tok, pairs, max_seq_len):
    return [
        (
            encode_story(tok, p["prompt"], p["chosen"], max_seq_len),
            encode_story(tok, p["prompt"], p["rejected"], max_seq_len),
        )
        for p in pairs
    ]


def pair_rewards(rm, batch, device):
    """One forward over the chosen and the rejected stories of a batch of encoded pairs."""
    tokens, lengths = pad_right([c for c, _ in batch] + [r for _, r in batch], device)
    return rm(tokens, lengths).split(len(batch))  # r_chosen (B,), r_rejected (B,)


@torch.no_grad()
def evaluate(rm, encoded, batch_size, device="cpu"):
    was_training = rm.training
    rm.eval()
    chosen, rejected = zip(
        *(pair_rewards(rm, encoded[i : i + batch_size], device) for i in range(0, len(encoded), batch_size))
    )
    rm.train(was_training)
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    return {
        "loss": bradley_terry_loss(r_c, r_r).item(),
        "accuracy": pairwise_accuracy(r_c, r_r),
        "margin": (r_c - r_r).mean().item(),
    }


def train_reward_model(
    rm,
    train_set,
    eval_set,
    epochs,
    batch_size,
    learning_rate,
    weight_decay=0.0,
    grad_clip=1.0,
    seed=1337,
    device="cpu",
    log=None,
):
    """AdamW on the Bradley-Terry loss over shuffled batches of encoded pairs, evaluated on
    eval_set after every epoch. Returns the list of evaluations."""
    optimizer = torch.optim.AdamW(rm.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    history, step = [], 0
    rm.train()
    bar = tqdm(total=epochs * steps_per_epoch, unit="step", dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_set), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            r_c, r_r = pair_rewards(rm, [train_set[j] for j in order[i : i + batch_size]], device)
            loss = bradley_terry_loss(r_c, r_r)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{pairwise_accuracy(r_c, r_r):.2f}")
            if log:
                log(
                    {
                        "step": step,
                        "epoch": epoch,
                        "train/loss": loss.item(),
                        "train/accuracy": pairwise_accuracy(r_c, r_r),
                    }
                )
        result = evaluate(rm, eval_set, batch_size, device)
        history.append(result)
        tqdm.write(f"epoch {epoch}: held-out loss {result['loss']:.4f}, pairwise accuracy {result['accuracy']:.3f}")
        if log:
            log({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in result.items()}})
    bar.close()
    return history


def load_reward_model(path, device="cpu"):
    """The reward model written by reward_model.py, in eval mode and frozen, with its tokenizer."""
    ckpt = checkpoint.load(path, device, kinds=("reward_model",))
    rm = RewardModel(Transformer(ModelArgs(**ckpt["model_args"])))
    rm.load_state_dict(ckpt["model"])
    rm.tokenizer = checkpoint.tokenizer_of(ckpt, path)
    return rm.to(device).eval().requires_grad_(False)


def main(cfg):
    with one_line_errors():
        device = resolve_device_dtype(cfg["device"], "float32")[0]
        ckpt = checkpoint.load(cfg["checkpoint"], kinds=("pretrain", "sft", "import"))
        tok = checkpoint.tokenizer_of(ckpt, cfg["checkpoint"])
        L = ckpt["model_args"]["max_seq_len"]

        def encoded(path):
            pairs = encode_pairs(tok, read_pairs(path), None)
            cut = sum(len(s) > L for pair in pairs for s in pair)
            if cut:
                print(
                    f"{path}: {cut} of {2 * len(pairs)} stories are longer than the context; "
                    f"the reward model reads their first {L} tokens"
                )
            return [(c[:L], r[:L]) for c, r in pairs]

        train_set, eval_set = encoded(cfg["pairs"]), encoded(cfg["eval_pairs"])
        os.makedirs(os.path.dirname(cfg["rm_path"]) or ".", exist_ok=True)
        wandb_run = start_wandb(cfg, os.path.dirname(cfg["rm_path"]) or ".")
    torch.manual_seed(cfg["seed"])
    reward_model = RewardModel(checkpoint.model_from(ckpt)).to(device)
    log_path = os.path.splitext(cfg["rm_path"])[0] + "_log.jsonl"
    log = MetricsLog(log_path, wandb_run=wandb_run)
    before = evaluate(reward_model, eval_set, cfg["batch_size"], device)
    log({"step": 0, "epoch": 0, **{f"eval/{k}": v for k, v in before.items()}})
    history = train_reward_model(
        reward_model,
        train_set,
        eval_set,
        cfg["epochs"],
        cfg["batch_size"],
        cfg["learning_rate"],
        cfg["weight_decay"],
        cfg["grad_clip"],
        cfg["seed"],
        device,
        log,
    )
    shorter = sum((len(c) < len(r)) + 0.5 * (len(c) == len(r)) for c, r in eval_set) / len(eval_set)  # ties: a coin
    print(
        f"held-out pairwise accuracy {history[-1]['accuracy']:.3f} on {len(eval_set)} pairs "
        f"(the rule 'the shorter story is better' gets {shorter:.3f}); log in {log_path}"
    )
    with one_line_errors():  # e.g. a full disk
        checkpoint.save(
            cfg["rm_path"],
            "reward_model",
            reward_model.state_dict(),
            ckpt["model_args"],
            ckpt["tokenizer"],
            ckpt["data_dir"],
            config=cfg,
            base_checkpoint=cfg["checkpoint"],
            eval=history[-1],
        )
        log.commit()
    print(f"saved the reward model to {cfg['rm_path']}")


if __name__ == "__main__":
    main(configurator.configure(config)[0])

"""
The RLHF half of the pipeline around PPO: preferences -> reward model -> (ppo.py) -> evaluation.

    python reward_model.py make_pairs --checkpoint=out/ckpt.pt --num_pairs=1000  # -> data/prefs_{train,eval}.jsonl
    python reward_model.py train --pairs=data/prefs_train.jsonl --out=out/rm.pt   # Bradley-Terry reward model
    python reward_model.py report --before=out/ckpt.pt --after=out/ppo_ckpt.pt     # -> reports/ppo_rlhf.md + .png

The preferences come from a transparent synthetic judge (judge() below), not from people: two
samples of the pretrained model continue the same real story beginning, and the one the judge
scores higher is "chosen". The pairs are plain text, {"prompt", "chosen", "rejected"} a line, so
real human labels can replace them. A response that ends with END ("<|endoftext|>", TinyStories'
own separator) is one whose writer ended the story; as tokens that is the BOS that starts the
next story, as in the token files.
"""
import json
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import configurator
from common import (DataError, atomic_open, jsonl_log, one_line_errors, pyplot, resolve_device_dtype, save_atomic,
                    save_figure, start_wandb)
from model import ModelArgs, Transformer, load_checkpoint, model_from_checkpoint
from tinystories import SEPARATOR as END
from tinystories import iter_batches, load_text, token_dir
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: plain defaults, overridable as --key=value (one set of keys for all three commands)
checkpoint = "out/ckpt.pt"  # the pretrained model: it writes the samples (make_pairs) and is the trunk (train)
data_dir = "data"
pairs = "data/prefs_train.jsonl"  # make_pairs writes, train reads
eval_pairs = "data/prefs_eval.jsonl"  # held out: prompts from the validation split
out = "out/rm.pt"  # the reward model; its log goes beside it, out/rm_log.jsonl
seed = 1337
device = "cpu"
# experiment tracking (llama2.c's keys): every row of train's log also goes to Weights & Biases
wandb_log = False
wandb_project = "tinystories-rl"
wandb_run_name = ""  # empty: wandb names the run
# make_pairs
num_pairs = 1000  # training pairs, prompts from the train split
num_eval_pairs = 200  # held-out pairs, prompts from the end of the validation split
samples_per_prompt = 2  # the judge's best and worst of these make one pair; ties are skipped
start_len = 30  # prompt = the first start_len tokens of a real story, BOS included (as ppo.py's start_len)
max_new_tokens = 0  # 0: up to the model's context
temperature = 1.0  # 1.0 and no top-k/top-p: the model's own distribution, what PPO samples
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
keyword = ""  # a word the judge wants in the story; empty = that component is off
gen_batch_size = 64  # sequences per generate() call
# train
epochs = 3
batch_size = 16  # pairs per step
learning_rate = 3e-4
weight_decay = 0.0
grad_clip = 1.0  # 0.0 = off
# report
before = "out/ckpt.pt"  # the pretrained policy
after = "out/ppo_ckpt.pt"  # the PPO policy
rm = "out/rm.pt"
num_prompts = 128  # validation prompts (from the start of the split), one sample each per policy
val_windows = 64  # windows of max_seq_len tokens of val.bin for the perplexity
num_show = 3  # stories shown side by side
report = "reports/ppo_rlhf.md"  # and the bar chart beside it, .png
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items()  # the lower-case names: END is a constant, not config
          if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str))}
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# the judge: what a children's storyteller cares about, each part a number in [0, 1]

WEIGHTS = {"ending": 0.4, "no_repetition": 0.35, "substance": 0.35, "names": 0.25, "keyword": 0.25}
# A story is more than its opening: without this part, ending at once (ended, nothing repeated) is a
# top score, and PPO finds that in 20 iterations. Real TinyStories continue for 130 words (median).
MIN_STORY_WORDS = 50
SENTENCE_END = re.compile(r"[.!?][\"'”’)]*\s*$")  # . ! or ?, possibly inside a closing quote


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def sentences(text):
    """The sentences of a text as lists of words (split at . ! ? and line breaks)."""
    return [w for w in (words(s) for s in re.split(r"[.!?\n]+", text)) if w]


def repetition(text):
    """Two loop detectors: the fraction of sentences that repeat an earlier one, and of word
    4-grams that repeat an earlier one. Real TinyStories average 0.003 and 0.01."""
    sents = [" ".join(s) for s in sentences(text)]
    w = words(text)
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    return {"dup_sentences": 1 - len(set(sents)) / len(sents) if sents else 0.0,
            "dup_4grams": 1 - len(set(grams)) / len(grams) if grams else 0.0}


def names(text):
    """Capitalised words that do not open a sentence or a quotation: Lily in 'a girl named Lily'.
    A last word the text may cut in two (no space or punctuation after it) is left out."""
    text = re.sub(r"\w+$", "", text)
    found = set()
    for m in re.finditer(r"\b[A-Z][a-z]+\b", text):
        before = text[:m.start()]
        if before.endswith(("\"", "“")):  # the first word of a quotation: said, "Wow
            continue
        before = before.rstrip(" \t\n\"'”’")  # after a closing quote look further back: "Go," Mom said
        if before and before[-1] not in ".!?:":
            found.add(m.group())
    return found


def judge_components(prompt, response, keyword=""):
    """The judge's parts for a story that starts with prompt and goes on with response, each in
    [0, 1], or None where it does not apply (no name in the prompt, no keyword):
      ending        half for ending the story (response ends with END, not cut off at the token
                    limit), half for a complete last sentence (. ! ? or a closing quote)
      no_repetition 1 - the worse of the duplicate-sentence and repeated-4-gram fractions (whole story)
      substance     words in the response over MIN_STORY_WORDS, at most 1: the story goes on
      names         fraction of the prompt's names (capitalised, not sentence-initial) that the
                    response uses again
      keyword       1 if the keyword appears in the response as a word"""
    ended = response.endswith(END)
    response = response.removesuffix(END)
    rep = repetition(prompt + response)
    cast = names(prompt)
    return {
        "ending": 0.5 * ended + 0.5 * bool(SENTENCE_END.search(prompt + response)),
        "no_repetition": 1.0 - max(rep["dup_sentences"], rep["dup_4grams"]),
        "substance": min(1.0, len(words(response)) / MIN_STORY_WORDS),
        "names": sum(bool(re.search(rf"\b{n}\b", response)) for n in cast) / len(cast) if cast else None,
        "keyword": float(bool(re.search(rf"\b{re.escape(keyword)}\b", response, re.I))) if keyword else None,
    }


def judge(prompt, response, keyword=""):
    """The weighted mean of the components that apply, in [0, 1]."""
    parts = {k: v for k, v in judge_components(prompt, response, keyword).items() if v is not None}
    return sum(WEIGHTS[k] * v for k, v in parts.items()) / sum(WEIGHTS[k] for k in parts)


# -----------------------------------------------------------------------------
# preference pairs: samples of the pretrained model, labelled by the judge

def response_text(tok, prompt_ids, response_ids):
    """The text a response adds to its prompt (prompt_ids start with BOS), + END if it ended the
    story. Decoded together with the prompt: alone, a response would lose its leading space."""
    ended = bool(response_ids) and response_ids[-1] in (tok.bos_id, tok.eos_id)
    body = response_ids[:-1] if ended else response_ids
    prompt, full = tok.decode(prompt_ids[1:]), tok.decode(prompt_ids[1:] + body)
    text = full[len(prompt):] if full.startswith(prompt) else tok.decode(body)
    return text + (END if ended else "")


def story_prompts(tok, stories, length):
    """The first `length` tokens (BOS included) of each story long enough to go on after them."""
    encoded = (tok.encode(s) for s in stories)
    return [ids[:length] for ids in encoded if len(ids) > length]


def sample_responses(model, tok, prompts, cfg, generator):
    """One response (new token ids, the stop token included) per prompt, gen_batch_size at a time."""
    room = model.params.max_seq_len - max(len(p) for p in prompts)
    if room <= 0:
        raise DataError(f"prompts of {max(len(p) for p in prompts)} tokens leave no room in the context of {model.params.max_seq_len}")
    n_new = min(cfg["max_new_tokens"] or room, room)
    out = []
    for i in range(0, len(prompts), cfg["gen_batch_size"]):
        out += model.generate(prompts[i:i + cfg["gen_batch_size"]], n_new, cfg["temperature"], cfg["top_k"] or None,
                              cfg["top_p"] if cfg["top_p"] < 1.0 else None, (tok.bos_id, tok.eos_id), generator)
    return out


def make_pairs(model, tok, prompts, n, cfg, generator, desc):
    """Up to n pairs, one per prompt: the judge's best and worst of samples_per_prompt samples."""
    k, pairs, ties = cfg["samples_per_prompt"], [], 0
    step = max(1, cfg["gen_batch_size"] // k)  # prompts per round
    bar = tqdm(total=n, desc=desc, unit="pair")
    for i in range(0, len(prompts), step):
        rows = [p for p in prompts[i:i + step] for _ in range(k)]
        responses = sample_responses(model, tok, rows, cfg, generator)
        for j in range(0, len(rows), k):
            prompt = tok.decode(rows[j][1:])
            texts = [response_text(tok, rows[j], r) for r in responses[j:j + k]]
            scores = [judge(prompt, t, cfg["keyword"]) for t in texts]
            best, worst = max(range(k), key=scores.__getitem__), min(range(k), key=scores.__getitem__)
            if len(pairs) == n:
                break
            if scores[best] == scores[worst]:
                ties += 1
                continue
            pairs.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst],
                          "chosen_judge": round(scores[best], 4), "rejected_judge": round(scores[worst], 4)})
            bar.update(1)
        if len(pairs) == n:
            break
    bar.close()
    print(f"{desc}: {len(pairs)} pairs from {len(pairs) + ties} prompts ({ties} ties skipped)"
          + (", the prompts ran out" if len(pairs) < n else ""))
    return pairs


def write_pairs(pairs, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)


def read_pairs(path):
    """The pairs of a JSONL file: one {"prompt", "chosen", "rejected"} object (strings) a line."""
    if not os.path.isfile(path):
        raise DataError(f"no pairs file {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
                got = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno}: expected string fields prompt, chosen, rejected; got {got}")
            pairs.append(row)
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


# -----------------------------------------------------------------------------
# the reward model: the transformer trunk and a scalar head on the last real token

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
            tokens, lengths = pad_right(ids[i:i + batch_size], device)
            rewards += self.score(tokens, lengths).tolist()
        return rewards


def encode_story(tok, prompt, response, max_seq_len):
    """[BOS] + prompt + response (+ BOS when the response ends with END), at most max_seq_len tokens (None: all)."""
    ended = response.endswith(END)
    ids = tok.encode(prompt + response.removesuffix(END), bos=True) + ([tok.bos_id] if ended else [])
    return ids[:max_seq_len]


def pad_right(seqs, device="cpu"):
    """Token lists -> tokens (B, T) padded with 0 on the right, lengths (B,)."""
    T = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)
    return tokens, torch.tensor([len(s) for s in seqs], device=device)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log P(chosen preferred), P = sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs whose chosen response gets the strictly higher reward."""
    return (r_chosen > r_rejected).float().mean().item()


def encode_pairs(tok, pairs, max_seq_len):
    return [(encode_story(tok, p["prompt"], p["chosen"], max_seq_len),
             encode_story(tok, p["prompt"], p["rejected"], max_seq_len)) for p in pairs]


def pair_rewards(rm, batch, device):
    """One forward over the chosen and the rejected stories of a batch of encoded pairs."""
    tokens, lengths = pad_right([c for c, _ in batch] + [r for _, r in batch], device)
    return rm(tokens, lengths).split(len(batch))  # r_chosen (B,), r_rejected (B,)


@torch.no_grad()
def evaluate(rm, encoded, batch_size, device="cpu"):
    was_training = rm.training
    rm.eval()
    chosen, rejected = zip(*(pair_rewards(rm, encoded[i:i + batch_size], device) for i in range(0, len(encoded), batch_size)))
    rm.train(was_training)
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    return {"loss": bradley_terry_loss(r_c, r_r).item(), "accuracy": pairwise_accuracy(r_c, r_r),
            "margin": (r_c - r_r).mean().item()}


def train_reward_model(rm, train_set, eval_set, epochs, batch_size, learning_rate, weight_decay=0.0, grad_clip=1.0,
                       seed=1337, device="cpu", log=None):
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
            r_c, r_r = pair_rewards(rm, [train_set[j] for j in order[i:i + batch_size]], device)
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
                log({"step": step, "epoch": epoch, "train/loss": loss.item(), "train/accuracy": pairwise_accuracy(r_c, r_r)})
        result = evaluate(rm, eval_set, batch_size, device)
        history.append(result)
        tqdm.write(f"epoch {epoch}: held-out loss {result['loss']:.4f}, pairwise accuracy {result['accuracy']:.3f}")
        if log:
            log({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in result.items()}})
    bar.close()
    return history


def load_reward_model(path, device="cpu"):
    """The reward model written by `train`, in eval mode and frozen, with its tokenizer."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no reward model at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= ckpt.keys() or "head.weight" not in ckpt["model"]:
        raise ValueError(f"{path} is not a reward model written by reward_model.py train")
    rm = RewardModel(Transformer(ModelArgs(**ckpt["model_args"])))
    rm.load_state_dict(ckpt["model"])
    rm.tokenizer = checked_tokenizer(ckpt, path)
    return rm.to(device).eval().requires_grad_(False)


def checked_tokenizer(ckpt, path):
    """The tokenizer a checkpoint was trained with, if its vocabulary fits the model."""
    if not isinstance(ckpt.get("tokenizer"), dict) or "tokenizer" not in ckpt["tokenizer"]:
        raise DataError(f"{path} does not name the tokenizer it was trained with")
    tok = Tokenizer(ckpt["tokenizer"]["tokenizer"])
    if tok.n_words != ckpt["model_args"]["vocab_size"]:
        raise DataError(f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model in {path} {ckpt['model_args']['vocab_size']}")
    return tok


# -----------------------------------------------------------------------------
# evaluation of a policy: metrics importable by ppo.py

def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts together."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def response_logprobs(model, prompts, responses, batch_size=32):
    """Sum of log p(token) over each response's tokens under model: (N,)."""
    device, out = model.freqs_cos.device, []
    for i in range(0, len(prompts), batch_size):
        P = torch.tensor([len(p) for p in prompts[i:i + batch_size]], device=device)
        tokens, lengths = pad_right([p + r for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])], device)
        logp = F.log_softmax(model(tokens)[0].float(), dim=-1)  # (B, T, vocab_size)
        taken = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1): log p of token t+1
        pos = torch.arange(1, tokens.size(1), device=device)  # the position of each predicted token
        in_response = (pos >= P[:, None]) & (pos < lengths[:, None])  # (B, T-1)
        out.append((taken * in_response).sum(1))
    return torch.cat(out)


@torch.no_grad()
def val_perplexity(model, bin_path, windows, seed, batch_size=16):
    """exp of the mean token cross-entropy over the same `windows` random windows of a token file."""
    stream = iter_batches(bin_path, batch_size, model.params.max_seq_len, str(model.freqs_cos.device), seed=seed)
    losses = [model(*next(stream))[1].item() for _ in range(max(1, windows // batch_size))]
    return math.exp(sum(losses) / len(losses))


def mean_se(xs):
    """Mean and standard error."""
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1) / len(xs)) ** 0.5


def sample_metrics(prompt_texts, texts, response_ids, rewards, keyword=""):
    """The judge (overall and by component), reward-model score, diversity, repetition and length
    of one policy's responses to the prompts. texts: response texts (END marks an ended story)."""
    parts = [judge_components(p, t, keyword) for p, t in zip(prompt_texts, texts)]
    bodies = [t.removesuffix(END) for t in texts]
    reps = [repetition(b) for b in bodies]
    m = {"judge": mean_se([judge(p, t, keyword) for p, t in zip(prompt_texts, texts)])}
    for k in WEIGHTS:
        applicable = [c[k] for c in parts if c[k] is not None]
        if applicable:
            m[f"judge: {k}"] = mean_se(applicable)
    m["reward model"] = mean_se(rewards)
    m["ended the story"] = mean_se([float(t.endswith(END)) for t in texts])
    m["distinct-1"] = (distinct_n(bodies, 1), None)
    m["distinct-2"] = (distinct_n(bodies, 2), None)
    m["repeated 4-grams"] = mean_se([r["dup_4grams"] for r in reps])
    m["duplicate sentences"] = mean_se([r["dup_sentences"] for r in reps])
    m["response length (tokens)"] = mean_se([float(len(r)) for r in response_ids])
    return m


def markdown_table(headers, rows):
    """Floats to 4 significant digits; text kept literal (sampled stories hold any character) on one line."""
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        for a, b in (("&", "&amp;"), ("<", "&lt;"), ("|", "\\|"), ("`", "\\`"), ("*", "\\*"), ("_", "\\_"), ("\n", "<br>")):
            x = str(x).replace(a, b)
        return x
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]) + "\n"


def side_by_side(prompt, columns):
    """A prompt and its continuations {name: text}, next to each other in one markdown table."""
    return f"**Prompt:** {prompt}\n\n" + markdown_table(list(columns), [list(columns.values())])


def format_metric(value):
    mean, se = value
    return f"{mean:.4g}" if se is None else f"{mean:.4g} ± {se:.2g}"


def plot_before_after(before_m, after_m, extra, png_path):
    """Bars of the bounded metrics, before and after, and one panel for each of `extra`
    {title: (before, after)}."""
    plt = pyplot()
    keys = [k for k in before_m if k in after_m and k not in ("reward model", "response length (tokens)")]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(11, 4), gridspec_kw={"width_ratios": [4] + [1] * len(extra)})
    x = range(len(keys))
    axes[0].bar([i - 0.2 for i in x], [before_m[k][0] for k in keys], 0.4, label="before")
    axes[0].bar([i + 0.2 for i in x], [after_m[k][0] for k in keys], 0.4, label="after")
    axes[0].set_xticks(list(x), keys, rotation=35, ha="right", fontsize=8)
    axes[0].set_ylim(0, 1.05)
    axes[0].legend()
    for ax, (title, (b, a)) in zip(axes[1:], extra.items()):
        ax.bar([0, 1], [b, a], color=["C0", "C1"])
        ax.set_xticks([0, 1], ["before", "after"], fontsize=8)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, png_path)


# -----------------------------------------------------------------------------
# the three commands

def load_policy(path, device):
    ckpt = load_checkpoint(path, device)
    return model_from_checkpoint(ckpt).to(device).eval(), checked_tokenizer(ckpt, path)


def cmd_make_pairs(cfg):
    model, tok = load_policy(cfg["checkpoint"], cfg["device"])
    if cfg["samples_per_prompt"] < 2:
        raise DataError(f"--samples_per_prompt must be at least 2, not {cfg['samples_per_prompt']}")
    generator = torch.Generator(cfg["device"]).manual_seed(cfg["seed"])
    splits = {"train": (cfg["pairs"], "train", cfg["num_pairs"], 1), "eval": (cfg["eval_pairs"], "val", cfg["num_eval_pairs"], -1)}
    for name, (path, split, n, order) in splits.items():
        prompts = story_prompts(tok, load_text(cfg["data_dir"], split)[::order], cfg["start_len"])
        if not prompts:
            raise DataError(f"no {split} story is longer than --start_len={cfg['start_len']} tokens")
        got = make_pairs(model, tok, prompts, n, cfg, generator, desc=f"{name} pairs")
        write_pairs(got, path)
        margin = sum(p["chosen_judge"] - p["rejected_judge"] for p in got) / max(1, len(got))
        print(f"wrote {len(got)} pairs to {path} (mean judge margin {margin:.3f})")


def cmd_train(cfg):
    ckpt = load_checkpoint(cfg["checkpoint"])
    tok = checked_tokenizer(ckpt, cfg["checkpoint"])
    L = ckpt["model_args"]["max_seq_len"]

    def encoded(path):
        pairs = encode_pairs(tok, read_pairs(path), None)
        cut = sum(len(s) > L for pair in pairs for s in pair)
        if cut:
            print(f"{path}: {cut} of {2 * len(pairs)} stories are longer than the context; the reward model reads their first {L} tokens")
        return [(c[:L], r[:L]) for c, r in pairs]
    train_set, eval_set = encoded(cfg["pairs"]), encoded(cfg["eval_pairs"])
    torch.manual_seed(cfg["seed"])
    reward_model = RewardModel(model_from_checkpoint(ckpt)).to(cfg["device"])
    os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
    log_path = os.path.splitext(cfg["out"])[0] + "_log.jsonl"
    log = jsonl_log(log_path, wandb_run=start_wandb(cfg, os.path.dirname(cfg["out"]) or "."))
    before = evaluate(reward_model, eval_set, cfg["batch_size"], cfg["device"])
    log({"step": 0, "epoch": 0, **{f"eval/{k}": v for k, v in before.items()}})
    history = train_reward_model(reward_model, train_set, eval_set, cfg["epochs"], cfg["batch_size"], cfg["learning_rate"],
                                 cfg["weight_decay"], cfg["grad_clip"], cfg["seed"], cfg["device"], log)
    shorter = sum((len(c) < len(r)) + 0.5 * (len(c) == len(r)) for c, r in eval_set) / len(eval_set)  # ties: a coin
    print(f"held-out pairwise accuracy {history[-1]['accuracy']:.3f} on {len(eval_set)} pairs "
          f"(the rule 'the shorter story is better' gets {shorter:.3f}); log in {log_path}")
    save_atomic({"model": reward_model.state_dict(), "model_args": ckpt["model_args"], "tokenizer": ckpt["tokenizer"],
                 "base_checkpoint": cfg["checkpoint"], "config": cfg, "eval": history[-1]}, cfg["out"])
    print(f"saved the reward model to {cfg['out']}")


def cmd_report(cfg):
    device = cfg["device"]
    policies = {"before": load_policy(cfg["before"], device), "after": load_policy(cfg["after"], device)}
    reward_model = load_reward_model(cfg["rm"], device)
    tok = policies["before"][1]
    if len({t.sp_model.serialized_model_proto() for t in (tok, policies["after"][1], reward_model.tokenizer)}) > 1:
        raise DataError(f"--before={cfg['before']}, --after={cfg['after']} and --rm={cfg['rm']} do not share one tokenizer")
    prompts = story_prompts(tok, load_text(cfg["data_dir"], "val"), cfg["start_len"])[:cfg["num_prompts"]]
    prompt_texts = [tok.decode(p[1:]) for p in prompts]
    bin_path = os.path.join(token_dir(cfg["data_dir"], tok.n_words), "val.bin")
    responses, texts, rewards, metrics, ppl = {}, {}, {}, {}, {}
    for name, (model, _) in policies.items():
        generator = torch.Generator(device).manual_seed(cfg["seed"])  # the same seed for both
        print(f"{name}: {len(prompts)} stories, the reward model, val perplexity")
        responses[name] = sample_responses(model, tok, prompts, cfg, generator)
        texts[name] = [response_text(tok, p, r) for p, r in zip(prompts, responses[name])]
        tokens, lengths = pad_right([p + r for p, r in zip(prompts, responses[name])], device)
        rewards[name] = torch.cat([reward_model.score(tokens[i:i + 32], lengths[i:i + 32]) for i in range(0, len(prompts), 32)]).tolist()
        metrics[name] = sample_metrics(prompt_texts, texts[name], responses[name], rewards[name], cfg["keyword"])
        ppl[name] = val_perplexity(model, bin_path, cfg["val_windows"], cfg["seed"])
    # KL(after || before), estimated on the after-policy's own samples
    kl = (response_logprobs(policies["after"][0], prompts, responses["after"])
          - response_logprobs(policies["before"][0], prompts, responses["after"])).tolist()
    kl_mean, kl_se = mean_se(kl)

    rows = [[k, format_metric(metrics["before"][k]), format_metric(metrics["after"][k]),
             f"{metrics['after'][k][0] - metrics['before'][k][0]:+.4g}"] for k in metrics["before"]]
    rows.append(["validation perplexity", f"{ppl['before']:.4g}", f"{ppl['after']:.4g}", f"{ppl['after'] - ppl['before']:+.4g}"])
    rows.append(["KL(after ‖ before), nats/story", "0", f"{kl_mean:.4g} ± {kl_se:.2g}", ""])
    exact = cfg["temperature"] == 1.0 and not cfg["top_k"] and cfg["top_p"] >= 1.0
    md = ["# RLHF report: before and after PPO\n",
          f"- before: `{cfg['before']}`, after: `{cfg['after']}`, reward model: `{cfg['rm']}`",
          f"- {len(prompts)} validation prompts (the first {cfg['start_len']} tokens of a story, BOS included), one sample "
          f"each per policy, both from seed {cfg['seed']}; temperature {cfg['temperature']}, top_k {cfg['top_k'] or 'off'}, "
          f"top_p {cfg['top_p'] if cfg['top_p'] < 1.0 else 'off'}",
          f"- judge: weighted mean of {', '.join(f'{k} ({w})' for k, w in WEIGHTS.items())} over the parts that apply"
          + (f"; keyword `{cfg['keyword']}`" if cfg["keyword"] else "; no keyword"),
          f"- perplexity: {max(1, cfg['val_windows'] // 16) * 16} windows of {policies['before'][0].params.max_seq_len} tokens of `{bin_path}`",
          "- KL: mean over the after-policy's samples of the sum of log p_after - log p_before over the response"
          + ("" if exact else " (biased: the samples are not from the full distribution with top-k/top-p/temperature)"),
          "- ± is one standard error. If the reward model rises and the judge does not, PPO is exploiting the reward model.\n",
          markdown_table(["metric", "before", "after", "change"], rows),
          "\n![before and after](" + os.path.basename(os.path.splitext(cfg["report"])[0] + ".png") + ")\n",
          "## Stories side by side (same prompt, same seed)\n"]
    for i in range(min(cfg["num_show"], len(prompts))):
        cols = {f"{name} (judge {judge(prompt_texts[i], texts[name][i], cfg['keyword']):.2f}, reward model {rewards[name][i]:.2f})":
                texts[name][i].removesuffix(END) + (" ⏹" if texts[name][i].endswith(END) else " …") for name in texts}
        md.append(side_by_side(prompt_texts[i], cols))
    md.append("⏹: the story ended itself; …: cut off at the token limit.\n")
    os.makedirs(os.path.dirname(cfg["report"]) or ".", exist_ok=True)
    with atomic_open(cfg["report"], "w") as f:
        f.write("\n".join(md))
    png = os.path.splitext(cfg["report"])[0] + ".png"
    plot_before_after(metrics["before"], metrics["after"],
                      {"reward model": (metrics["before"]["reward model"][0], metrics["after"]["reward model"][0]),
                       "val perplexity": (ppl["before"], ppl["after"])}, png)
    print(markdown_table(["metric", "before", "after", "change"], rows))
    print(f"wrote {cfg['report']} and {png}")


COMMANDS = {"make_pairs": cmd_make_pairs, "train": cmd_train, "report": cmd_report}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"error: the first argument must be a command: {', '.join(COMMANDS)}")
    cfg = configurator.configure(config, sys.argv[2:])
    with one_line_errors():
        resolve_device_dtype(cfg["device"], "float32")  # a device this machine lacks is one line here
        COMMANDS[sys.argv[1]](cfg)

"""
The preferences: a transparent synthetic judge of TinyStories and the preference pairs it labels,
which reward_model.py (a Bradley-Terry reward model) and dpo.py (DPO) both learn from.

    python prefs.py --checkpoint=out/ckpt.pt --num_pairs=1000   # -> data/prefs_{train,eval}.jsonl
    python prefs.py --label=length --target_len=170 --pairs=data/prefs_len_train.jsonl --eval_pairs=data/prefs_len_eval.jsonl

Two samples of the pretrained model continue the same real story beginning, and the one the judge
scores higher is "chosen". The judge is not a person: it checks that a story ends, does not loop,
goes on for a while and keeps the prompt's characters (judge() below). The pairs are plain text,
{"prompt", "chosen", "rejected"} a line, so real human labels can replace them. A response that
ends with END ("<|endoftext|>", TinyStories' own separator) is one whose writer ended the story; as
tokens that is the BOS that starts the next story, as in the token files.
"""
import json
import os
import re

import torch
from tqdm import tqdm

import configurator
from common import DataError, atomic_open, one_line_errors, resolve_device_dtype
from model import load_checkpoint, model_from_checkpoint
from tinystories import SEPARATOR as END
from tinystories import load_text
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: plain defaults, overridable as --key=value
checkpoint = "out/ckpt.pt"  # the pretrained model whose samples are judged
data_dir = "data"
pairs = "data/prefs_train.jsonl"  # training pairs: prompts from the train split
eval_pairs = "data/prefs_eval.jsonl"  # held-out pairs: prompts from the end of the validation split
seed = 1337
device = "auto"
num_pairs = 1000
num_eval_pairs = 200
samples_per_prompt = 2  # the judge's best and worst of these make one pair; ties are skipped
start_len = 30  # prompt = the first start_len tokens of a real story, BOS included (as the RL stages' start_len)
max_new_tokens = 0  # 0: up to the model's context
temperature = 1.0  # 1.0 and no top-k/top-p: the model's own distribution, what RL samples
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
keyword = ""  # a word the judge wants in the story; empty = that component is off
label = "judge"  # who prefers: 'judge', or 'length' (the RL stages' length reward at target_len: DPO on the length task)
target_len = 200  # label=length: the target response length in tokens; a response cut off at the cap pays 1, as there
gen_batch_size = 64  # sequences per generate() call
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


def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts together."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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
    n_new = min(cfg["max_new_tokens"] or room, room)
    out = []
    for i in range(0, len(prompts), cfg["gen_batch_size"]):
        out += model.generate(prompts[i:i + cfg["gen_batch_size"]], n_new, cfg["temperature"], cfg["top_k"] or None,
                              cfg["top_p"] if cfg["top_p"] < 1.0 else None, (tok.bos_id, tok.eos_id), generator)
    return out


def length_score(tok, response_ids, target_len):
    """The RL stages' length reward of a response (new token ids): -|story tokens - target_len| / target_len,
    minus 1 (the missing-EOS penalty) if it was cut off instead of ending its story."""
    ended = bool(response_ids) and response_ids[-1] in (tok.bos_id, tok.eos_id)
    return -abs(len(response_ids) - ended - target_len) / target_len - (not ended)


def make_pairs(model, tok, prompts, n, cfg, generator, desc):
    """Up to n pairs, one per prompt: the best and worst of samples_per_prompt samples by the label
    (the judge's score or the length reward), their scores kept as chosen_score and rejected_score."""
    k, pairs, ties = cfg["samples_per_prompt"], [], 0
    step = max(1, cfg["gen_batch_size"] // k)  # prompts per round
    bar = tqdm(total=n, desc=desc, unit="pair")
    for i in range(0, len(prompts), step):
        rows = [p for p in prompts[i:i + step] for _ in range(k)]
        responses = sample_responses(model, tok, rows, cfg, generator)
        for j in range(0, len(rows), k):
            prompt = tok.decode(rows[j][1:])
            texts = [response_text(tok, rows[j], r) for r in responses[j:j + k]]
            scores = ([judge(prompt, t, cfg["keyword"]) for t in texts] if cfg["label"] == "judge" else
                      [length_score(tok, r, cfg["target_len"]) for r in responses[j:j + k]])
            best, worst = max(range(k), key=scores.__getitem__), min(range(k), key=scores.__getitem__)
            if len(pairs) == n:
                break
            if scores[best] == scores[worst]:
                ties += 1
                continue
            pairs.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst],
                          "chosen_score": round(scores[best], 4), "rejected_score": round(scores[worst], 4)})
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


def checked_tokenizer(ckpt, path):
    """The tokenizer a checkpoint was trained with, if its vocabulary fits the model."""
    if not isinstance(ckpt.get("tokenizer"), dict) or "tokenizer" not in ckpt["tokenizer"]:
        raise DataError(f"{path} does not name the tokenizer it was trained with")
    tok = Tokenizer(ckpt["tokenizer"]["tokenizer"])
    if tok.n_words != ckpt["model_args"]["vocab_size"]:
        raise DataError(f"tokenizer {tok.model_path} has {tok.n_words} tokens, the model in {path} {ckpt['model_args']['vocab_size']}")
    return tok


def load_policy(path, device):
    """A checkpoint's model, in eval mode on device, and the tokenizer it was trained with."""
    ckpt = load_checkpoint(path, device)
    return model_from_checkpoint(ckpt).to(device).eval(), checked_tokenizer(ckpt, path)


def main(cfg):
    with one_line_errors():
        device = resolve_device_dtype(cfg["device"], "float32")[0]
        model, tok = load_policy(cfg["checkpoint"], device)
        if cfg["samples_per_prompt"] < 2:
            raise DataError(f"--samples_per_prompt must be at least 2, not {cfg['samples_per_prompt']}")
        if cfg["label"] not in ("judge", "length"):
            raise DataError(f"--label must be judge or length, not {cfg['label']!r}")
        if cfg["start_len"] >= model.params.max_seq_len:
            raise DataError(f"--start_len={cfg['start_len']} leaves no room in the model's context of {model.params.max_seq_len}")
        # training prompts from the start of the train split, held-out ones from the end of the validation split
        jobs = []
        for name, path, split, n, order in (("train", cfg["pairs"], "train", cfg["num_pairs"], 1),
                                            ("eval", cfg["eval_pairs"], "val", cfg["num_eval_pairs"], -1)):
            prompts = story_prompts(tok, load_text(cfg["data_dir"], split)[::order], cfg["start_len"])
            if not prompts:
                raise DataError(f"no {split} story is longer than --start_len={cfg['start_len']} tokens")
            jobs.append((name, path, prompts, n))
    generator = torch.Generator(device).manual_seed(cfg["seed"])
    for name, path, prompts, n in jobs:
        got = make_pairs(model, tok, prompts, n, cfg, generator, desc=f"{name} pairs")
        write_pairs(got, path)
        margin = sum(p["chosen_score"] - p["rejected_score"] for p in got) / max(1, len(got))
        print(f"wrote {len(got)} pairs to {path} (mean {cfg['label']} margin {margin:.3f})")


if __name__ == "__main__":
    main(configurator.configure(config))

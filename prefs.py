"""
The preferences: pairs of the pretrained model's samples, labelled by the judge (metrics.py) or by a
task's reward, which reward_model.py (a Bradley-Terry reward model) and dpo.py (DPO) both learn from.

    python prefs.py --checkpoint=out/ckpt.pt --num_pairs=1000   # -> data/prefs_{train,eval}.jsonl
    python prefs.py --label=length --target_len=170 --pairs=data/len_train.jsonl --eval_pairs=data/len_eval.jsonl
    python prefs.py --label=instruct --checkpoint=out/sft_ckpt.pt --pairs=data/instruct_pairs_train.jsonl \
        --eval_pairs=data/instruct_pairs_eval.jsonl   # DPO on instructions: the SFT model's stories for a header

Two samples of the pretrained model continue the same real story beginning, and the one the judge
scores higher is "chosen". With --label=instruct the prompts are instruction headers (tinystories.py
instruct) and the story meeting more of its header's constraints (instruct.py's checker) is chosen.
The pairs are plain text, {"prompt", "chosen", "rejected"} a line, so real human labels can replace
them. A response that ends with END ("<|endoftext|>", TinyStories' own separator) is one whose writer
ended the story; as tokens that is the BOS that starts the next story, as in the token files.
"""

import json
import os

import torch
from tqdm import tqdm

import checkpoint
import configurator
import instruct
from common import DataError, atomic_open, one_line_errors, resolve_device_dtype
from metrics import judge, response_text
from tasks import length_reward
from tinystories import SEPARATOR as END
from tinystories import load_text

# -----------------------------------------------------------------------------
config = dict(
    checkpoint="out/ckpt.pt",  # the pretrained model whose samples are judged
    data_dir="",  # empty: the checkpoint's (where an older one records none, give it)
    pairs="data/prefs_train.jsonl",  # training pairs: prompts from the train split
    eval_pairs="data/prefs_eval.jsonl",  # held-out pairs: prompts from the end of the validation split
    seed=1337,
    device="auto",
    num_pairs=(1000, ">= 0"),
    num_eval_pairs=(200, ">= 0"),
    samples_per_prompt=(2, ">= 2"),  # the label's best and worst of these make one pair; ties are skipped
    start_len=(
        30,
        "> 0",
    ),  # prompt = the first start_len tokens of a real story, BOS included (as the RL stages' start_len)
    max_new_tokens=(0, ">= 0"),  # 0: up to the model's context
    temperature=(1.0, "> 0"),  # 1.0 and no top-k/top-p: the model's own distribution, what RL samples
    top_k=(0, ">= 0"),  # 0 = off
    top_p=(1.0, "(0, 1]"),  # 1.0 = off
    keyword="",  # a word the judge wants in the story; empty = that component is off
    label=(
        "judge",
        "judge | length | instruct",
    ),  # who prefers: the judge, the RL stages' length reward at target_len, or the instruction checker
    target_len=(
        200,
        "> 0",
    ),  # label=length: the target response length in tokens; a response cut off at the cap pays 1, as there
    gen_batch_size=(64, "> 0"),  # sequences per generate() call
)
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# preference pairs: samples of the pretrained model, labelled by the judge


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
        out += model.generate(
            prompts[i : i + cfg["gen_batch_size"]],
            n_new,
            cfg["temperature"],
            cfg["top_k"] or None,
            cfg["top_p"] if cfg["top_p"] < 1.0 else None,
            (tok.bos_id, tok.eos_id),
            generator,
        )
    return out


def length_score(tok, response_ids, target_len):
    """The RL stages' length reward of a response (new token ids, tasks.length_reward), minus 1 (the
    missing-EOS penalty) if it was cut off instead of ending its story."""
    ended = bool(response_ids) and response_ids[-1] in (tok.bos_id, tok.eos_id)
    return float(length_reward(torch.tensor(float(len(response_ids) - ended)), target_len)) - (not ended)


def make_pairs(model, tok, prompts, n, cfg, generator, desc):
    """Up to n pairs, one per prompt: the best and worst of samples_per_prompt samples by the label
    (the judge's score or the length reward), their scores kept as chosen_score and rejected_score."""
    k, pairs, ties = cfg["samples_per_prompt"], [], 0
    step = max(1, cfg["gen_batch_size"] // k)  # prompts per round
    bar = tqdm(total=n, desc=desc, unit="pair")
    for i in range(0, len(prompts), step):
        rows = [p for p in prompts[i : i + step] for _ in range(k)]
        responses = sample_responses(model, tok, rows, cfg, generator)
        for j in range(0, len(rows), k):
            prompt = tok.decode(rows[j][1:])
            texts = [response_text(tok, rows[j], r) for r in responses[j : j + k]]
            if cfg["label"] == "judge":
                scores = [judge(prompt, t, cfg["keyword"]) for t in texts]
            elif cfg["label"] == "instruct":
                scores = [instruct.reward(t.removesuffix(END), prompt) for t in texts]
            else:
                scores = [length_score(tok, r, cfg["target_len"]) for r in responses[j : j + k]]
            best, worst = max(range(k), key=scores.__getitem__), min(range(k), key=scores.__getitem__)
            if len(pairs) == n:
                break
            if scores[best] == scores[worst]:
                ties += 1
                continue
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": texts[best],
                    "rejected": texts[worst],
                    "chosen_score": round(scores[best], 4),
                    "rejected_score": round(scores[worst], 4),
                }
            )
            bar.update(1)
        if len(pairs) == n:
            break
    bar.close()
    print(
        f"{desc}: {len(pairs)} pairs from {len(pairs) + ties} prompts ({ties} ties skipped)"
        + (", the prompts ran out" if len(pairs) < n else "")
    )
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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected an object of prompt, chosen, rejected; got {type(row).__name__}"
                )
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise DataError(
                        f"{path}:{lineno}: no {key!r} (expected prompt, chosen, rejected; got {', '.join(row)})"
                    )
                if not isinstance(row[key], str):
                    raise DataError(f"{path}:{lineno}: {key!r} is {type(row[key]).__name__}, not a string")
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


def load_policy(path, device):
    """A checkpoint's model, in eval mode on device, and the tokenizer it was trained with."""
    ckpt = checkpoint.load(path, device)
    return checkpoint.model_from(ckpt).to(device).eval(), checkpoint.tokenizer_of(ckpt, path), ckpt


def main(cfg, given):
    with one_line_errors():
        device = resolve_device_dtype(cfg["device"], "float32")[0]
        model, tok, ckpt = load_policy(cfg["checkpoint"], device)
        checkpoint.check_given(ckpt, cfg["checkpoint"], given)
        data_dir = checkpoint.data_dir_of(ckpt, cfg["checkpoint"], cfg["data_dir"])
        if cfg["start_len"] >= model.params.max_seq_len:
            raise DataError(
                f"--start_len={cfg['start_len']} leaves no room in the model's context of {model.params.max_seq_len}"
            )
        # training prompts from the start of the train split, held-out ones from the end of the validation split
        jobs = []
        for name, path, split, n, order in (
            ("train", cfg["pairs"], "train", cfg["num_pairs"], 1),
            ("eval", cfg["eval_pairs"], "val", cfg["num_eval_pairs"], -1),
        ):
            if cfg["label"] == "instruct":
                prompts = instruct.header_prompts(tok, data_dir, f"instruct_{split}.jsonl")[::order]
            else:
                prompts = story_prompts(tok, load_text(data_dir, split)[::order], cfg["start_len"])
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
    main(*configurator.configure(config))

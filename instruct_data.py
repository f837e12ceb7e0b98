"""
The instruction set, built from the stories themselves (tinystories.py instruct): each story cut to
fit the context, up to HEADERS_PER_STORY headers of constraints it meets (instruct.py), their tokens
for supervised fine-tuning, and headers whose words no training story holds together.

    python tinystories.py instruct --vocab_size=N   # -> data/tok{N}/instruct_*

The words: content words whose part of speech is plain from the word or its neighbour
(content_readings: "jumped", "the play", "can swim", "was brave"), in the part of the story kept, that
at most MAX_WORD_SHARE of the training stories hold, drawn by a seed per story. Measured on the shared
2,321 training stories at vocab 512, a cap of 0.1 keeps 72% of the stories, 0.2 82%, 0.25 85%, none
95%, and an unrelated story holds a header word 3%, 6%, 7%, 22% of the time. 0.2 leaves out say, go,
see, want, look, play, make, day, time, friend, girl, happy, big, little, good, fun, excited, sad;
the stories it drops have no rarer adjective (or verb) in the part kept.

The context: the default model reads 256 tokens, and at vocab 512 a story averages 428 (2% fit
whole beside a header of ~37 tokens, 77% would in 512, 98% in 1,024). Keeping only the stories that
fit leaves ~50 of the 2,321; a longer context is another model (--max_seq_len=512 writes for it).
So a story is cut at its last sentence end (outside quotations) such that BOS + header + story + BOS
fits max_seq_len, the constraints are taken from the part kept, and an example keeps at least
MIN_KEPT_SENTENCES sentences. Measured at max_seq_len 256 on the shared data: at vocab 512, 98% of
the examples are cut, keeping 54% of their story's text, 6/8/11 sentences (10th/50th/90th percentile)
and 179/200/218 story tokens; at vocab 4096 (~24 header tokens) 29% are cut, keeping 92% of the text
and 144/194/222 tokens. A cut story still ends with BOS in its example, so the model learns to end a
story there; the index marks those examples for a trainer that would rather not train on that end.

Files, in data/tok{N}/:
    instruct_{train,val}.jsonl   an example a line: {"header", "constraints", "story" (as kept), "truncated"}
    instruct_{train,val}.bin     uint16 tokens, example after example: BOS, header, story, BOS
    instruct_{train,val}.idx     int64 rows of 4, one an example: start (its first token's offset in
                                 the .bin), prompt length (BOS + header), length (prompt + story +
                                 BOS), truncated (0 or 1). A loss on the response predicts tokens
                                 start + prompt length .. start + length - 1.
    instruct_ood.jsonl           N_OOD headers {"header", "constraints"} whose words no training story
                                 holds together: each word from the content words of at least
                                 MIN_POOL_STORIES training stories, drawn apart; dialogue and a name at
                                 the training examples' rates
    instruct_meta.json           counts, the share of examples with each constraint, kept lengths,
                                 the tokenizer's sha256
A training story gives up to HEADERS_PER_STORY examples with different words (the same cut). At 4,
97% of the stories give 4, 73% of a story's eligible words are named in some header (1: 31%, 2: 50%,
8: 91%) and the headers name 1,988 different words (1: 1,329, 8: 2,203): most of what 8 gives, at
half the examples. A validation story gives one: held-out in-distribution headers, 736 at vocab 512
(836 at 4096).
"""

import collections
import hashlib
import json
import os
import random
import re

import lemminflect
import numpy as np

from common import DataError, atomic_open
from instruct import POS, check, content_words, has_dialogue, held, main_name, render_header

# -----------------------------------------------------------------------------
# examples: a story cut to fit the context, its headers, their tokens

MAX_WORD_SHARE = 0.2  # a header word is one that at most this share of the training stories hold
MIN_KEPT_SENTENCES = 3  # an example keeps at least this many sentences of its story
SENTENCE_END = re.compile(r"[.!?][\"'”’)]*(?=\s|$)")  # . ! or ? (and a closing quote) before a space


def sentence_ends(text):
    """Where the text's sentences end (SENTENCE_END), outside quotations: '"Hi. Come here!"' ends once."""
    return [
        m.end()
        for m in SENTENCE_END.finditer(text)
        if text.count('"', 0, m.end()) % 2 == 0 and text.count("“", 0, m.end()) <= text.count("”", 0, m.end())
    ]


def cut(story, encode, budget):
    """The longest beginning of a story that ends a sentence and fits in budget tokens, the whole
    story if it fits: (text, token ids, truncated), or None when not even one sentence fits."""
    ids = encode(story)
    if len(ids) <= budget:
        return story, ids, False
    ends = sentence_ends(story)
    best, lo, hi = None, 0, len(ends)
    while lo < hi:  # binary search: a longer beginning never has fewer tokens
        mid = (lo + hi) // 2
        ids = encode(story[: ends[mid]])
        if len(ids) <= budget:
            best, lo = (story[: ends[mid]], ids, True), mid + 1
        else:
            hi = mid
    return best


def choose(story, rng, allowed, k):
    """Up to k constraints of a story, each with other words, each met by the story: one noun, verb
    and adjective drawn from its content_words that allowed(lemma, pos) admits, whether it has
    dialogue, its main character's name (if the story names them in a real sentence)."""
    words = content_words(story)
    pools = [sorted(lemma for lemma, p in words if p == pos and allowed(lemma, pos)) for pos in POS]
    if not all(pools):
        return []
    dialogue, name = has_dialogue(story), main_name(story)
    if name and not check(story, {"words": [], "dialogue": False, "name": name})["name"]:
        name = None
    out = []
    for _ in range(4 * k):  # a draw whose words crowd one sentence fails check(): draw again
        c = {"words": [[rng.choice(pool), pos] for pool, pos in zip(pools, POS)], "dialogue": dialogue, "name": name}
        if c not in out and check(story, c)["all"]:
            out.append(c)
            if len(out) == k:
                break
    return out


def examples(story, encode, rng, allowed, k, max_seq_len):
    """The examples of a story: [(constraints, header, header ids, story kept, its ids, truncated)],
    up to k, all with the same cut of the story, each BOS + header + story + BOS within max_seq_len.
    The constraints come from the part kept; the header's length decides where the story is cut,
    so cut and choose again until the longest header fits (it ends: each round cuts shorter)."""
    room, header_len = max_seq_len - 2, 0  # 2: BOS in front, the end-of-story BOS behind
    while True:
        kept = cut(story, encode, room - header_len)
        if kept is None or len(sentence_ends(kept[0])) < MIN_KEPT_SENTENCES:
            return []
        text, ids, truncated = kept
        cs = choose(text, rng, allowed, k)
        headers = [render_header(c) for c in cs]
        header_ids = [encode(h) for h in headers]
        header_len = max(map(len, header_ids), default=0)
        if len(ids) + header_len <= room:
            return [(c, h, hi, text, ids, truncated) for c, h, hi in zip(cs, headers, header_ids)]


# -----------------------------------------------------------------------------
# the stage: instruction data for each split, and headers no training story meets

HEADERS_PER_STORY = 4
N_OOD = 1000  # out-of-distribution headers to write
# an out-of-distribution word (name) is a content word (main character) of this many training stories
MIN_POOL_STORIES = 3


def word_counts(stories):
    """The training stories' counts: (stories, {(lemma, POS): stories that hold it}, {(lemma, POS):
    stories with it as a content word}, {name: stories whose main character it names})."""
    n, held_counts, content_counts, names = 0, collections.Counter(), collections.Counter(), collections.Counter()
    for story in stories:
        n += 1
        held_counts.update(held(story))
        content_counts.update(content_words(story))
        names[main_name(story)] += 1
    del names[None]
    return n, held_counts, content_counts, names


def write_split(stories, path, encode, bos_id, seed, allowed, k, max_seq_len, seen=None):
    """Write the examples of a split's stories to path.{jsonl,bin,idx} as they are made; returns
    their summary. seen(story) is called with every story (the out-of-distribution check)."""
    n_stories, n_kept, offset, shares = 0, 0, 0, collections.Counter()
    story_tokens = np.zeros(max_seq_len + 1, np.int64)  # a histogram: examples by story length
    with atomic_open(f"{path}.jsonl", "w") as fj, atomic_open(f"{path}.bin") as fb, atomic_open(f"{path}.idx") as fi:
        for story in stories:
            if seen:
                seen(story)
            got = examples(story, encode, random.Random(f"{seed}\n{story}"), allowed, k, max_seq_len)
            n_stories, n_kept = n_stories + 1, n_kept + bool(got)
            for c, header, header_ids, text, ids, truncated in got:
                tokens = np.array([bos_id, *header_ids, *ids, bos_id], np.uint16)
                fb.write(tokens.tobytes())
                fi.write(np.array([offset, 1 + len(header_ids), len(tokens), truncated], np.int64).tobytes())
                fj.write(json.dumps({"header": header, "constraints": c, "story": text, "truncated": truncated}) + "\n")
                offset += len(tokens)
                shares.update(
                    dialogue=c["dialogue"], name=bool(c["name"]), truncated=truncated, prompt_tokens=1 + len(header_ids)
                )
                story_tokens[len(ids)] += 1
    n = max(1, int(story_tokens.sum()))
    quantiles = np.searchsorted(np.cumsum(story_tokens), [0.1 * n, 0.5 * n, 0.9 * n])
    return {
        "stories": n_stories,
        "stories_kept": n_kept,
        "examples": int(story_tokens.sum()),
        **{f"share_{key}": round(shares[key] / n, 4) for key in ("dialogue", "name", "truncated")},
        "mean_prompt_tokens": round(shares["prompt_tokens"] / n, 1),
        "mean_story_tokens": round(float(story_tokens @ np.arange(max_seq_len + 1)) / n, 1),
        "story_tokens_p10_p50_p90": quantiles.tolist(),
    }


def prepare(stories, tok, out_dir, max_seq_len=256, headers_per_story=HEADERS_PER_STORY, seed=1337, quiet=False):
    """Write out_dir/instruct_{train,val}.{jsonl,bin,idx}, instruct_ood.jsonl and instruct_meta.json
    from stories(split, desc), the split's stories in order (read as they are needed, twice for
    train); returns the meta dict."""
    if headers_per_story < 1:
        raise DataError(f"--headers_per_story must be at least 1, not {headers_per_story}")
    n_train, held_counts, content_counts, names = word_counts(stories("train", "counting words"))

    def allowed(lemma, pos):
        return held_counts[lemma, pos] <= MAX_WORD_SHARE * n_train

    # out-of-distribution words: each common enough in training, their combination in no training story
    rng = random.Random(seed)
    pools = [
        sorted(
            lemma
            for (lemma, p), n in content_counts.items()
            if p == pos and n >= MIN_POOL_STORIES and allowed(lemma, pos)
        )
        for pos in POS
    ]
    if not all(pools):
        raise DataError(
            f"too few training stories ({n_train}): no {POS[[bool(p) for p in pools].index(False)]} "
            f"is a content word of {MIN_POOL_STORIES} of them"
        )
    drawn = {}  # an ordered set, 4x what is needed: on the full dataset some combinations are in a training story
    for _ in range(40 * N_OOD):  # (the pools of a tiny dataset may hold fewer)
        drawn[tuple((rng.choice(pool), pos) for pool, pos in zip(pools, POS))] = True
        if len(drawn) == 4 * N_OOD:
            break
    n_drawn, by_noun = len(drawn), collections.defaultdict(list)
    for words in drawn:
        by_noun[words[0]].append(words)

    def seen(story):  # drop the combinations this training story holds
        have = held(story)
        for noun in have & by_noun.keys():
            for words in by_noun[noun]:
                if words[1] in have and words[2] in have:
                    drawn.pop(words, None)

    encode = tok.sp_model.encode
    with open(tok.model_path, "rb") as f:
        meta = {
            "tokenizer": tok.model_path,
            "tokenizer_sha256": hashlib.sha256(f.read()).hexdigest(),
            "vocab_size": tok.n_words,
            "bos_id": tok.bos_id,
            "max_seq_len": max_seq_len,
            "headers_per_story": headers_per_story,
            "seed": seed,
            "max_word_share": MAX_WORD_SHARE,
            "min_kept_sentences": MIN_KEPT_SENTENCES,
            "lemminflect": lemminflect.__version__,
        }
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "val"):  # one header per validation story: held-out headers, not more SFT data
        k = headers_per_story if split == "train" else 1
        meta[split] = write_split(
            stories(split, split),
            os.path.join(out_dir, f"instruct_{split}"),
            encode,
            tok.bos_id,
            seed,
            allowed,
            k,
            max_seq_len,
            seen if split == "train" else None,
        )
        if not meta[split]["examples"]:
            raise DataError(
                f"no {split} story keeps {MIN_KEPT_SENTENCES} sentences beside its header "
                f"in --max_seq_len={max_seq_len}"
            )

    # dialogue and a name at the rates of the training examples; a name as often as it is a main character's
    names = sorted((n, count) for n, count in names.items() if count >= MIN_POOL_STORIES)
    ood = []
    for words in list(drawn)[:N_OOD]:
        dialogue, named = rng.random() < meta["train"]["share_dialogue"], rng.random() < meta["train"]["share_name"]
        ood.append(
            {
                "words": [list(w) for w in words],
                "dialogue": dialogue,
                "name": rng.choices([n for n, _ in names], [count for _, count in names])[0] if named else None,
            }
        )
    with atomic_open(os.path.join(out_dir, "instruct_ood.jsonl"), "w") as f:
        f.writelines(json.dumps({"header": render_header(c), "constraints": c}) + "\n" for c in ood)
    meta["ood"] = {
        "headers": len(ood),
        "drawn": n_drawn,
        "in_training": n_drawn - len(drawn),
        "share_dialogue": round(sum(c["dialogue"] for c in ood) / max(1, len(ood)), 4),
        "share_name": round(sum(bool(c["name"]) for c in ood) / max(1, len(ood)), 4),
        "pools": dict(zip(POS, map(len, pools))),
    }
    with atomic_open(os.path.join(out_dir, "instruct_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        for split in ("train", "val"):
            m = meta[split]
            print(
                f"{out_dir}/instruct_{split}: {m['examples']:,} examples from {m['stories_kept']:,} of "
                f"{m['stories']:,} stories; dialogue {m['share_dialogue']:.0%}, name {m['share_name']:.0%}, "
                f"truncated {m['share_truncated']:.0%}; {m['mean_prompt_tokens']} prompt and "
                f"{m['mean_story_tokens']} story tokens on average"
            )
        print(f"{out_dir}/instruct_ood.jsonl: {len(ood)} headers whose words no training story holds together")
    return meta


def read_examples(token_dir, split, max_seq_len):
    """A split's SFT examples for a model of context max_seq_len: the token file (memory-mapped) and,
    per example, its start, prompt length (BOS + header) and length (prompt + story + end)."""
    path = os.path.join(token_dir, f"instruct_{split}")
    if not os.path.exists(path + ".idx"):
        raise DataError(f"no instruction data {path}.bin; run `python tinystories.py instruct --vocab_size=N` first")
    with open(os.path.join(token_dir, "instruct_meta.json")) as f:
        built_for = json.load(f)["max_seq_len"]
    if built_for > max_seq_len:
        raise DataError(
            f"{path}.bin was built for a context of {built_for} tokens, longer than the model's {max_seq_len}; "
            f"run `python tinystories.py instruct --max_seq_len={max_seq_len}`"
        )
    index = np.fromfile(path + ".idx", dtype=np.int64).reshape(-1, 4)
    return np.memmap(path + ".bin", dtype=np.uint16, mode="r"), index[:, 0], index[:, 1], index[:, 2]

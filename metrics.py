"""
How good a model's stories are, measured: the held-out evaluation of every RL run and report, the
fluency measures that RL must keep (NLL ratio, share of known words, perplexity, distinct-n), and
a transparent judge of TinyStories. Nothing here trains; every function measures.

The judge is not a person: it checks that a story ends, does not loop, goes on for a while and keeps
the prompt's characters (judge() below). prefs.py labels preference pairs with it; the RL reports
show it as a held-out measure that no method trains on.
"""

import collections
import math
import re
from contextlib import nullcontext

import numpy as np
import torch

from tinystories import SEPARATOR as END
from tinystories import iter_batches, load_text

# -----------------------------------------------------------------------------
# words, sentences and the fluency of text


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def letter_words(text):
    """The words of a text, letters only, lower-cased: 'Lily's 2 cats!' -> ['lily', 's', 'cats']."""
    return re.findall(r"[^\W\d_]+", text.lower())


def training_words(data_dir):
    """Every word (letters only, lower-cased) of the training text: the vocabulary of fluent stories."""
    return {w for story in load_text(data_dir, "train") for w in letter_words(story)}


def word_share(texts, vocabulary):
    """The share of the texts' words that occur in vocabulary (made-up words and byte soup do not)."""
    found = [w in vocabulary for t in texts for w in letter_words(t)]
    return sum(found) / len(found) if found else 0.0


def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts together."""
    grams = [tuple(w[i : i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sentences(text):
    """The sentences of a text as lists of words (split at . ! ? and line breaks)."""
    return [w for w in (words(s) for s in re.split(r"[.!?\n]+", text)) if w]


def repetition(text):
    """Two loop detectors: the fraction of sentences that repeat an earlier one, and of word
    4-grams that repeat an earlier one. Real TinyStories average 0.003 and 0.01."""
    sents = [" ".join(s) for s in sentences(text)]
    w = words(text)
    grams = [tuple(w[i : i + 4]) for i in range(len(w) - 3)]
    return {
        "dup_sentences": 1 - len(set(sents)) / len(sents) if sents else 0.0,
        "dup_4grams": 1 - len(set(grams)) / len(grams) if grams else 0.0,
    }


def names(text):
    """How often each name stands in the text: capitalised words that do not open a sentence or a
    quotation (Lily in 'a girl named Lily'). A last word the text may cut in two (no space or
    punctuation after it) is left out."""
    text = re.sub(r"\w+$", "", text)
    found = collections.Counter()
    for m in re.finditer(r"\b[A-Z][a-z]+\b", text):
        before = text[: m.start()]
        if before.endswith(('"', "“")):  # the first word of a quotation: said, "Wow
            continue
        before = before.rstrip(" \t\n\"'”’")  # after a closing quote look further back: "Go," Mom said
        if before and before[-1] not in ".!?:":
            found[m.group()] += 1
    return found


# -----------------------------------------------------------------------------
# the judge: what a children's storyteller cares about, each part a number in [0, 1]

WEIGHTS = {"ending": 0.4, "no_repetition": 0.35, "substance": 0.35, "names": 0.25, "keyword": 0.25}
# A story is more than its opening: without this part, ending at once (ended, nothing repeated) is a
# top score, and PPO finds that in 20 iterations. Real TinyStories continue for 130 words (median).
MIN_STORY_WORDS = 50
SENTENCE_END = re.compile(r"[.!?][\"'”’)]*\s*$")  # . ! or ?, possibly inside a closing quote


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
# a model's samples, measured


def response_text(tok, prompt_ids, response_ids):
    """The text a response adds to its prompt (prompt_ids start with BOS), + END if it ended the
    story. Decoded together with the prompt: alone, a response would lose its leading space."""
    ended = bool(response_ids) and response_ids[-1] in (tok.bos_id, tok.eos_id)
    body = response_ids[:-1] if ended else response_ids
    prompt, full = tok.decode(prompt_ids[1:]), tok.decode(prompt_ids[1:] + body)
    text = full[len(prompt) :] if full.startswith(prompt) else tok.decode(body)
    return text + (END if ended else "")


def of_rollouts(batch, prompts, tok, task, vocabulary, ref_nll=None):
    """The measures of scored rollouts (rollouts.Rollouts) of prompts (token lists), the policy's log-probs
    against a reference's:
      len_mean, len_std, ended (share that ended by themselves), score, and the task's own measures
          (the length task: within_10pct; instructions: each constraint's share, all, listed)
      kl        KL(model || reference), nats per response: the sum of log p - log p_ref over the samples
      nll       mean per-token negative log-likelihood of the responses under the reference; nll_ratio =
                nll / ref_nll, with ref_nll that of the reference's own samples on the same prompts:
                1.0 = as plausible as before (a fluency measure)
      word_share share of the responses' words (letters only, lower-cased) found in the training text
      distinct_1, distinct_2, judge (ending, no loops, substance, the prompt's names)
    Returns the measures and the samples: responses (token lists, stop token included) and texts."""
    lengths = batch.lengths()
    responses = [row[: int(n)] for row, n in zip(batch.responses().tolist(), batch.mask.sum(1))]
    texts = [response_text(tok, p, r) for p, r in zip(prompts, responses)]
    bodies = [t.removesuffix(END) for t in texts]
    prompt_texts = [tok.decode(p[1:]) for p in prompts]
    m = {
        "len_mean": lengths.mean().item(),
        "len_std": lengths.std().item(),
        "ended": batch.ended.float().mean().item(),
        "score": batch.scores.mean().item(),
        **task.measures(batch, prompt_texts, bodies),
    }
    m["kl"] = (batch.logprobs - batch.ref_logprobs).sum(1).mean().item()
    m["nll"] = -(batch.ref_logprobs.sum() / batch.mask.sum()).item()
    if ref_nll:
        m["nll_ratio"] = m["nll"] / ref_nll
    m["word_share"] = word_share(bodies, vocabulary)
    m["distinct_1"], m["distinct_2"] = distinct_n(bodies, 1), distinct_n(bodies, 2)
    m["judge"] = float(np.mean([judge(p, t) for p, t in zip(prompt_texts, texts)]))
    return m, {"responses": responses, "texts": texts}


@torch.no_grad()
def val_perplexity(model, bin_path, windows, seed, batch_size=16, ctx=nullcontext()):
    """exp of the mean token cross-entropy over the same `windows` random windows of a token file."""
    stream = iter_batches(bin_path, batch_size, model.params.max_seq_len, str(model.freqs_cos.device), seed=seed)
    losses = []
    for _ in range(max(1, windows // batch_size)):
        with ctx:
            losses.append(model(*next(stream))[1].item())
    return math.exp(sum(losses) / len(losses))

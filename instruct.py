"""
Stories on request: a header of constraints that a story meets, as in TinyStories-Instruct (Eldan &
Li 2023, section 4.2), and the checker that says whether a text meets a header: the reward of the RL
stages. instruct_data.py builds the instruction set from the stories themselves.

The header (features and name only when present, as TinyStories-Instruct shows them):

    Words: dog, jump, happy       a noun, a verb and an adjective of the story, in this order
    Features: Dialogue            the story quotes someone: "..." or “...” holding a word
    Name: Lily                    its main character: the most frequent name (not Mom, Dad)
    Story:

and as data, {"words": [["dog", "NOUN"], ["jump", "VERB"], ["happy", "ADJ"]], "dialogue": true,
"name": "Lily"} (name null when there is none). The prompt is BOS + the header's tokens, the response
the story's tokens + BOS (the end of a story, as in the pretraining token files). The two are encoded
apart: a header typed at sampling time gives the same tokens, and the story's first piece carries
sentencepiece's leading space, so the two read "Story: Once upon a time".

check(text, header) -> {"noun", "verb", "adj", ["dialogue",] ["name",] "all", "listed"}: a word
counts where a word of the text has its lemma under its POS (lemminflect) or is spelt as it is, so
"ran" counts for run, "children" for child, "happier" for happy; capitals and punctuation do not
matter, a word inside another ("cat" in "catch") does not count. The name counts spelt as it is
(a possessive too). The hack rule: a required word counts only in a real sentence, at least
MIN_SENTENCE_WORDS words of which fewer than half are required ones, and not as an item of a list
(LIST_ITEMS or more required words joined by commas, "and" or "or": "Dog, jump, happy."); `listed`
says that the text holds such a list. reward() is the share of the constraints met.

The RL stages' instruct task (tasks.py) draws its prompts from the headers of the training
examples, scores a response by reward(), and measures held-out responses by measures().
"""

import collections
import json
import os
import re
from functools import lru_cache

import torch
from lemminflect import getAllInflections, getAllLemmas, getAllLemmasOOV

from common import DataError
from metrics import names

POS = ("NOUN", "VERB", "ADJ")  # a header's words, in this order
MIN_SENTENCE_WORDS = 5  # a required word counts only in a sentence at least this long...
# ...in which the required words are fewer than half: "Dog, jump, happy." is a list, not a sentence
LIST_ITEMS = 3  # this many required words joined by commas or "and" are a list wherever they stand

# -----------------------------------------------------------------------------
# the words of a text

WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")
SENTENCE = re.compile(r"[^.!?\n]+")  # as prefs.sentences splits: at . ! ? and line breaks
QUOTATION = re.compile(r"\"([^\"\n]*)\"|“([^”\n]*)”")  # "..." or “...” in a paragraph; not ’ or '
LIST_SEPARATOR = re.compile(r"\s*[,;/&]\s*")
# capitalised words that are not a character's name: parents, titles, "The End"
NOT_NAMES = {
    "Mom",
    "Mommy",
    "Mum",
    "Mummy",
    "Mama",
    "Dad",
    "Daddy",
    "Papa",
    "Grandma",
    "Grandpa",
    "Granny",
    "Nana",
    "Mr",
    "Mrs",
    "Ms",
    "Miss",
    "Sir",
    "God",
    "End",
    "The",
    "Little",
}
# function words, which lemminflect files as nouns, verbs or adjectives too ("she" is a NOUN there)
STOPWORDS = set(
    """
i you he she it we they me him her us them my your his its our their mine yours hers ours theirs myself yourself
himself herself itself ourselves themselves this that these those who whom whose what which where when why how
there here one ones some any all each every both either neither no none nothing something anything everything
someone anyone everyone somebody anybody everybody nobody other others another such same own few many much more
most less least lot lots several enough thing things way yes no ok okay oh hi hello bye goodbye please thank thanks
very so too just also only even still then now again once upon up down out off over away back around about like
be am is are was were been being have has had having do does did done doing can could will would shall should
may might must let get got gets getting go went gone goes going say said says saying
two three four five six seven eight nine ten hundred
""".split()
)
DETERMINERS = {
    "a",
    "an",
    "the",
    "my",
    "your",
    "his",
    "its",
    "our",
    "their",
    "this",
    "these",
    "those",
    "every",
    "each",
    "some",
}  # a noun follows; not "her" ("saw her run") nor "that" ("the dog that ran")
COPULAS = {
    "very",
    "too",
    "was",
    "were",
    "is",
    "are",
    "am",
    "be",
    "been",
    "felt",
    "feel",
    "feels",
    "looked",
    "look",
    "looks",
    "seemed",
    "seems",
    "became",
    "become",
}  # an adjective follows; not "so": "so wanted"
MODALS = {
    "can",
    "could",
    "will",
    "would",
    "should",
    "must",
    "might",
    "may",
    "shall",
    "did",
    "didn't",
    "don't",
    "doesn't",
    "can't",
    "won't",
    "couldn't",
    "wouldn't",
    "let's",
}  # a verb's base form follows


def bare(token):
    """A word without a possessive 's: "Lily's" -> "Lily"."""
    return token[:-2] if token.endswith(("'s", "’s")) else token


@lru_cache(maxsize=16)  # choose() checks one text many times
def sentences(text):
    """The sentences of a text, each as (its words, the same lowercased and bare, for each word
    whether a list separator (, ; / &) stands between it and the word before, where each word ends
    in the text)."""
    out = []
    for m in SENTENCE.finditer(text):
        sentence, start = m.group(), m.start()
        spans = [w.span() for w in WORD.finditer(sentence)]
        tokens = [sentence[a:b] for a, b in spans]
        joined = [
            i > 0 and LIST_SEPARATOR.fullmatch(sentence[spans[i - 1][1] : a]) is not None
            for i, (a, _) in enumerate(spans)
        ]
        out.append((tokens, [bare(t.lower()) for t in tokens], joined, [start + b for _, b in spans]))
    return out


@lru_cache(maxsize=1 << 16)
def readings(word):
    """{POS: lemmas} of a lowercase word in lemminflect's dictionary: "saw" -> VERB (see, saw), NOUN (saw)."""
    return getAllLemmas(word)


@lru_cache(maxsize=1 << 18)
def lemmas(word, pos):
    """The lemmas of a lowercase word under a part of speech. Where the dictionary has no such reading,
    lemminflect's rules guess; a word it knows keeps a guess only if the dictionary inflects the
    guessed lemma to the word ("soaps" is only a VERB there, yet the plural of the NOUN soap)."""
    r = readings(word)
    if pos in r:
        return r[pos]
    guesses = getAllLemmasOOV(word, pos).get(pos, ())
    return tuple(g for g in guesses if not r or any(word in forms for forms in getAllInflections(g, upos=pos).values()))


@lru_cache(maxsize=1 << 16)
def counts_for(word):
    """The (lemma, POS) a text's (lowercase, bare) word counts for when a header requires them: its
    lemmas under each POS, and itself: "ran" for (run, VERB), "children" for (child, NOUN),
    "happier" for (happy, ADJ), "play" for (play, NOUN) and (play, VERB)."""
    return frozenset((lemma, pos) for pos in POS for lemma in (word, *lemmas(word, pos)))


def held(text):
    """Every (lemma, POS) that some word of the text counts for."""
    return set().union(*(counts_for(w) for w in {w for _, ws, _, _ in sentences(text) for w in ws}))


def has_dialogue(text):
    """Whether the text quotes someone: a quotation holding a word."""
    return any(re.search("[A-Za-z]", m[0]) for m in QUOTATION.finditer(text))


def name_counts(text):
    """How often each name stands in the text (metrics.names), parents and titles left out."""
    return collections.Counter({name: n for name, n in names(text).items() if name not in NOT_NAMES})


def main_name(text):
    """The main character's name: the most frequent name (the first to appear among equals), or None."""
    counts = name_counts(text)
    return max(counts, key=counts.get) if counts else None


# where a reading that is not a word's only one is plain: (previous word, readings of the next word) -> bool
CONTEXTS = {
    "anywhere": lambda prev, after: True,
    "after a determiner": lambda prev, after: prev in DETERMINERS,  # "the play"
    "after a modal": lambda prev, after: prev in MODALS,  # "can swim"
    "after a copula": lambda prev, after: prev in COPULAS,  # "was brave"
    "before a noun": lambda prev, after: (
        prev in COPULAS  # or "a red ball"
        or (prev in DETERMINERS and "NOUN" in after and "ADJ" not in after)
    ),
}


@lru_cache(maxsize=1 << 16)
def content_readings(word):
    """[(POS, lemma, where its POS is plain)] of a lowercase word that may be a content word: a word
    lemminflect knows only as a NOUN, VERB or ADJ ("jumped", "shiny") anywhere; a noun that is no
    adjective after a determiner; a verb's base form after a modal; an adjective that is no adverb
    nor an -ing form after a copula, or before a noun if it is no verb either ("a red ball")."""
    r = readings(word)
    out = []
    for pos in POS:
        if word in STOPWORDS or len(r.get(pos, ())) != 1 or not r[pos][0].isalpha() or r[pos][0] in STOPWORDS:
            continue
        lemma = r[pos][0]
        if set(r) == {pos}:
            out.append((pos, lemma, CONTEXTS["anywhere"]))
        elif pos == "NOUN" and "ADJ" not in r:
            out.append((pos, lemma, CONTEXTS["after a determiner"]))
        elif pos == "VERB" and word == lemma:
            out.append((pos, lemma, CONTEXTS["after a modal"]))
        elif pos == "ADJ" and "ADV" not in r and not word.endswith("ing"):
            out.append((pos, lemma, CONTEXTS["before a noun" if "VERB" not in r else "after a copula"]))
    return out


def content_words(text):
    """The (lemma, POS) of the content words of a text (content_readings) in its sentences of at
    least MIN_SENTENCE_WORDS words. Not names, nor words capitalised here (a name, a sentence's
    first word)."""
    skip = {n.lower() for n in name_counts(text)}
    out = set()
    for tokens, ws, _, _ in sentences(text):
        if len(ws) < MIN_SENTENCE_WORDS:
            continue
        for i, (t, w) in enumerate(zip(tokens, ws)):
            if not t.islower() or w in skip:
                continue
            for pos, lemma, plain in content_readings(w):
                if plain(ws[i - 1] if i else "", readings(ws[i + 1]) if i + 1 < len(ws) else {}):
                    out.add((lemma, pos))
    return out


# -----------------------------------------------------------------------------
# constraints and the header


def render_header(c):
    """The header of constraints c: the prompt's text, ending where the story starts."""
    lines = ["Words: " + ", ".join(w for w, _ in c["words"])]
    if c["dialogue"]:
        lines.append("Features: Dialogue")
    if c["name"]:
        lines.append(f"Name: {c['name']}")
    return "\n".join(lines + ["Story:"])


HEADER = re.compile(r"Words: ([a-z]+), ([a-z]+), ([a-z]+)\n(Features: Dialogue\n)?(?:Name: ([A-Z][a-z]+)\n)?Story:")


def parse_header(text):
    """The constraints of a header (render_header's inverse)."""
    m = HEADER.fullmatch(text.strip())
    if m is None:
        first = text.strip().split("\n")[0][:60]
        raise DataError(
            f"malformed header {first!r}...: expected 'Words: NOUN, VERB, ADJECTIVE', "
            "optional 'Features: Dialogue' and 'Name: Name' lines, then 'Story:'"
        )
    return {"words": [[m[i + 1], pos] for i, pos in enumerate(POS)], "dialogue": m[4] is not None, "name": m[5]}


# -----------------------------------------------------------------------------
# the checker


def lists(ws, joined, hits):
    """The runs of required words (hits) in a sentence that stand as a list: LIST_ITEMS or more,
    each joined to the one before by a list separator or by "and" or "or" alone, not all the same
    ("hopped and hopped and hopped" is a story's)."""
    runs, run = [], []
    for i, h in enumerate(hits):
        if not h:
            continue
        between = ws[run[-1] + 1 : i] if run else []
        if run and ((not between and joined[i]) or (between and set(between) <= {"and", "or"})):
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    return [r for r in runs + [run] if len(r) >= LIST_ITEMS and len(set().union(*(hits[i] for i in r))) >= 2]


def met_at(text, header):
    """Where the text first meets each constraint of a header (text or constraints) that it meets:
    ({"noun", "verb", "adj", "dialogue", "name" -> the offset in text just after the word, or the
    quotation, that meets it}, the constraints asked for, whether the text lists the required words).
    A required word (or the name) counts only where it stands in a real sentence (at least
    MIN_SENTENCE_WORDS words, fewer than half of them required) and not in a list of required words
    (lists()): "Dog, jump, happy." does not count, nor does "Dog, jump, happy, and then the story
    begins." """
    c = parse_header(header) if isinstance(header, str) else header
    asked = [pos.lower() for _, pos in c["words"]] + ["dialogue"] * c["dialogue"] + ["name"] * bool(c["name"])
    at, listed = {}, False

    def meets(token, word):  # the constraints a word of the text meets
        keys = {pos.lower() for lemma, pos in c["words"] if (lemma, pos) in counts_for(word)}
        return keys | {"name"} if c["name"] and bare(token) == c["name"] else keys

    for tokens, ws, joined, ends in sentences(text):
        hits = [meets(t, w) for t, w in zip(tokens, ws)]
        real = len(ws) >= MIN_SENTENCE_WORDS and 2 * sum(map(bool, hits)) < len(ws)
        for run in lists(ws, joined, hits):
            listed = True
            for i in run:
                hits[i] = set()
        if real:
            for h, end in zip(hits, ends):
                for k in h:
                    at.setdefault(k, end)
    if c["dialogue"]:
        quote = next((m for m in QUOTATION.finditer(text) if re.search("[A-Za-z]", m[0])), None)
        if quote:
            at["dialogue"] = quote.end()
    return at, asked, listed


def check(text, header):
    """Which constraints of a header (text or constraints) the text meets (met_at): {"noun", "verb",
    "adj", ["dialogue",] ["name",] "all", "listed"}; `listed`: the text holds a list of the required
    words."""
    at, asked, listed = met_at(text, header)
    found = {k: k in at for k in asked}
    return {**found, "all": all(found.values()), "listed": listed}


def reward(text, header):
    """The share of a header's constraints the text meets (a listed word is not met)."""
    at, asked, _ = met_at(text, header)
    return len(at) / len(asked)


# -----------------------------------------------------------------------------
# the RL stages' instruct task (tasks.py): prompts, the reward, the held-out measures

EVAL_SETS = {"val": "instruct_val.jsonl", "ood": "instruct_ood.jsonl"}  # in distribution, out of it


def read_headers(path):
    if not os.path.exists(path):
        raise DataError(f"no instruction data {path}; run `python tinystories.py instruct --vocab_size=N` first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["header"] for line in f if line.strip()]


def header_prompts(tok, data_dir, name):
    """BOS + the tokens of each header of an instruction file (data_dir/tokN/name, tinystories.py instruct)."""
    return [tok.encode(h, bos=True) for h in read_headers(os.path.join(data_dir, f"tok{tok.n_words}", name))]


def prompts(tok, data_dir, split, eval_set):
    """(draw(rng, n), held_out(n)): prompts (BOS + a header's tokens) drawn from the headers of a split's
    examples, and the first n held-out headers of eval_set ('val': the validation stories', 'ood':
    words no training story holds together)."""
    train = header_prompts(tok, data_dir, f"instruct_{split}.jsonl")
    held_out = header_prompts(tok, data_dir, EVAL_SETS[eval_set])
    return lambda rng, n: [train[i] for i in rng.integers(len(train), size=n)], lambda n: held_out[:n]


def score(batch, tok):
    """The reward of each of a batch of rollouts.Rollouts whose prompts are headers (B,), and the same
    spread over the response tokens (B, R): each constraint's share on the token that meets it."""
    from metrics import END, response_text

    scores, at_tokens = torch.zeros(len(batch.tokens)), torch.zeros(batch.mask.shape)
    for row, (tokens, P, n) in enumerate(
        zip(batch.tokens.tolist(), batch.prompt_lens.tolist(), batch.mask.sum(1).long().tolist())
    ):
        prompt, response = tokens[:P], tokens[P : P + n]

        def text(k):  # the response's text after its first k tokens
            return response_text(tok, prompt, response[:k]).removesuffix(END)

        at, asked, _ = met_at(text(n), tok.decode(prompt[1:]))
        scores[row] = len(at) / len(asked)
        for offset in at.values():
            lo, hi = 1, n  # the first k whose text reaches the offset
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if len(text(mid)) >= offset else (mid + 1, hi)
            at_tokens[row, lo - 1] += 1 / len(asked)
    return scores, at_tokens


def measures(headers, texts):
    """Held-out measures of responses to headers: the share meeting every constraint ('all'), each
    constraint's share among the headers that ask for it, and the share holding a list of the
    required words ('listed', the hack the checker refuses)."""
    results = [check(t, h) for h, t in zip(headers, texts)]
    out = {}
    for key in ("all", "noun", "verb", "adj", "dialogue", "name", "listed"):
        asked = [r[key] for r in results if key in r]
        if asked:
            out[key] = sum(asked) / len(asked)
    return out

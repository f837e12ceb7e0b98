"""Stories on request: the header, the checker and its hack rule, the instruct stage's files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import instruct
import instruct_data
import tinystories
from common import DataError
from tokenizer import Tokenizer

DOG = {"words": [["dog", "NOUN"], ["jump", "VERB"], ["happy", "ADJ"]], "dialogue": False, "name": None}


def met(text, words, dialogue=False, name=None):
    """check() of a text against a header of these words (noun, verb, adjective)."""
    return instruct.check(
        text, {"words": [[w, p] for w, p in zip(words, instruct.POS)], "dialogue": dialogue, "name": name}
    )


# -----------------------------------------------------------------------------
# the checker


def test_inflections_and_irregular_forms_count_for_their_lemma():
    r = met("Once upon a time the children ran to the park, happier than ever before.", ["child", "run", "happy"])
    assert r["noun"] and r["verb"] and r["adj"] and r["all"]
    r = met("The little dog jumped over the big red log today.", ["dog", "jump", "happy"])
    assert r["noun"] and r["verb"] and not r["adj"] and not r["all"]


def test_a_word_counts_under_its_own_part_of_speech_or_spelt_as_it_is():
    # "flies" is a NOUN and a VERB form of fly; "happily" is an adverb, not the adjective happy
    assert met("The small bird flies over the old green house.", ["fly", "fly", "happy"])["verb"]
    assert not met("They played happily in the garden all day long.", ["dog", "play", "happy"])["adj"]
    assert met("They went to watch the play in the big town hall.", ["play", "jump", "happy"])["noun"]


def test_capitals_and_punctuation_do_not_matter():
    r = met('"DOG!" shouted the girl, and the Dog\'s tail went JUMPING, so Happy!', ["dog", "jump", "happy"])
    assert r["noun"] and r["verb"] and r["adj"]


def test_a_word_inside_another_word_does_not_count():
    r = met("The boy tried to catch the ball near the dogwood tree.", ["cat", "run", "dog"])
    assert not r["noun"] and not r["verb"] and not r["adj"]


@pytest.mark.parametrize(
    "text, dialogue",
    [
        ('Tom looked at the sky and said, "Look at the bird!" to his mom.', True),
        ("Tom looked at the sky and said, “Look at the bird!” to his mom.", True),
        ("Tom’s mom said it was ‘the best bird’ and Tom's dad smiled at them.", False),  # apostrophes, single quotes
        ('Tom looked at the sky, then said "" and "!" to nobody at all.', False),  # quotes holding no word
    ],
)
def test_dialogue_is_a_double_quotation_holding_a_word(text, dialogue):
    assert met(text, ["sky", "look", "happy"], dialogue=True)["dialogue"] is dialogue
    assert "dialogue" not in met(text, ["sky", "look", "happy"])


def test_the_name_counts_spelt_with_its_capital_and_as_a_possessive():
    assert met("One day Lily's dog ran into the big green park.", ["dog", "run", "green"], name="Lily")["name"]
    assert not met("One day she picked a white lily in the big green park.", ["dog", "run", "green"], name="Lily")[
        "name"
    ]


def test_names_are_the_names_the_judge_finds_counted(small_data):
    import metrics

    for story in tinystories.load_text(small_data, "train")[:100]:
        assert set(instruct.name_counts(story)) == set(metrics.names(story)) - instruct.NOT_NAMES


def test_the_main_character_is_the_most_frequent_name_that_is_no_parent():
    story = (
        "Once upon a time, there was a girl named Lily. Mom told Lily to play with Ben. "
        'Lily and Ben played. "Mom, look!" said Lily. Mom smiled at Ben.'
    )
    assert instruct.name_counts(story) == {"Lily": 3, "Ben": 3}  # sentence openers and Mom are no names
    assert instruct.main_name(story) == "Lily"  # the first among equals
    assert instruct.main_name("Once upon a time, a cat sat on a mat.") is None


def test_listed_words_do_not_count_and_are_flagged():
    story = "Once upon a time, a little girl went to the park with her ball and played all day long."
    for hack in (
        "Dog, jump, happy.",
        "Words: dog, jump, happy",
        "Dog and jump and happy!",
        "Dog, jump, happy, and then the story begins with many more words here.",
    ):
        r = instruct.check(f"{hack} {story}", DOG)
        assert r["listed"], hack
        assert not (r["noun"] or r["verb"] or r["adj"]), hack
        assert instruct.reward(f"{hack} {story}", DOG) == 0.0


def test_words_alone_in_short_sentences_do_not_count():
    r = instruct.check("Dog. Jump. Happy. The little girl went to the park to play.", DOG)
    assert not (r["noun"] or r["verb"] or r["adj"] or r["listed"])


def test_a_story_that_names_two_words_in_one_sentence_is_no_hack():
    text = "One day, the happy dog liked to jump over the log. Lily smiled. The dog, happy as ever, ran home."
    r = instruct.check(text, {**DOG, "name": "Lily"})
    assert r["noun"] and r["verb"] and r["adj"] and not r["listed"]
    assert not r["name"]  # "Lily smiled." is too short to count
    assert instruct.reward(text, {**DOG, "name": "Lily"}) == 0.75


def test_required_words_crowding_a_sentence_do_not_count():
    # 3 of 6 words are required: not fewer than half
    assert not instruct.check("The happy dog jumps and sleeps.", DOG)["all"]
    assert instruct.check("The happy dog jumps and then sleeps.", DOG)["all"]


def test_reward_is_the_share_of_constraints_met():
    header = "Words: dog, jump, happy\nFeatures: Dialogue\nName: Tom\nStory:"
    text = 'Tom saw a dog in the yard. "Come here, little dog," he said to the dog.'
    assert instruct.check(text, header) == {
        "noun": True,
        "verb": False,
        "adj": False,
        "name": True,
        "dialogue": True,
        "all": False,
        "listed": False,
    }
    assert instruct.reward(text, header) == 3 / 5


# -----------------------------------------------------------------------------
# the header


@pytest.mark.parametrize("dialogue, name", [(False, None), (True, None), (False, "Lily"), (True, "Lily")])
def test_header_renders_and_parses_back(dialogue, name):
    c = {**DOG, "dialogue": dialogue, "name": name}
    header = instruct.render_header(c)
    assert header.startswith("Words: dog, jump, happy\n") and header.endswith("\nStory:")
    assert ("Features: Dialogue" in header) is dialogue and ("Name: Lily" in header) is bool(name)
    assert instruct.parse_header(header) == c


@pytest.mark.parametrize(
    "header",
    [
        "Words: dog, jump\nStory:",
        "Words: dog, jump, happy",
        "Name: Lily\nStory:",
        "Words: dog, jump, happy\nFeatures: Twist\nStory:",
        "Words: dog, jump, happy\nName: lily\nStory:",
    ],
)
def test_a_malformed_header_is_a_one_line_error(header):
    with pytest.raises(DataError, match="malformed header") as e:
        instruct.parse_header(header)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError):
        instruct.check("The dog jumped.", header)


# -----------------------------------------------------------------------------
# choosing the words


def test_content_words_are_plain_nouns_verbs_and_adjectives_and_no_names():
    words = instruct.content_words(
        "Lily jumped over the play and felt very brave. She flew the kite on a shiny string."
    )
    assert {("jump", "VERB"), ("play", "NOUN"), ("brave", "ADJ"), ("shiny", "ADJ"), ("kite", "NOUN")} <= words
    assert not {w for w, _ in words} & {"lily", "she", "feel", "be", "very", "over"}


def test_truncation_keeps_whole_sentences_and_fits(small_data):
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    encode = tok.sp_model.encode
    for story in tinystories.load_text(small_data, "train")[:40]:
        for budget in (40, 120):
            text, ids, truncated = instruct_data.cut(story, encode, budget)
            ends = instruct_data.sentence_ends(story)
            assert truncated and len(text) in ends and ids == encode(text) and len(ids) <= budget
            after = [e for e in ends if e > len(text)]
            assert not after or len(encode(story[: after[0]])) > budget  # the next sentence would not fit
    assert (
        instruct_data.cut('Tom said, "Hi. Come here, Lily!" and ran.', encode, 12) is None
    )  # no end outside the quote fits
    assert instruct_data.cut("A short story. It fits.", encode, 100)[2] is False


# -----------------------------------------------------------------------------
# the stage's files


@pytest.fixture(scope="module")
def prepared(small_data, tmp_path_factory):
    """The stage run as a user runs it; its out dir and meta."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "tinystories.py"), "instruct", "--vocab_size=512", f"--data_dir={small_data}"],
        cwd=tmp_path_factory.mktemp("cwd"),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    out = os.path.join(small_data, "tok512")
    meta = json.load(open(os.path.join(out, "instruct_meta.json")))
    summary = p.stdout.splitlines()
    assert (
        f"{out}/instruct_train: {meta['train']['examples']:,} examples from "
        f"{meta['train']['stories_kept']:,} of 300 stories" in summary[0]
    )
    return out, meta


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_every_example_meets_its_own_header(prepared):
    out, meta = prepared
    for split in ("train", "val"):
        rows = read_jsonl(os.path.join(out, f"instruct_{split}.jsonl"))
        assert len(rows) == meta[split]["examples"] > 0
        for r in rows:
            assert r["header"] == instruct.render_header(r["constraints"])
            assert instruct.parse_header(r["header"]) == r["constraints"]
            result = instruct.check(r["story"], r["header"])
            assert result["all"] and not result["listed"], (r["header"], r["story"])
            assert r["constraints"]["dialogue"] is instruct.has_dialogue(r["story"])


def test_every_inflection_lemminflect_lists_for_a_header_word_counts(prepared):
    from lemminflect import getAllInflections

    out, _ = prepared
    words = {
        tuple(w)
        for split in ("train", "val", "ood")
        for r in read_jsonl(os.path.join(out, f"instruct_{split}.jsonl"))
        for w in r["constraints"]["words"]
    }
    forms = [(lemma, pos, f) for lemma, pos in words for fs in getAllInflections(lemma, upos=pos).values() for f in fs]
    assert len(forms) > 2 * len(words)
    assert [(lemma, pos, f) for lemma, pos, f in forms if (lemma, pos) not in instruct.counts_for(f)] == []


def test_training_stories_have_several_different_headers(prepared):
    out, meta = prepared
    rows = read_jsonl(os.path.join(out, "instruct_train.jsonl"))
    by_story = {}
    for r in rows:
        by_story.setdefault(r["story"], []).append(r["header"])
    assert max(map(len, by_story.values())) == meta["headers_per_story"] == instruct_data.HEADERS_PER_STORY
    assert all(len(set(h)) == len(h) for h in by_story.values())
    assert len(read_jsonl(os.path.join(out, "instruct_val.jsonl"))) == meta["val"]["stories_kept"]  # one each


def test_ood_headers_name_words_that_no_training_story_holds_together(prepared, small_data):
    out, meta = prepared
    ood = read_jsonl(os.path.join(out, "instruct_ood.jsonl"))
    assert len(ood) == meta["ood"]["headers"] == instruct_data.N_OOD
    assert len({r["header"] for r in ood}) == len(ood)
    held = [instruct.held(s) for s in tinystories.load_text(small_data, "train")]
    for r in ood:
        assert r["header"] == instruct.render_header(r["constraints"])
        words = {tuple(w) for w in r["constraints"]["words"]}
        assert not any(words <= h for h in held), r["header"]
    assert 0 < meta["ood"]["share_dialogue"] < 1 and 0 < meta["ood"]["share_name"] < 1


def test_token_files_decode_to_header_and_story(prepared):
    out, meta = prepared
    tok = Tokenizer(meta["tokenizer"])
    for split in ("train", "val"):
        rows = read_jsonl(os.path.join(out, f"instruct_{split}.jsonl"))
        tokens = np.fromfile(os.path.join(out, f"instruct_{split}.bin"), np.uint16)
        index = np.fromfile(os.path.join(out, f"instruct_{split}.idx"), np.int64).reshape(-1, 4)
        assert len(index) == len(rows) and index[-1, 0] + index[-1, 2] == len(tokens)
        assert (index[1:, 0] == index[:-1, 0] + index[:-1, 2]).all()  # example after example
        for (start, prompt_len, length, truncated), r in zip(index, rows):
            example = tokens[start : start + length].tolist()
            assert length <= meta["max_seq_len"]
            assert example[0] == example[-1] == tok.bos_id and tok.bos_id not in example[1:-1]
            assert example[1:prompt_len] == tok.encode(r["header"], bos=False)  # as a typed prompt encodes
            assert tok.decode(example[1:prompt_len]) == r["header"]
            assert tok.decode(example[prompt_len:-1]) == r["story"]
            assert bool(truncated) is r["truncated"]


def test_kept_stories_begin_their_story_and_end_a_sentence(prepared, small_data):
    out, _ = prepared
    stories = {s[:100]: s for s in tinystories.load_text(small_data, "train")}
    for r in read_jsonl(os.path.join(out, "instruct_train.jsonl")):
        story = stories[r["story"][:100]]
        assert story.startswith(r["story"]) and r["truncated"] is (r["story"] != story)
        assert not r["truncated"] or len(r["story"]) in instruct_data.sentence_ends(story)
        assert len(instruct_data.sentence_ends(r["story"])) >= instruct_data.MIN_KEPT_SENTENCES


def test_the_stage_is_deterministic_for_a_seed(prepared, small_data, tmp_path):
    out, meta = prepared
    tok = Tokenizer(meta["tokenizer"])

    def stories(split, desc):
        return iter(tinystories.load_text(small_data, split))

    instruct_data.prepare(stories, tok, tmp_path, seed=meta["seed"], quiet=True)
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in os.listdir(out) if f.startswith("instruct_"))
    for name in os.listdir(tmp_path):
        assert (tmp_path / name).read_bytes() == open(os.path.join(out, name), "rb").read(), name


def test_the_seed_chooses_the_words():
    story = (
        "Once upon a time, a little bunny hopped into the quiet garden. The bunny ate a crunchy carrot "
        "and a sweet apple. Then the bunny jumped over a muddy puddle and rolled in the soft grass."
    )

    def words(seed):
        return [
            [w for w, _ in c["words"]]
            for c in instruct_data.choose(story, instruct_data.random.Random(seed), lambda w, p: True, 4)
        ]

    assert words(1) == words(1) and words(1) != words(2)
    assert len(words(1)) == 4 and all(
        instruct.check(story, {"words": [[w, p] for w, p in zip(ws, instruct.POS)], "dialogue": False, "name": None})[
            "all"
        ]
        for ws in words(1)
    )


def test_meta_summarises_the_files(prepared):
    out, meta = prepared
    assert meta["tokenizer_sha256"] == json.load(open(os.path.join(out, "meta.json")))["tokenizer_sha256"]
    rows = read_jsonl(os.path.join(out, "instruct_train.jsonl"))
    assert meta["train"]["share_dialogue"] == round(sum(r["constraints"]["dialogue"] for r in rows) / len(rows), 4)
    assert meta["train"]["stories"] == 300 and 0 < meta["train"]["stories_kept"] <= 300


def test_bad_settings_and_too_little_data_are_one_line_errors(small_data, tmp_path):
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))

    def stories(split, desc):
        return iter(tinystories.load_text(small_data, split)[:2])

    with pytest.raises(DataError, match="--headers_per_story must be at least 1, not 0"):
        instruct_data.prepare(stories, tok, tmp_path, headers_per_story=0)
    with pytest.raises(DataError, match=r"too few training stories \(2\)"):
        instruct_data.prepare(stories, tok, tmp_path)
    assert not os.listdir(tmp_path)


def test_the_c_engine_writes_the_same_greedy_story_for_a_header_as_pytorch(small_data, tiny_ckpt, tmp_path):
    """A header prompt, newlines and all, tokenises in the C engine as in sentencepiece, and the engine's
    greedy story is the PyTorch model's token for token (what ./run -i "$(printf 'Words: ...')" prints)."""
    import checkpoint
    import export
    from csrc import engine

    ckpt = checkpoint.load(tiny_ckpt)
    model, tok = checkpoint.model_from(ckpt).eval(), checkpoint.tokenizer_of(ckpt, tiny_ckpt)
    export.export(model, tmp_path / "model.bin")
    c_model = engine.Model(str(tmp_path / "model.bin"))
    c_tok = engine.Tokenizer(os.path.join(small_data, "tok512.bin"), 512)
    for c in (
        {"words": [["dog", "NOUN"], ["jump", "VERB"], ["happy", "ADJ"]], "dialogue": True, "name": "Lily"},
        {"words": [["ball", "NOUN"], ["find", "VERB"], ["red", "ADJ"]], "dialogue": False, "name": None},
    ):
        header = instruct.render_header(c)
        ids = tok.encode(header, bos=True)
        assert c_tok.encode(header) == ids
        ours = engine.generate(c_model, ids, steps=80, temperature=0.0)[len(ids) :]
        theirs = model.generate([ids], 81 - len(ids), temperature=0.0, stop_tokens=(tok.bos_id,))[0]  # 80 steps
        assert ours == [t for t in theirs if t != tok.bos_id]  # ./run stops at BOS without printing it


def test_each_constraint_is_met_where_its_word_or_quotation_ends():
    header = instruct.render_header(
        {"words": [["dog", "NOUN"], ["jump", "VERB"], ["happy", "ADJ"]], "dialogue": True, "name": "Lily"}
    )
    text = 'Lily had a small dog that liked the park. Every day the dog jumped over a log. "Look at me!" she said.'
    at, asked, listed = instruct.met_at(text, header)
    assert asked == ["noun", "verb", "adj", "dialogue", "name"] and not listed
    assert text[: at["name"]].endswith("Lily") and text[: at["noun"]].endswith("small dog")  # the first of each
    assert text[: at["verb"]].endswith("jumped") and text[: at["dialogue"]].endswith('"Look at me!"')
    assert "adj" not in at and instruct.reward(text, header) == 4 / 5


def test_token_rewards_sit_on_the_token_that_meets_each_constraint_and_sum_to_the_score(small_data):
    import rollouts
    import tasks
    from tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    header = instruct.render_header(
        {"words": [["dog", "NOUN"], ["jump", "VERB"], ["sad", "ADJ"]], "dialogue": False, "name": None}
    )
    story = " Tom saw a big dog in the park today. The little dog jumped over the wall and ran home."
    prompt, response = tok.encode(header, bos=True), tok.encode(story, bos=False) + [tok.bos_id]
    batch = rollouts.collate([prompt, prompt], [response, response[:-1]], (tok.bos_id,), "cpu")  # ended, cut off
    cfg = {"missing_eos_penalty": 1.0, "token_rewards": True}
    scores = tasks.score_rollouts(batch, {"instruct": 1.0}, cfg, tok=tok)
    assert scores.tolist() == pytest.approx([2 / 3, 2 / 3 - 1.0])
    assert batch.token_scores.sum(1).tolist() == pytest.approx(scores.tolist())
    placed = (batch.token_scores[0] > 0).nonzero().flatten().tolist()
    text = [tok.decode(prompt[1:] + response[: i + 1])[len(tok.decode(prompt[1:])) :] for i in placed]
    assert text[0].endswith("big dog") and text[1].endswith("dog jumped")  # the word's last token, not the end's
    cfg["token_rewards"] = False
    tasks.score_rollouts(batch, {"instruct": 1.0}, cfg, tok=tok)
    assert (batch.token_scores[0, :-1] == 0).all()  # all of it on the story's end


def test_dpo_pairs_for_headers_are_labelled_by_the_checker(prepared, small_data, tiny_ckpt, tmp_path):
    """prefs.py --label=instruct: two stories for one training header, the one meeting more constraints chosen."""
    from prefs import read_pairs

    train_pairs, eval_pairs = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prefs.py"),
            "--label=instruct",
            f"--checkpoint={tiny_ckpt}",
            f"--data_dir={small_data}",
            f"--pairs={train_pairs}",
            f"--eval_pairs={eval_pairs}",
            "--num_pairs=6",
            "--num_eval_pairs=2",
            "--samples_per_prompt=4",
            "--max_new_tokens=120",
            "--device=cpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    train_headers = set(instruct.read_headers(os.path.join(prepared[0], "instruct_train.jsonl")))
    got = read_pairs(str(train_pairs))
    assert len(got) == 6 and len(read_pairs(str(eval_pairs))) == 2
    for pair in got:
        assert pair["prompt"] in train_headers
        for side in ("chosen", "rejected"):
            score = instruct.reward(pair[side].removesuffix(tinystories.SEPARATOR), pair["prompt"])
            assert score == pytest.approx(pair[f"{side}_score"], abs=1e-4)
        assert pair["chosen_score"] > pair["rejected_score"]

"""metrics.py: the judge's components on real and hand-made stories, distinct-n and repetition."""

import pytest
from conftest import SHARED, first_stories, real_story_parts

from metrics import WEIGHTS, distinct_n, judge, judge_components, names, repetition
from tinystories import SEPARATOR as END

# ---------------------------------------------------------------------------
# the judge


def test_a_story_that_ends_beats_the_same_story_cut_off_mid_sentence():
    for prompt, rest in real_story_parts(5):
        cut = rest[: len(rest) - 15]
        ended, cut_off = judge_components(prompt, rest + END), judge_components(prompt, cut)
        assert ended["ending"] == 1.0 and cut_off["ending"] == 0.0
        assert judge(prompt, rest + END) > judge(prompt, cut)
        assert judge_components(prompt, cut + END)["ending"] == 0.5  # ended, but on half a sentence
        assert judge_components(prompt, ' "Come back!" she said. "I will!"' + END)["ending"] == 1.0  # closing quote


def test_a_looped_sentence_lowers_the_repetition_component():
    for prompt, rest in real_story_parts(5):
        loop = rest + " She was happy." * 8
        assert (
            judge_components(prompt, loop + END)["no_repetition"]
            < judge_components(prompt, rest + END)["no_repetition"] - 0.3
        )
    # a loop without a full stop: 12 4-grams, the second copy's 4 repeat the first's
    assert repetition("the dog ran to the big tree and the dog ran to the big tree")["dup_4grams"] == pytest.approx(
        4 / 12
    )


def test_reusing_the_prompts_character_name_raises_that_component():
    prompt = "Once upon a time, there was a little girl named Lily. She had a dog called Max."
    both = judge_components(prompt, " Lily and Max went to the park. They played all day." + END)
    one = judge_components(prompt, " Lily went to the park. She played all day." + END)
    none = judge_components(prompt, " The girl went to the park. She played all day." + END)
    assert (both["names"], one["names"], none["names"]) == (1.0, 0.5, 0.0)
    assert judge(prompt, " Lily and Max went to the park." + END) > judge(prompt, " The girl went to the park." + END)
    assert (
        judge_components("Once upon a time, there was a cat.", " It slept." + END)["names"] is None
    )  # no name: left out
    parts = judge_components("Once upon a time, there was a cat.", " It slept." + END)
    applying = ("ending", "no_repetition", "substance")
    assert judge("Once upon a time, there was a cat.", " It slept." + END) == pytest.approx(
        sum(WEIGHTS[k] * parts[k] for k in applying) / sum(WEIGHTS[k] for k in applying)
    )


def test_names_skip_sentence_openers_and_a_word_the_prompt_may_cut():
    assert names('One day, Tom met a dog. "Hello," said Sue. Tom ran. Once there was Ma') == {"Tom": 1, "Sue": 1}
    assert names('She said, "Wow, look!" "Come," Mom said. “Yes,” Ben said, and Ben ran.') == {"Mom": 1, "Ben": 2}


def test_keyword_component_only_when_a_keyword_is_given():
    prompt = "Once upon a time, there was a cat."
    assert judge_components(prompt, " It was kind." + END)["keyword"] is None
    assert judge_components(prompt, " It was Kind." + END, keyword="kind")["keyword"] == 1.0
    assert judge_components(prompt, " It was unkind." + END, keyword="kind")["keyword"] == 0.0


def test_real_complete_stories_score_near_the_top_of_the_judge():
    stories = first_stories(SHARED / "tinystories" / "train-000.txt", 200)
    parts = [judge_components(s[:60], s[60:] + END) for s in stories]
    assert sum(p["ending"] for p in parts) / len(parts) > 0.95
    assert sum(p["no_repetition"] for p in parts) / len(parts) > 0.95
    assert sum(p["substance"] for p in parts) / len(parts) > 0.9


def test_ending_at_once_is_not_a_top_score():
    prompt = "Once upon a time, there was a girl named Lily. She had a red ball."
    at_once = judge_components(prompt, " The end." + END)
    story = (
        " Lily took her ball to the park. " * 1 + "She threw it high and her dog ran after it. "
        "Then it started to rain, so they ran home. Mom made warm soup and Lily told her about the park. "
        "Lily smiled and hugged her dog. It was the best day, and she played with her ball again the next morning."
        + END
    )
    assert at_once["substance"] < 0.1 and judge_components(prompt, story)["substance"] == 1.0
    assert judge(prompt, story) > judge(prompt, " The end." + END) + 0.2


def test_distinct_n_and_repetition_on_hand_examples():
    assert distinct_n(["The cat sat.", "the cat ran"], 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(["The cat sat.", "the cat ran"], 2) == pytest.approx(
        3 / 4
    )  # "the cat" twice; n-grams stay in a text
    assert distinct_n(["a"], 2) == 0.0
    rep = repetition("A b c d. A b c d. E f g h.")
    assert rep["dup_sentences"] == pytest.approx(1 / 3)  # 3 sentences, one a repeat
    assert rep["dup_4grams"] == pytest.approx(1 / 9)  # 12 words, 9 4-grams, "a b c d" twice
    assert repetition("") == {"dup_sentences": 0.0, "dup_4grams": 0.0}

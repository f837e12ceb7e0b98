"""Stories on request: the header, the checker and its hack rule."""
import pytest

import instruct
from common import DataError

DOG = {"words": [["dog", "NOUN"], ["jump", "VERB"], ["happy", "ADJ"]], "dialogue": False, "name": None}


def met(text, words, dialogue=False, name=None):
    """check() of a text against a header of these words (noun, verb, adjective)."""
    return instruct.check(text, {"words": [[w, p] for w, p in zip(words, instruct.POS)], "dialogue": dialogue, "name": name})


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
    r = met("\"DOG!\" shouted the girl, and the Dog's tail went JUMPING, so Happy!", ["dog", "jump", "happy"])
    assert r["noun"] and r["verb"] and r["adj"]


def test_a_word_inside_another_word_does_not_count():
    r = met("The boy tried to catch the ball near the dogwood tree.", ["cat", "run", "dog"])
    assert not r["noun"] and not r["verb"] and not r["adj"]


@pytest.mark.parametrize("text, dialogue", [
    ('Tom looked at the sky and said, "Look at the bird!" to his mom.', True),
    ("Tom looked at the sky and said, “Look at the bird!” to his mom.", True),
    ("Tom’s mom said it was ‘the best bird’ and Tom's dad smiled at them.", False),  # apostrophes, single quotes
    ('Tom looked at the sky, then said "" and "!" to nobody at all.', False),  # quotes holding no word
])
def test_dialogue_is_a_double_quotation_holding_a_word(text, dialogue):
    assert met(text, ["sky", "look", "happy"], dialogue=True)["dialogue"] is dialogue
    assert "dialogue" not in met(text, ["sky", "look", "happy"])


def test_the_name_counts_spelt_with_its_capital_and_as_a_possessive():
    assert met("One day Lily's dog ran into the big green park.", ["dog", "run", "green"], name="Lily")["name"]
    assert not met("One day she picked a white lily in the big green park.", ["dog", "run", "green"], name="Lily")["name"]


def test_the_main_character_is_the_most_frequent_name_that_is_no_parent():
    story = ("Once upon a time, there was a girl named Lily. Mom told Lily to play with Ben. "
             "Lily and Ben played. \"Mom, look!\" said Lily. Mom smiled at Ben.")
    assert instruct.name_counts(story) == {"Lily": 3, "Ben": 3}  # sentence openers and Mom are no names
    assert instruct.main_name(story) == "Lily"  # the first among equals
    assert instruct.main_name("Once upon a time, a cat sat on a mat.") is None


def test_listed_words_do_not_count_and_are_flagged():
    story = "Once upon a time, a little girl went to the park with her ball and played all day long."
    for hack in ("Dog, jump, happy.", "Words: dog, jump, happy", "Dog and jump and happy!",
                 "Dog, jump, happy, and then the story begins with many more words here."):
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
    assert instruct.check(text, header) == {"noun": True, "verb": False, "adj": False, "name": True,
                                            "dialogue": True, "all": False, "listed": False}
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


@pytest.mark.parametrize("header", ["Words: dog, jump\nStory:", "Words: dog, jump, happy", "Name: Lily\nStory:",
                                    "Words: dog, jump, happy\nFeatures: Twist\nStory:", "Words: dog, jump, happy\nName: lily\nStory:"])
def test_a_malformed_header_is_a_one_line_error(header):
    with pytest.raises(DataError, match="malformed header") as e:
        instruct.parse_header(header)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError):
        instruct.check("The dog jumped.", header)


# -----------------------------------------------------------------------------
# choosing the words

def test_content_words_are_plain_nouns_verbs_and_adjectives_and_no_names():
    words = instruct.content_words("Lily jumped over the play and felt very brave. She flew the kite on a shiny string.")
    assert {("jump", "VERB"), ("play", "NOUN"), ("brave", "ADJ"), ("shiny", "ADJ"), ("kite", "NOUN")} <= words
    assert not {w for w, _ in words} & {"lily", "she", "feel", "be", "very", "over"}

"""dreamid_core.identities.trigger: the trigger word found in the prompt text as people write it."""

from __future__ import annotations

import random

import pytest

from dreamid_core import TriggerNotFoundError, check_trigger, find_triggers, split_on_triggers

WRAPS = [("", ","), ("", "."), ("", "!"), ("", "'s"), ("", "’s"), ("", ":"), ('"', '"'), ("(", ")"),
         ("(", ":1.3)"), ("((", "))"), ("[", "]"), ("{", "}"), ("<", ">"), ("“", "”"), ("-", "-"), ("", "..."),
         ("", "?"), ("'", "'"), ("", ";"), ("", "*")]


def spans(text, triggers):
    return [(m.start, m.end, m.trigger) for m in find_triggers(text, triggers)]


@pytest.mark.parametrize("trigger", ["S*", "sks", "ohwx", "<me>", "S1*", "Zoë*"])
def test_every_punctuation_around_the_trigger_is_found(trigger):
    rng = random.Random(len(trigger))
    for before, after in WRAPS:
        for shown in (trigger, trigger.lower(), trigger.upper()):
            prefix = rng.choice(["a photo of ", "", "portrait, "])
            text = f"{prefix}{before}{shown}{after} in the rain"
            s = len(prefix) + len(before)
            assert spans(text, [trigger]) == [(s, s + len(trigger), trigger)], text


@pytest.mark.parametrize("text", ["a photo of S*s", "xS* here", "S*_2", "sksx", "the asks", "S*9", "embedding:S*",
                                  "embedding:sks_person"])
def test_letters_digits_underscores_or_an_embedding_name_glued_to_it_are_another_word(text):
    assert spans(text, ["S*", "sks"]) == []


def test_several_occurrences_and_triggers_longest_first():
    text = "S1* and S1*, S2*'s friend; (s1*:1.2) S1"
    found = spans(text, ["S1*", "S2*", "S1"])
    assert [t for *_, t in found] == ["S1*", "S1*", "S2*", "S1*", "S1"]
    pieces = split_on_triggers(text, ["S1*", "S2*", "S1"])
    assert "".join(p if isinstance(p, str) else text[p.start:p.end] for p in pieces) == text


@pytest.mark.parametrize("bad", ["", "   ", "two words", "(me)", "me:1", "back\\slash", "***", ",", None])
def test_unusable_triggers_are_refused_with_a_hint(bad):
    with pytest.raises(TriggerNotFoundError, match="trigger word"):
        check_trigger(bad)


def test_trigger_is_stripped():
    assert check_trigger("  S* ") == "S*"
    assert spans("a S* b", [" S* "]) == [(2, 4, "S*")]

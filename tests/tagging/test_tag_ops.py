"""Tag operations on tuples: spelling-insensitive matching, the user's spelling kept, sentences left whole."""

import pytest

from lib_lora.errors import BadInput
from lib_lora.tagging.tag_ops import (
    TagEdit,
    dedupe,
    has_tag,
    parse_replace,
    parse_tag_list,
    prune,
    replace,
    set_activation,
    sort_tags,
    split_weight,
    tag_frequency,
    tag_key,
)

SENTENCE = "a photo of a woman with long hair standing in a field"


@pytest.mark.parametrize(
    "spelling",
    ["long hair", "long_hair", "Long Hair", " long  hair ", "(long hair:1.2)", "(long_hair: 0.8)", "((long hair))",
     "[long_hair]", "{long hair}", "((long hair:1.1))"],
)
def test_spellings_and_weights_share_one_key(spelling):
    assert tag_key(spelling) == "long hair"


def test_brackets_that_are_part_of_a_tag_stay():
    assert tag_key("saber \\(fate\\)") == tag_key("saber_(fate)") == "saber (fate)"
    assert tag_key("(saber \\(fate\\):1.3)") == "saber (fate)"
    assert tag_key("(o)_(o)") == "(o) (o)"  # the first '(' closes early: not a wrapper
    assert tag_key(":)") == ":)"


@pytest.mark.parametrize("tag", ["(a:1.2)", "((b))", "[c]", "plain", "(x)_(y)", "(d:-0.5)", "(e:.5)"])
def test_split_weight_reassembles(tag):
    prefix, inner, suffix = split_weight(tag)
    assert prefix + inner + suffix == tag
    assert inner in ("a", "b", "c", "plain", "(x)_(y)", "d", "e")


def test_activation_first_once_as_given():
    tags = ("1girl", "MyChar", "smile", "(mychar:1.2)")
    assert set_activation(tags, ("mychar",)) == ("mychar", "1girl", "smile")
    assert set_activation(("mychar", "smile"), ("mychar",)) == ("mychar", "smile")  # already right: unchanged
    assert set_activation((), ("mychar",)) == ("mychar",)
    assert set_activation((SENTENCE,), ("mychar",)) == ("mychar", SENTENCE)
    assert set_activation(("woman", "ohwx", "x"), ("ohwx", "woman")) == ("ohwx", "woman", "x")


def test_prune_matches_any_spelling_but_not_inside_sentences():
    tags = ("1girl", "Long_Hair", "(long hair:1.3)", "smile", SENTENCE)
    assert prune(tags, ["long hair"]) == ("1girl", "smile", SENTENCE)
    assert prune(tags, ["smile", "1GIRL"]) == ("Long_Hair", "(long hair:1.3)", SENTENCE)
    assert prune((SENTENCE,), ["hair", "woman"]) == (SENTENCE,)


def test_replace_merges_at_first_place_and_keeps_weight():
    assert replace(("x", "a", "y", "b"), ("a", "b"), "c") == ("x", "c", "y")
    assert replace(("x", "(a:1.2)", "b"), ("a", "b"), "c") == ("x", "(c:1.2)")
    assert replace(("c", "a", "b"), ("a", "b"), "c") == ("c",)  # target already there: kept once, where it was
    assert replace(("x", "y"), ("a",), "c") == ("x", "y")  # nothing to replace: untouched
    assert replace(("long_hair", "x", "Long Hair"), ("long hair",), "long hair") == ("long hair", "x")
    assert replace((SENTENCE,), ("woman",), "girl") == (SENTENCE,)


def test_dedupe_keeps_first_spelling():
    assert dedupe(("a", "long_hair", "b", "Long Hair", "(a:1.5)")) == ("a", "long_hair", "b")


def test_sort_by_key_with_kept_head():
    tags = ("mychar", "smile", "Blue_eyes", "(apple:1.1)", "blush")
    assert sort_tags(tags) == ("(apple:1.1)", "Blue_eyes", "blush", "mychar", "smile")
    assert sort_tags(tags, keep_first=1) == ("mychar", "(apple:1.1)", "Blue_eyes", "blush", "smile")


def test_has_tag_exact_and_wildcard():
    tags = ("1girl", "(long_hair:1.2)", "blue eyes")
    assert has_tag(tags, "long hair") and has_tag(tags, "LONG_HAIR")
    assert not has_tag(tags, "long")
    assert has_tag(tags, "long*") and has_tag(tags, "* eyes") and not has_tag(tags, "red*")


def test_frequency_counts_captions_most_frequent_first_ties_alphabetical():
    captions = [
        ("mychar", "long_hair", "smile", "smile"),  # twice in one caption counts once
        ("mychar", "long hair", "blush"),
        ("mychar", "(long_hair:1.2)", "zebra", "apple"),
        (SENTENCE,),
    ]
    table = tag_frequency(captions)
    assert table[:2] == [("long_hair", 3), ("mychar", 3)]  # most common spelling shown, without the weight
    assert table[2:] == [("a photo of a woman with long hair standing in a field", 1), ("apple", 1), ("blush", 1),
                         ("smile", 1), ("zebra", 1)]


def test_parse_arguments():
    assert parse_tag_list(" a, b ,,c ") == ("a", "b", "c")
    assert parse_replace("a, b = c d") == (("a", "b"), "c d")
    for bad in ("ab", "a=b=c", "=c", "a=", "a=b,c"):
        with pytest.raises(BadInput, match="--replace"):
            parse_replace(bad)


def test_combined_edit_keeps_activation_first_and_labels_itself():
    edit = TagEdit(activation=("mychar",), prune=("bad",), replace=((("cat", "kitty"), "feline"),), dedupe=True, sort=True)
    assert edit.apply(("zeta", "kitty", "bad", "mychar", "alpha", "cat", "alpha")) == ("mychar", "alpha", "feline", "zeta")
    assert edit.label() == "replace cat,kitty=feline; prune bad; dedupe; sort; activation mychar"
    assert TagEdit().is_empty() and not edit.is_empty()

"""Caption shuffle with kept tokens, the keep separator, caption and tag dropout: exact under a seed, right on
average."""

import random

import numpy as np
import pytest

from lib_lora.dataset.captions import CaptionRules, caption_variants, clean_caption, process_caption, tag_counts

CAPTION = "sks, 1girl, red hair, smile, outdoors, tree"


def test_keep_tokens_stay_first_while_the_rest_shuffles():
    rules = CaptionRules(shuffle_caption=True, keep_tokens=2)
    orders = set()
    for seed in range(40):
        out = process_caption(CAPTION, rules, 1, random.Random(seed)).split(", ")
        assert out[:2] == ["sks", "1girl"]
        assert sorted(out[2:]) == sorted(["red hair", "smile", "outdoors", "tree"])
        orders.add(tuple(out[2:]))
    assert len(orders) > 10  # it really shuffles


def test_keep_tokens_separator_fixes_prefix_and_suffix_and_never_reaches_the_text():
    rules = CaptionRules(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks, 1girl ||| red hair, smile, outdoors ||| masterpiece, best quality"
    for seed in range(20):
        tags = process_caption(caption, rules, 1, np.random.default_rng(seed)).split(", ")
        assert tags[:2] == ["sks", "1girl"] and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[2:-2]) == ["outdoors", "red hair", "smile"]  # keep_tokens=5 ignored with a separator
    plain = CaptionRules(keep_tokens_separator="|||")  # no shuffle: still cleaned
    assert process_caption(caption, plain, 1, random.Random(0)) == (
        "sks, 1girl, red hair, smile, outdoors, masterpiece, best quality"
    )
    assert "|||" not in clean_caption(caption, plain)


def test_same_seed_same_caption_different_seed_different():
    rules = CaptionRules(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.1, caption_tag_dropout_rate=0.2)
    first = [process_caption(CAPTION, rules, 1, np.random.default_rng(s)) for s in range(30)]
    again = [process_caption(CAPTION, rules, 1, np.random.default_rng(s)) for s in range(30)]
    assert first == again
    assert len(set(first)) > 15


def test_caption_dropout_rate_statistically():
    rules = CaptionRules(caption_dropout_rate=0.25)
    rng = random.Random(7)
    outs = [process_caption(CAPTION, rules, 1, rng) for _ in range(4000)]
    dropped = sum(o == "" for o in outs) / len(outs)
    assert dropped == pytest.approx(0.25, abs=0.03)
    assert set(outs) == {"", CAPTION}  # no shuffle: the text is kept as written
    none = CaptionRules(caption_dropout_rate=0.0)
    assert all(process_caption(CAPTION, none, 1, rng) == CAPTION for _ in range(200))


def test_caption_dropout_every_n_epochs_counts_epochs_from_one():
    rules = CaptionRules(caption_dropout_every_n_epochs=2)
    outs = {epoch: process_caption(CAPTION, rules, epoch, random.Random(0)) for epoch in range(1, 6)}
    assert outs == {1: CAPTION, 2: "", 3: CAPTION, 4: "", 5: CAPTION}


def test_tag_dropout_spares_kept_tokens_and_hits_the_rate():
    rules = CaptionRules(keep_tokens=1, caption_tag_dropout_rate=0.3)
    rng = random.Random(3)
    kept = total = 0
    for _ in range(1500):
        tags = process_caption(CAPTION, rules, 1, rng).split(", ")
        assert tags[0] == "sks"
        assert tags[1:] == [t for t in CAPTION.split(", ")[1:] if t in tags[1:]]  # order kept without shuffle
        kept += len(tags) - 1
        total += 5
    assert 1 - kept / total == pytest.approx(0.3, abs=0.03)


def test_caption_variants_for_text_encoder_cache():
    assert caption_variants(CAPTION, CaptionRules()) == frozenset({CAPTION})
    assert caption_variants(CAPTION, CaptionRules(caption_dropout_rate=0.1)) == frozenset({CAPTION, ""})
    assert caption_variants(CAPTION, CaptionRules(shuffle_caption=True)) is None
    assert caption_variants(CAPTION, CaptionRules(caption_tag_dropout_rate=0.1)) is None


def test_tag_counts_lowercase_and_ignore_keep_separator():
    rules = CaptionRules(keep_tokens_separator="|||")
    counts = tag_counts(["Sks ||| red hair, smile", "sks, smile,, "], rules)
    assert counts == {"sks": 2, "red hair": 1, "smile": 2}

"""Caption transforms for training: shuffle with kept tokens, caption dropout, tag dropout. Pure functions.

Randomness comes in as an `rng` argument (anything with `.random()` and `.shuffle(list)`: `random.Random` or a
`numpy.random.Generator`), so the loader can give each (seed, epoch, image, repeat) its own stream and a resumed
run sees the same captions. Semantics follow sd-scripts:

- tags are the caption split on `caption_separator` (","), stripped;
- `keep_tokens` N keeps the first N tags in place; `keep_tokens_separator` (e.g. "|||") instead marks the kept
  part explicitly: "kept, tags ||| shuffled, tags ||| kept suffix" (then keep_tokens is not used);
- `caption_dropout_rate`: the whole caption becomes "" with that probability; `caption_dropout_every_n_epochs`
  N: every epoch whose number (1-based) is a multiple of N trains with "" for all images;
- `caption_tag_dropout_rate`: each tag that is not kept is dropped with that probability.

Unlike sd-scripts, the keep separator never reaches the text encoder: it is removed even when nothing shuffles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class Rng(Protocol):
    def random(self) -> float: ...

    def shuffle(self, x: list) -> None: ...


@dataclass(frozen=True)
class CaptionRules:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @classmethod
    def from_options(cls, opts: Any) -> "CaptionRules":
        return cls(**{name: getattr(opts, name) for name in cls.__dataclass_fields__})

    @property
    def varies(self) -> bool:
        """True when the text of one image can change between epochs beyond "" (shuffle or tag dropout)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    @property
    def drops(self) -> bool:
        return self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0


def split_caption(caption: str, rules: CaptionRules) -> tuple[list[str], list[str], list[str]]:
    """(kept prefix tags, movable tags, kept suffix tags)."""
    sep = rules.caption_separator

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    keep_sep = rules.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed, flex = caption.split(keep_sep, 1)
        suffix = ""
        if keep_sep in flex:
            flex, suffix = flex.split(keep_sep, 1)
            suffix = suffix.replace(keep_sep, sep)
        return tags(fixed), tags(flex), tags(suffix)
    all_tags = tags(caption)
    n = max(0, rules.keep_tokens)
    return all_tags[:n], all_tags[n:], []


def join_caption(tags: list[str], rules: CaptionRules) -> str:
    sep = rules.caption_separator
    return (sep.strip() + " " if sep.strip() else sep).join(tags)


def clean_caption(caption: str, rules: CaptionRules) -> str:
    """The caption with no randomness applied (validation, tag counts, fixed captions): separators normalised and
    the keep separator removed; the text itself is unchanged when it holds neither."""
    if rules.keep_tokens_separator and rules.keep_tokens_separator in caption:
        fixed, flex, suffix = split_caption(caption, rules)
        return join_caption(fixed + flex + suffix, rules)
    return caption


def is_dropout_epoch(epoch: int, rules: CaptionRules) -> bool:
    """Every N-th epoch (1-based) trains without captions when caption_dropout_every_n_epochs = N."""
    n = rules.caption_dropout_every_n_epochs
    return n > 0 and epoch % n == 0


def process_caption(caption: str, rules: CaptionRules, epoch: int, rng: Rng) -> str:
    """The caption one image trains with in `epoch` (1-based), drawing from `rng` in a fixed order:
    one draw for caption dropout (when its rate > 0), then the shuffle, then one draw per movable tag."""
    dropped = rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate
    if dropped or is_dropout_epoch(epoch, rules):
        return ""
    if not rules.varies:
        return clean_caption(caption, rules)
    fixed, flex, suffix = split_caption(caption, rules)
    if rules.shuffle_caption:
        rng.shuffle(flex)
    if rules.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= rules.caption_tag_dropout_rate]
    return join_caption(fixed + flex + suffix, rules)


def caption_variants(caption: str, rules: CaptionRules) -> frozenset[str] | None:
    """Every text this caption can train with, or None when there are too many to cache (shuffle, tag dropout).
    The text-encoder cache can precompute exactly these."""
    if rules.varies:
        return None
    texts = {clean_caption(caption, rules)}
    if rules.drops:
        texts.add("")
    return frozenset(texts)


def tag_counts(captions: list[str], rules: CaptionRules) -> dict[str, int]:
    """Tag (lower-cased) -> occurrences over all captions, as `ss_tag_frequency` counts them."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in clean_caption(caption, rules).split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts

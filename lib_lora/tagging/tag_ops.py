"""Tag operations as pure functions on tuples of tags: no files here, so the CLI, the tab and tests share them.

Matching is forgiving, writing is not: `long_hair`, `Long Hair` and `(long hair:1.2)` are the same tag when we look
for one, but a caption keeps the user's spelling of every tag we do not touch. A caption without commas (a BLIP
sentence) is a single item; it is never split into words.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import BadInput

Tags = tuple[str, ...]

_WEIGHT = re.compile(r"^\((?P<inner>.+?)\s*:\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)$", re.DOTALL)
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_SPACES = re.compile(r"\s+")


def _wraps_whole(text: str) -> bool:
    """True when text[0] is an opening bracket whose partner is the last character (`((a))`, not `(o)_(o)`)."""
    if len(text) < 2 or text[0] not in _PAIRS or text[-1] != _PAIRS[text[0]]:
        return False
    opening, closing, depth, i = text[0], text[-1], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return i == len(text) - 1
        i += 1
    return False


def split_weight(tag: str) -> tuple[str, str, str]:
    """(prefix, inner tag, suffix) with `prefix + inner + suffix == tag`: `(a:1.2)` -> `(`, `a`, `:1.2)`."""
    text = tag.strip()
    prefix, suffix = "", ""
    while True:
        match = _WEIGHT.match(text)
        if match and _wraps_whole(text):
            inner = match.group("inner")
            start = 1
            prefix += text[:start]
            suffix = text[start + len(inner) :] + suffix
            text = inner
            continue
        if _wraps_whole(text) and len(text) > 2:
            prefix += text[0]
            suffix = text[-1] + suffix
            text = text[1:-1]
            continue
        return prefix, text, suffix


def tag_key(tag: str) -> str:
    """The form tags are compared in: weight and brackets removed, `\\(` unescaped, `_` as space, lower case."""
    inner = split_weight(tag)[1]
    inner = inner.replace("\\(", "(").replace("\\)", ")").replace("_", " ")
    return _SPACES.sub(" ", inner).strip().lower()


def parse_tag_list(text: str) -> Tags:
    """`"a, b,c"` -> `("a", "b", "c")` (what --prune and --activation take)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_replace(spec: str) -> tuple[Tags, str]:
    """`"a,b=c"` -> `(("a", "b"), "c")`: every tag on the left becomes the one on the right."""
    if spec.count("=") != 1:
        raise BadInput(f"--replace takes 'old=new' or 'old1,old2=new', got {spec!r}")
    left, right = spec.split("=")
    sources, target = parse_tag_list(left), right.strip()
    if not sources:
        raise BadInput(f"--replace {spec!r}: nothing to replace before '='")
    if not target:
        raise BadInput(f"--replace {spec!r}: nothing after '=' (use --prune to remove tags)")
    if "," in target:
        raise BadInput(f"--replace {spec!r}: the new tag after '=' must be one tag (no commas)")
    return sources, target


def set_activation(tags: Sequence[str], activation: Sequence[str]) -> Tags:
    """The activation tag(s) first, exactly as given, and nowhere else in the caption."""
    keys = {tag_key(a) for a in activation}
    return tuple(activation) + tuple(t for t in tags if tag_key(t) not in keys)


def prune(tags: Sequence[str], drop: Iterable[str]) -> Tags:
    keys = {tag_key(d) for d in drop}
    return tuple(t for t in tags if tag_key(t) not in keys)


def replace(tags: Sequence[str], sources: Sequence[str], target: str) -> Tags:
    """Merge `sources` into `target`, placed where the first of them (or an existing `target`) was. A weight on
    the replaced tag is kept: `(a:1.2)` -> `(c:1.2)`. Nothing changes when no source is present."""
    keys = {tag_key(s) for s in sources}
    if not any(tag_key(t) in keys for t in tags):
        return tuple(tags)
    target_key = tag_key(target)
    out: list[str] = []
    placed = False
    for tag in tags:
        key = tag_key(tag)
        if key not in keys and key != target_key:
            out.append(tag)
        elif not placed:
            placed = True
            if key in keys:
                prefix, _, suffix = split_weight(tag)
                out.append(prefix + target + suffix)
            else:  # the target was already there: it stays, spelled as it was
                out.append(tag)
    return tuple(out)


def dedupe(tags: Sequence[str]) -> Tags:
    """Each tag once, at its first place (the first spelling wins)."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return tuple(out)


def sort_tags(tags: Sequence[str], keep_first: int = 0) -> Tags:
    """Alphabetical by matching key; the first `keep_first` items stay where they are (like keep_tokens)."""
    head, rest = tuple(tags[:keep_first]), tags[keep_first:]
    return head + tuple(sorted(rest, key=lambda t: (tag_key(t), t)))


def has_tag(tags: Sequence[str], pattern: str) -> bool:
    """Does any tag match `pattern` (a tag, or a shell-style pattern with `*` / `?`, compared by key)?"""
    want = tag_key(pattern)
    if any(ch in pattern for ch in "*?["):
        return any(fnmatch.fnmatchcase(tag_key(t), want) for t in tags)
    return any(tag_key(t) == want for t in tags)


def tag_frequency(captions: Iterable[Sequence[str]]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most frequent first, ties alphabetical.

    Tags that differ only in spelling count together and are shown in their most common spelling.
    """
    counts: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    for tags in captions:
        seen = set()
        for tag in tags:
            key = tag_key(tag)
            if not key:
                continue
            spellings.setdefault(key, Counter())[split_weight(tag)[1]] += 1
            if key not in seen:
                seen.add(key)
                counts[key] += 1
    shown = {key: min(sp.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, sp in spellings.items()}
    return sorted(((shown[k], n) for k, n in counts.items()), key=lambda item: (-item[1], item[0].lower(), item[0]))


@dataclass(frozen=True)
class TagEdit:
    """One batch edit, applied to every caption in this order: replace, prune, dedupe, sort, activation."""

    activation: Tags = ()
    prune: Tags = ()
    replace: tuple[tuple[Tags, str], ...] = ()
    dedupe: bool = False
    sort: bool = False
    keep_first: int = 0

    def is_empty(self) -> bool:
        return not (self.activation or self.prune or self.replace or self.dedupe or self.sort)

    def apply(self, tags: Sequence[str]) -> Tags:
        out = tuple(tags)
        for sources, target in self.replace:
            out = replace(out, sources, target)
        if self.prune:
            out = prune(out, self.prune)
        if self.dedupe:
            out = dedupe(out)
        if self.sort:
            out = sort_tags(out, self.keep_first)
        if self.activation:
            out = set_activation(out, self.activation)
        return out

    def label(self) -> str:
        """What the undo history shows for this edit."""
        parts = []
        if self.replace:
            parts += [f"replace {','.join(s)}={t}" for s, t in self.replace]
        if self.prune:
            parts.append("prune " + ",".join(self.prune))
        if self.dedupe:
            parts.append("dedupe")
        if self.sort:
            parts.append("sort" + (f" (keep first {self.keep_first})" if self.keep_first else ""))
        if self.activation:
            parts.append("activation " + ", ".join(self.activation))
        return "; ".join(parts) or "no change"

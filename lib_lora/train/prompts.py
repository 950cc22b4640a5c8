"""Sample prompts in kohya's syntax: `a photo of mychar --n blurry --w 512 --h 768 --s 28 --l 7 --d 42 --ss euler_a`.

--n negative prompt, --w / --h size, --s steps (1..1000), --l CFG scale, --d seed, --ss sampler. Options are
separated by " --" as sd-scripts splits them; an option that does not parse is reported, not silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadInput

DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None  # None: the run picks one from its seed and the prompt's position
    sampler: str | None = None  # None: the config's sample_sampler


_OPTIONS = {
    "w": ("width", int, r"\d+"),
    "h": ("height", int, r"\d+"),
    "d": ("seed", int, r"\d+"),
    "s": ("steps", int, r"\d+"),
    "l": ("scale", float, r"[\d.]+"),
    "n": ("negative_prompt", str, r".+"),
    "ss": ("sampler", str, r"\S+"),
}


def parse_prompt(line: str, default_size: tuple[int, int] | None = None) -> SamplePrompt:
    """One prompt line -> SamplePrompt; BadInput names a malformed option."""
    parts = line.strip().split(" --")
    values: dict = {}
    if default_size:
        values["width"], values["height"] = default_size
    for part in parts[1:]:
        name, _, rest = part.strip().partition(" ")
        spec = _OPTIONS.get(name.lower())
        if spec is None:
            raise BadInput(f"sample prompt option --{name} is unknown (use --n --w --h --s --l --d --ss): {line.strip()!r}")
        field, kind, pattern = spec
        if not re.fullmatch(pattern, rest.strip()):
            raise BadInput(f"sample prompt option --{name} needs a value like {pattern}: {line.strip()!r}")
        values[field] = kind(rest.strip())
    if "steps" in values:
        values["steps"] = max(1, min(1000, values["steps"]))
    for side in ("width", "height"):
        if side in values:
            values[side] = max(64, values[side] - values[side] % 8)
    return SamplePrompt(prompt=parts[0].strip(), **values)

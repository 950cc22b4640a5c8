"""Sample prompts in kohya's syntax: `a photo of mychar --n blurry --w 512 --h 768 --s 28 --l 7 --d 42 --ss euler_a`.

--n negative prompt, --w / --h size, --s steps (1..1000), --l CFG scale, --d seed, --ss sampler. Options are
separated by " --" as sd-scripts splits them; an option that does not parse is reported, not silently dropped.
Prompt files come in sd-scripts' three forms: `.txt` lines, `.toml` (`[prompt]` defaults, `[[prompt.subset]]` one
per image) and `.json` (a list of dicts or lines); dicts use sd-scripts' keys and are turned into lines here.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# sd-scripts' prompt-dict keys (.toml / .json prompt files) -> our line options
_DICT_KEYS = {"negative_prompt": "n", "width": "w", "height": "h", "sample_steps": "s", "scale": "l", "seed": "d",
              "sample_sampler": "ss"}


def _dict_to_line(item: dict, where: str) -> str:
    if not isinstance(item.get("prompt"), str):
        raise BadInput(f"{where}: a prompt entry has no 'prompt' text: {item!r}")
    parts = [item["prompt"].strip()]
    for key, flag in _DICT_KEYS.items():
        value = item.get(key)
        if value is not None and value != "":
            parts.append(f"--{flag} {value}")
    return " ".join(parts)


def _load_structured(path: Path, text: str) -> list[Any]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"prompt file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise BadInput(f"prompt file {path}: expected a JSON list of prompts")
        return data
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 (the webui's)
        try:
            import tomli as tomllib
        except ImportError:
            raise BadInput("reading a .toml prompt file on Python 3.10 needs the 'tomli' package") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"prompt file {path} is not valid TOML: {exc}") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise BadInput(f"prompt file {path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    return [{**defaults, **subset} for subset in table["subset"]]


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompt lines of a .txt, .toml or .json prompt file (blank and '#' lines of a .txt are dropped).
    OSError when it cannot be read; BadInput when its structure is wrong."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".toml", ".json"):
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    lines = []
    for item in _load_structured(path, text):
        line = _dict_to_line(item, str(path)) if isinstance(item, dict) else str(item).strip()
        if line:
            lines.append(line)
    return lines

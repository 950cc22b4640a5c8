"""The real CLIP tokenizer, built offline from the BPE vocabulary that open_clip (or OpenAI's clip) ships.

Why: counting caption tokens (75 / 150 / 225), the tiny test models and the CLI all need CLIP's exact tokenizer,
and nothing may download it. The webui environment has open-clip-torch installed, so the file is always at hand.
The vocabulary is GPT-2's 256 byte symbols, the same with `</w>`, one entry per merge, then the two specials.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from .errors import BadInput
from .fsutil import atomic_write_text

_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def find_bpe_file() -> Path:
    """Locate `bpe_simple_vocab_16e6.txt.gz` inside an installed open_clip or clip package, without importing it."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                candidate = Path(folder) / _BPE_NAME
                if candidate.is_file():
                    return candidate
    raise BadInput(
        "CLIP's BPE vocabulary was not found: install 'open-clip-torch' (pip install --no-deps open-clip-torch)"
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]  # insertion order of GPT-2's table = CLIP's vocabulary order


def write_tokenizer_files(folder: str | os.PathLike, bpe_file: str | os.PathLike | None = None) -> Path:
    """Write `vocab.json`, `merges.txt` and the tokenizer configs that transformers' CLIPTokenizer loads."""
    folder = Path(folder)
    bpe = Path(bpe_file) if bpe_file else find_bpe_file()
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config))
    return folder


def default_cache_dir() -> Path:
    base = os.environ.get("LORA_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lib_lora")
    return Path(base) / "clip-tokenizer"


@lru_cache(maxsize=4)
def load_clip_tokenizer(folder: str | None = None):
    """Return a transformers `CLIPTokenizer`, building its files in `folder` (default: a user cache) if missing."""
    from transformers import CLIPTokenizer

    target = Path(folder) if folder else default_cache_dir()
    if not (target / "vocab.json").is_file() or not (target / "merges.txt").is_file():
        write_tokenizer_files(target)
    return CLIPTokenizer.from_pretrained(str(target))

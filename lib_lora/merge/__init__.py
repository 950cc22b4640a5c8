"""LoRA -> checkpoint merge (see docs/merge.md).

`merge_loras(model_path, [(lora_path, multiplier)], out_path, precision=None, overwrite=False, progress=None,
allow_missing=False) -> MergeReport`. Imports torch only when a merge runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .merger import LoraReport, MergeReport, merge_loras

__all__ = ["merge_loras", "MergeReport", "LoraReport"]


def __getattr__(name: str):
    if name in __all__:
        from . import merger

        return getattr(merger, name)
    raise AttributeError(name)

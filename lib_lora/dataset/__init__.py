"""Training data: folder scan (N_concept), captions, buckets, augmentation, latent / text caches, batch plans.

See docs/dataset.md. Names are exported lazily so that `import lib_lora.dataset` (e.g. for `DatasetOptions` or
the bucket functions in a UI) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetOptions": "options",
    "parse_resolution": "options",
    "validate_options": "options",
    "Subset": "scan",
    "Dataset": "loader",
    "Batch": "loader",
    "BatchSpec": "loader",
    "ItemPlan": "loader",
    "LatentCache": "cache",
    "TextEncoderCache": "cache",
    "bucket_resolutions": "buckets",
    "select_bucket": "buckets",
    "steps_per_epoch": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

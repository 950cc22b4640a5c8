"""Text conditioning for the loop: encoded per batch while the text encoder trains, cached once otherwise.

With a frozen text encoder and captions that never change (no shuffling or tag dropout), every caption is
encoded once before the first step, in fixed chunks, and the encoders can leave the GPU; each batch then
concatenates its rows (SDXL size conditioning set per batch). The cached rows are the same on every (re)start,
so a resumed run computes the same conditioning as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

CACHE_CHUNK = 16  # captions per text-encoder call while filling the cache


class TextConditioner:
    def __init__(self, backend: Any, dataset: Any, clip_skip: int | None, max_tokens: int | None, train_te: bool):
        self.backend, self.train_te = backend, train_te
        self.clip_skip, self.max_tokens = clip_skip or 1, max_tokens or 75
        variants = getattr(dataset, "caption_variants", None)
        texts = variants() if variants is not None and not train_te else None
        self.texts = sorted(texts) if texts is not None else None
        self.rows: dict[str, Any] = {}

    @property
    def cached(self) -> bool:
        return self.texts is not None

    def _encode(self, texts: list[str], sizes=None, pad: bool = False):
        return self.backend.encode_prompts(texts, self.clip_skip, self.max_tokens, sizes=sizes, pad_chunks=pad)

    def fill(self) -> None:
        """Encode every caption once (chunks padded to max_token_length so rows of any caption fit together)."""
        if not self.cached or self.rows:
            return
        with torch.no_grad():
            for start in range(0, len(self.texts), CACHE_CHUNK):
                chunk = self.texts[start : start + CACHE_CHUNK]
                cond = self._encode(chunk, pad=True).detach().to("cpu")
                for i, text in enumerate(chunk):
                    self.rows[text] = cond[i]
        offload = getattr(self.backend, "offload_text_encoders", None)
        if offload is not None:
            offload()

    def clear(self) -> None:
        self.rows.clear()

    def __call__(self, captions: list[str], sizes=None):
        if self.cached:
            self.fill()
            from ..backends.base import Cond

            cond = Cond.cat([self.rows[c] for c in captions]).to(self.backend.device)
            return cond.with_sizes(sizes) if sizes is not None else cond
        if self.train_te:
            return self._encode(list(captions), sizes)
        with torch.no_grad():
            return self._encode(list(captions), sizes)

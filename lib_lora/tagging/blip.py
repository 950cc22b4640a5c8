"""BLIP captions (transformers' BlipForConditionalGeneration + BlipProcessor), batched, for both stacks.

Works with transformers 4.30 (the webui) and 5.x: only `from_pretrained` on a local folder, the processor's
image half and `generate` are used. The caption is one sentence; the runner treats it as one "tag" so the same
append / prepend / overwrite / skip modes apply. `close()` drops the model and empties the CUDA cache, since a
captioner that keeps 1.8 GB of VRAM after use is a top peer complaint.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from ..errors import BadInput, IncompatibleFile
from ..imagefiles import open_image_rgb


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInput(f"unknown device {device!r} (auto, cpu, cuda)")
    return device


def _input_size(size) -> int:
    """The processor's square input side: a dict in transformers 4, a SizeDict in 5; BLIP's 384 if unknown."""
    if isinstance(size, int):
        return size
    height = getattr(size, "height", None)
    if height is None and hasattr(size, "get"):
        height = size.get("height") or size.get("shortest_edge")
    return int(height or 384)


class BlipCaptioner:
    """One loaded BLIP captioner; `prepare` (decode + resize + normalise) runs in decode threads."""

    name = "blip"
    max_batch = None

    def __init__(
        self,
        model_dir: str | os.PathLike,
        num_beams: int = 3,
        min_length: int = 5,
        max_length: int = 75,
        do_sample: bool = False,
        top_p: float = 0.9,
        device: str = "auto",
    ) -> None:
        if num_beams < 1:
            raise BadInput(f"--num_beams must be at least 1, got {num_beams}")
        if not 0 <= min_length <= max_length:
            raise BadInput(f"--min_length ({min_length}) must be between 0 and --max_length ({max_length})")
        if not 0.0 < top_p <= 1.0:
            raise BadInput(f"--top_p must be in (0, 1], got {top_p}")
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        folder = Path(model_dir)
        try:
            self.processor = BlipProcessor.from_pretrained(str(folder), local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IncompatibleFile(f"cannot load a BLIP captioning model from {folder}: {reason}") from exc
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.generate_kwargs = dict(num_beams=num_beams, min_length=min_length, max_length=max_length)
        if do_sample:
            self.generate_kwargs.update(do_sample=True, top_p=top_p)
        self.size = _input_size(getattr(self.processor.image_processor, "size", None))
        self.provider = self.device

    def prepare(self, path: str | os.PathLike):
        """Decoded, resized, normalised pixels [3, H, W] (a float32 numpy array)."""
        image = open_image_rgb(path, draft_size=self.size)
        return self.processor.image_processor(images=image, return_tensors="np")["pixel_values"][0]

    def caption_batch(self, prepared: list) -> list[str]:
        import numpy as np
        import torch

        if self.model is None:
            raise RuntimeError("the captioner was closed")
        pixels = torch.from_numpy(np.stack(prepared)).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(pixel_values=pixels, **self.generate_kwargs)
        return [" ".join(self.processor.decode(row, skip_special_tokens=True).split()) for row in ids]

    def tag_batch(self, prepared: list) -> list[list[str]]:
        return [[caption] if caption else [] for caption in self.caption_batch(prepared)]

    def close(self) -> None:
        """Free the model's memory now (RAM and VRAM), not when the host process exits."""
        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def __enter__(self) -> "BlipCaptioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

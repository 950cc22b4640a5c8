"""Latent cache (memory or `.npz` on disk) and text-encoder output cache.

The VAE runs once per image (and once more for its mirror when flip_aug is on); afterwards the caller may move
the VAE off the GPU. A cached latent is used only when its key matches exactly: the image file's content digest,
its bucket, resize and crop, whether a mirrored latent is stored, and the encoder's identity (an SD1 latent is
no use to SDXL). Anything else is encoded again and the file replaced, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import IncompatibleFile
from ..fsutil import atomic_write_bytes

CACHE_VERSION = 1
Size = tuple[int, int]
Encode = Callable[[Any], Any]  # torch.Tensor (N, 3, H, W) in [-1, 1] -> torch.Tensor (N, C, H/f, W/f)


def file_digest(path: Path) -> str:
    """blake2b of the file's bytes: a copied dataset keeps its cache, an edited image loses it."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheJob:
    """One image to encode: where it is, how it is cut, and whether its mirror is needed too."""

    index: int  # the image's index in the dataset
    path: Path
    bucket: Size
    resized: Size
    crop: tuple[int, int]  # (left, top) in the resized image
    with_flip: bool


def cache_key(job: CacheJob, encoder_id: str) -> str:
    digest = file_digest(job.path)
    return json.dumps(
        {
            "version": CACHE_VERSION,
            "encoder": encoder_id,
            "image": digest,
            "bucket": list(job.bucket),
            "resized": list(job.resized),
            "crop": list(job.crop),
            "flip": job.with_flip,
        },
        sort_keys=True,
    )


def disk_path(job: CacheJob, cache_dir: Path | None) -> Path:
    """`<image file>.<w>x<h>.latents.npz` beside the image, or in `cache_dir` with a path hash to keep names apart."""
    name = f"{job.path.name}.{job.bucket[0]}x{job.bucket[1]}.latents.npz"
    if cache_dir is None:
        return job.path.with_name(name)
    tag = hashlib.blake2b(str(job.path.resolve()).encode("utf-8"), digest_size=6).hexdigest()
    return Path(cache_dir) / f"{tag}-{name}"


def _to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _read_npz(path: Path) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            key = str(data["key"])
            latents = data["latents"]
            flipped = data["latents_flipped"] if "latents_flipped" in data.files else None
            return key, latents, flipped
    except (OSError, ValueError, KeyError, EOFError):  # absent, truncated or foreign file: encode again
        return None


class LatentCache:
    """Latents per image index, in memory or in `.npz` files (then read back per batch, not held in memory)."""

    def __init__(self, to_disk: bool = False, cache_dir: str | Path | None = None):
        self.to_disk = to_disk
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[int, tuple[str, Any, Any]] = {}
        self._files: dict[int, Path] = {}
        self.encoded = 0  # images encoded by the last `fill`
        self.reused = 0  # images whose cached latents were still valid
        self.total = 0  # images the last `fill` was asked for
        self.stopped = False  # the last `fill` ended early at `should_stop` (some images have no latents)

    def __contains__(self, index: int) -> bool:
        return index in (self._files if self.to_disk else self._memory)

    def fill(self, jobs: Sequence[CacheJob], encode: Encode, encoder_id: str, load_pixels: Callable[[CacheJob], Any],
             batch_size: int = 1, progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> None:
        """Make sure every job has valid latents, encoding only those without; `load_pixels(job)` gives the
        (3, H, W) float tensor of the un-mirrored crop. `should_stop()` is asked before each VAE batch: a stop
        (Ctrl-C, the tab's Interrupt) must not wait for a whole dataset to encode; what was stored stays."""
        import torch

        self.encoded = self.reused = 0
        self.stopped = False
        todo: list[tuple[CacheJob, str]] = []
        for job in jobs:
            key = cache_key(job, encoder_id)
            if self._valid(job, key):
                self.reused += 1
            else:
                todo.append((job, key))
        done = self.reused
        total = self.total = len(jobs)
        if progress:
            progress(done, total)
        by_bucket: dict[Size, list[tuple[CacheJob, str]]] = {}
        for item in todo:
            by_bucket.setdefault(item[0].bucket, []).append(item)
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            for start in range(0, len(items), max(1, batch_size)):
                if should_stop is not None and should_stop():
                    self.stopped = True
                    return
                chunk = items[start : start + batch_size]
                pixels = torch.stack([torch.as_tensor(load_pixels(job)) for job, _ in chunk])
                mirrored = [i for i, (job, _) in enumerate(chunk) if job.with_flip]
                batch = torch.cat([pixels, pixels[mirrored].flip(-1)]) if mirrored else pixels
                with torch.no_grad():
                    latents = encode(batch)
                if not isinstance(latents, torch.Tensor) or latents.shape[0] != batch.shape[0]:
                    raise IncompatibleFile("the latent encoder did not return one latent per image")
                latents = latents.detach().cpu()
                flipped_at = {i: len(chunk) + n for n, i in enumerate(mirrored)}
                for i, (job, key) in enumerate(chunk):
                    flipped = latents[flipped_at[i]].clone() if i in flipped_at else None
                    self._store(job, key, latents[i].clone(), flipped)
                self.encoded += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)

    def _valid(self, job: CacheJob, key: str) -> bool:
        if not self.to_disk:
            held = self._memory.get(job.index)
            return held is not None and held[0] == key
        path = disk_path(job, self.cache_dir)
        stored = _read_npz(path) if path.is_file() else None
        if stored is None or stored[0] != key or (job.with_flip and stored[2] is None):
            return False
        self._files[job.index] = path
        return True

    def _store(self, job: CacheJob, key: str, plain, flipped) -> None:
        if not self.to_disk:
            self._memory[job.index] = (key, plain, flipped)
            return
        arrays = {"key": np.array(key), "latents": _to_numpy(plain)}
        if flipped is not None:
            arrays["latents_flipped"] = _to_numpy(flipped)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = disk_path(job, self.cache_dir)
        atomic_write_bytes(path, buffer.getvalue())
        self._files[job.index] = path

    def get(self, index: int, flipped: bool):
        """The cached latent (C, h, w) of image `index`, mirrored when `flipped`."""
        import torch

        if not self.to_disk:
            _, plain, mirror = self._memory[index]
            return mirror if flipped else plain
        stored = _read_npz(self._files[index])
        if stored is None:
            raise IncompatibleFile(f"latent cache file vanished or is damaged: {self._files[index]}")
        _, plain, mirror = stored
        return torch.from_numpy(mirror if flipped else plain)

    def clear(self) -> None:
        """Forget the in-memory latents (the files on disk stay valid for the next fill)."""
        self._memory.clear()
        self._files.clear()


class TextEncoderCache:
    """Text-encoder outputs keyed by caption text, for runs that do not train the text encoder.

    `encode(texts) -> sequence with one output per text` is the caller's (e.g. wrapping backend.encode_prompts);
    outputs are opaque here. Use it when `Dataset.caption_variants()` is not None, i.e. captions do not shuffle."""

    def __init__(self, encode: Callable[[list[str]], Sequence[Any]]):
        self._encode = encode
        self._outputs: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    def __contains__(self, text: str) -> bool:
        return text in self._outputs

    def prefill(self, texts: Iterable[str], batch_size: int = 16) -> None:
        """Encode every text not cached yet, `batch_size` texts per encoder call."""
        missing = sorted({t for t in texts if t not in self._outputs})
        for start in range(0, len(missing), max(1, batch_size)):
            chunk = missing[start : start + batch_size]
            outputs = list(self._encode(chunk))
            if len(outputs) != len(chunk):
                raise IncompatibleFile("the text encoder did not return one output per caption")
            self._outputs.update(zip(chunk, outputs))

    def get(self, texts: Sequence[str]) -> list[Any]:
        """Outputs for `texts` in order, encoding the missing ones in one call."""
        self.prefill(texts, batch_size=max(1, len(texts)))
        return [self._outputs[t] for t in texts]

    def clear(self) -> None:
        self._outputs.clear()

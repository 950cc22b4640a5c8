"""WD14 tagger (SmilingWolf's WD v2/v3 ONNX models) on onnxruntime.

Facts about the model contract (from the model repos and the reference taggers): `model.onnx` takes NHWC float32
BGR pixels in 0..255 at the model's square size (448 for v3, read from the input shape), the image padded to a
square on white; it returns one probability per row of `selected_tags.csv` (tag_id,name,category,count), where
category 9 = rating, 4 = character, 0 = general. Rating tags are never written: they describe content, not what
the LoRA should learn.

The session is created with the CUDA provider when onnxruntime offers it and is destroyed by `close()` (peers'
taggers kept VRAM until the webui restarted).
"""

from __future__ import annotations

import csv
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput, IncompatibleFile
from ..imagefiles import open_image_rgb

RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448
# Booru kaomoji whose underscore is part of the face, not a word separator: kept by --replace_underscores.
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})
_GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")


@dataclass(frozen=True)
class TagTable:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_tag_table(path: str | os.PathLike) -> TagTable:
    """Rows of `selected_tags.csv` in model-output order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise IncompatibleFile(f"cannot read {path}: {exc}") from exc
    header = [h.strip() for h in rows[0]] if rows else []
    if "name" not in header or "category" not in header:
        raise IncompatibleFile(f"{path} is not a tagger tag list (expected columns tag_id,name,category,count)")
    name_col, cat_col = header.index("name"), header.index("category")
    names, categories = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            names.append(row[name_col])
            categories.append(int(row[cat_col]))
        except (IndexError, ValueError) as exc:
            raise IncompatibleFile(f"{path} line {line} is malformed: {row!r}") from exc
    if not names:
        raise IncompatibleFile(f"{path} lists no tags")
    return TagTable(tuple(names), tuple(categories))


def preprocess(image, size: int) -> np.ndarray:
    """RGB PIL image -> [size, size, 3] float32 BGR 0..255, the image centred on a white square.

    The image is scaled to fit first and padded after (same pixels as padding then scaling, without allocating a
    full-resolution square canvas per decode thread). Bicubic, which PIL antialiases when shrinking.
    """
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return np.ascontiguousarray(np.asarray(canvas, dtype=np.float32)[:, :, ::-1])


def choose_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers in preference order: a GPU one when available (unless device='cpu'), then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and not gpu:
        raise BadInput(
            "onnxruntime has no GPU provider here (providers: " + ", ".join(available) + "); "
            "install 'onnxruntime-gpu' instead of 'onnxruntime', or use --device cpu"
        )
    return gpu[:1] + ["CPUExecutionProvider"]


class Wd14Tagger:
    """One loaded WD tagger. `prepare` runs in decode threads; `tag_batch` runs the model on stacked inputs."""

    name = "wd14"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        replace_underscores: bool = False,
        device: str = "auto",
    ) -> None:
        for what, value in (("general_threshold", general_threshold), ("character_threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise BadInput(f"--{what} must be between 0 and 1, got {value}")
        folder = Path(model_dir)
        self.model_path = folder / "model.onnx"
        self.table = read_tag_table(folder / "selected_tags.csv")
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.replace_underscores = replace_underscores
        self.session = _open_session(self.model_path, device)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != 3):
            raise IncompatibleFile(f"{self.model_path} takes input {shape}, not [batch, size, size, 3] images")
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None  # some v2 models: 1
        outputs = self.session.get_outputs()[0].shape
        width = outputs[-1] if outputs else None
        if isinstance(width, int) and width != len(self.table.names):
            raise IncompatibleFile(
                f"{self.model_path} scores {width} tags but selected_tags.csv lists {len(self.table.names)}"
            )
        self.provider = self.session.get_providers()[0]
        self._display = [self._display_name(n) for n in self.table.names]
        cats = np.asarray(self.table.categories)
        self._general = np.flatnonzero(cats == GENERAL)
        self._character = np.flatnonzero(cats == CHARACTER)

    def _display_name(self, tag: str) -> str:
        if self.replace_underscores and tag not in KAOMOJI:
            return tag.replace("_", " ")
        return tag

    def prepare(self, path: str | os.PathLike) -> np.ndarray:
        return preprocess(open_image_rgb(path, draft_size=self.size), self.size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """[n, size, size, 3] BGR float32 -> [n, tags] probabilities."""
        if self.session is None:
            raise RuntimeError("the tagger was closed")
        probs = self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]
        if probs.shape[-1] != len(self.table.names):
            raise IncompatibleFile(
                f"{self.model_path} scores {probs.shape[-1]} tags but selected_tags.csv lists {len(self.table.names)}"
            )
        return probs

    def select(self, probs: np.ndarray) -> list[str]:
        """Tags over threshold, characters first, each group most confident first; no rating tags."""
        chosen: list[str] = []
        for index, threshold in ((self._character, self.character_threshold), (self._general, self.general_threshold)):
            hits = index[probs[index] >= threshold]
            for i in hits[np.argsort(-probs[hits], kind="stable")]:
                chosen.append(self._display[i])
        return chosen

    def tag_batch(self, prepared: list[np.ndarray]) -> list[list[str]]:
        probs = self.predict(np.stack(prepared))
        return [self.select(p) for p in probs]

    def close(self) -> None:
        """Drop the session so onnxruntime frees its (GPU) memory now, not when the host exits."""
        self.session = None
        gc.collect()

    def __enter__(self) -> "Wd14Tagger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_session(path: Path, device: str):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BadInput(
            "the WD14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu on a CUDA machine)"
        ) from exc
    providers = choose_providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no provider-fallback chatter on stderr; we report the provider used
    # idle onnxruntime threads spin by default, taking the CPU the decode threads need between batches
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable / invalid models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleFile(f"cannot load {path} with onnxruntime: {reason}") from exc

"""The standalone app's comparison grid: epochs (columns) x weights (rows), rendered with the backend's own
sampler and the same seed in every cell, labelled like the webui's X/Y/Z plot."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import BadInput
from .host import GridRequest, GridResult

_LORA_TAG = re.compile(r"<lora:[^>]*>\s*,?\s*")


def _targets(backend):
    from ..network import NetworkConfig

    return backend.lora_targets(NetworkConfig.from_args(dim=4, alpha=1.0, network_args=["conv_dim=4", "conv_alpha=1"]))


def find_lora(lora_dir: Path, stem: str) -> Path:
    matches = sorted(lora_dir.rglob(f"{stem}.safetensors")) if lora_dir.is_dir() else []
    if not matches:
        raise BadInput(f"no LoRA file named {stem}.safetensors in {lora_dir}")
    return matches[0]


def label_grid(cells: list[list], col_labels: list[str], row_labels: list[str]):
    """One image: a header row of column labels, a left column of row labels, the cells in between."""
    from PIL import Image, ImageDraw

    w, h = cells[0][0].size
    left, top = (60 if any(row_labels) else 0), 20
    grid = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        draw.text((left + c * w + 4, 4), text, fill="black")
    for r, text in enumerate(row_labels):
        draw.text((4, top + r * h + h // 2), text, fill="black")
        for c in range(len(col_labels)):
            grid.paste(cells[r][c], (left + c * w, top + r * h))
    return grid


def render_grid(backend, lora_dir: Path, request: GridRequest) -> GridResult:
    from ..network import LoraNetwork, load_lora
    from .compare import infotext

    prompt = _LORA_TAG.sub("", request.prompt or "").strip()
    weights = request.weights or (1.0,)
    targets = _targets(backend)
    columns = []
    for stem in request.lora_stems:
        tensors, _ = load_lora(find_lora(lora_dir, stem))
        column = []
        for w in weights:
            net = LoraNetwork.from_kohya(targets, tensors, multiplier=float(w))
            with net.inject():
                image = backend.sample(prompt, request.negative_prompt, steps=request.steps, cfg=request.cfg_scale,
                                       seed=request.seed, width=request.width, height=request.height)[0]
            column.append(image)
        columns.append(column)
    cells = [[columns[c][r] for c in range(len(columns))] for r in range(len(weights))]
    grid = label_grid(cells, list(request.lora_stems), [f"{w:g}" for w in weights] if len(weights) > 1 else [""])
    return GridResult(image=grid, infotext=infotext(request))

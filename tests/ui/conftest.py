"""A test Host: real folders, no model (the tab's logic without torch), and a tiny-image dataset maker."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui.host import ModelInfo


class FolderHost:
    """Host over temp folders; `model` None means 'no model loaded'."""

    kind = "test"

    def __init__(self, root: Path, model: ModelInfo | None = ModelInfo("tiny", "sd1", path="tiny.safetensors")):
        self.root = root
        self.model = model
        self.sessions = 0

    def projects_root(self) -> Path:
        return self.root / "projects"

    def presets_dir(self) -> Path:
        folder = self.root / "presets"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def lora_output_dir(self, project: str) -> Path:
        return self.root / "Lora" / project

    def model_info(self) -> ModelInfo:
        if self.model is None:
            raise BadInput("no model is loaded")
        return self.model

    def check_can_train(self) -> None:
        self.model_info()

    def fixed_config(self, info):
        return {"pretrained_model_name_or_path": info.path, "mixed_precision": "no"}

    def lora_files(self):
        return sorted((self.root / "Lora").rglob("*.safetensors"))

    def checkpoints(self):
        return []


@pytest.fixture
def host(tmp_path) -> FolderHost:
    return FolderHost(tmp_path)


def make_images(folder: Path, n: int, captions: list[str] | None = None, size: int = 64) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), ((40 * i) % 256, (90 + 30 * i) % 256, 200))
        path = folder / f"{i:03d}.png"
        img.save(path)
        if captions is not None:
            path.with_suffix(".txt").write_text(captions[i % len(captions)], encoding="utf-8")
        out.append(path)
    return out

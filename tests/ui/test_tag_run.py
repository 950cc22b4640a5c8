"""Tagging from the Tags sub-tab (and the API's tag route): a model folder the user gives, the whole run one undo
step, and a bad folder reported before the webui's queue is taken (a running generation does not delay it)."""

from __future__ import annotations

import contextlib

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import projects, tagops
from lib_lora.ui.tab_tags import run_tagger
from tests.fixtures.tiny_wd14 import build_tiny_wd14
from tests.ui.conftest import FolderHost, make_images


class QueueHost(FolderHost):
    def __init__(self, root):
        super().__init__(root)
        self.entered = []

    @contextlib.contextmanager
    def exclusive(self, label):
        self.entered.append(label)
        yield

    def tagger_models_folder(self):
        return self.root / "models" / "lora-train-taggers"


def test_wd14_from_a_model_folder_tags_in_the_queue_and_undoes_in_one_step(tmp_path):
    pytest.importorskip("onnxruntime")
    host = QueueHost(tmp_path)
    project = projects.create_project(host.projects_root(), "p")
    images = make_images(project.dataset / "10_p", 3, captions=["mine"])
    model = build_tiny_wd14(tmp_path / "wd14")
    text = run_tagger(project, "WD14", 0.35, "append", host, model_dir=str(model))
    assert text.startswith("tagged 3 of 3 images") and host.entered == ["LoRA Train tagging p"]
    caption = images[0].with_suffix(".txt").read_text()
    assert caption.startswith("mine, ") and "1girl" in caption
    assert tagops.history(project.dataset)[0].endswith("(3)")
    tagops.undo(project.dataset)
    assert images[0].with_suffix(".txt").read_text() == "mine"


def test_a_missing_model_is_reported_before_the_queue_is_taken(tmp_path):
    host = QueueHost(tmp_path)
    project = projects.create_project(host.projects_root(), "p")
    make_images(project.dataset / "10_p", 1)
    with pytest.raises(BadInput, match="model folder does not exist"):
        run_tagger(project, "WD14", 0.35, "append", host, model_dir=str(tmp_path / "nowhere"))
    with pytest.raises(BadInput, match="unknown tagger"):
        run_tagger(project, "clip", 0.35, "append", host)
    assert host.entered == []


def test_the_status_line_tells_shared_captions_from_unreadable_images(tmp_path):
    """Images sharing one caption file (1.png + 1.jpg) are not tagged either, but they are not 'unreadable'."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    host = QueueHost(tmp_path)
    project = projects.create_project(host.projects_root(), "p")
    folder = project.dataset / "10_p"
    images = make_images(folder, 3, captions=["mine"])
    Image.open(images[0]).save(folder / "000.jpg")  # shares 000.txt with 000.png
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    text = run_tagger(project, "WD14", 0.35, "append", host, model_dir=str(build_tiny_wd14(tmp_path / "wd14")))
    assert text.startswith("tagged 2 of 5 images"), text
    assert "3 images not tagged" in text, text
    assert "2 share a caption file (000.jpg and 000.png share 000.txt: rename one)" in text, text
    assert "1 could not be read (broken.png)" in text, text
    assert "unreadable" not in text and str(folder) not in text, text

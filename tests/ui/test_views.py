"""What the sub-tabs render from files: the check report, the loss plot, the Merge tab's LoRA names, the Test
tab's range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import projects
from lib_lora.ui.lossplot import loss_svg, smooth
from lib_lora.ui.tab_dataset import check_report, move_duplicates
from lib_lora.ui.tab_merge import lora_choices
from lib_lora.ui.tab_test import number
from tests.ui.conftest import make_images


def test_check_report_groups_findings_and_says_what_to_do_in_the_tab(tmp_path):
    project = projects.create_project(tmp_path, "p")
    folder = project.dataset / "10_p"
    make_images(folder, 9, captions=["red", "blue"], size=300)
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    report = check_report(project, {"resolution": "256", "enable_bucket": False})
    lines = report.splitlines()
    missing_tag = [ln for ln in lines if "without the activation tag" in ln]
    assert len(missing_tag) == 1 and "(9)" in missing_tag[0] and "and 3 more" in missing_tag[0]
    assert "Tags > Apply activation tag" in report and "python -m lib_lora" not in report
    project.meta.activation_tag = ""  # a guessed activation tag: still no command-line words
    for i, cap in enumerate(sorted(folder.glob("*.txt"))):
        cap.write_text("sks, red" if i else "blue")
    guessed = check_report(project, {"resolution": "256", "enable_bucket": False})
    assert "guessed" in guessed and "--" not in guessed and "python -m" not in guessed
    assert "broken.png" in report and "object at 0x" not in report
    assert "resolution 256, without buckets" in report


def test_moving_duplicates_keeps_one_and_the_check_stays_quiet_about_the_folder(tmp_path):
    from PIL import Image

    project = projects.create_project(tmp_path, "p")
    folder = project.dataset / "10_p"
    make_images(folder, 2, captions=["a"], size=128)
    Image.open(folder / "000.png").resize((120, 120)).save(folder / "copy.png")
    (folder / "copy.txt").write_text("a copy")
    assert "moved 1 duplicate" in move_duplicates(project)
    assert (project.dataset / "_duplicates" / "10_p" / "copy.txt").read_text() == "a copy"
    assert sorted(p.name for p in folder.glob("*.png")) == ["000.png", "001.png"]
    assert "_duplicates" not in check_report(project, {"resolution": "64", "enable_bucket": False})
    assert "nothing moved" in move_duplicates(project)


def test_loss_plot_scales_and_survives_nan():
    empty = loss_svg([])
    assert "<svg" in empty and "<path" not in empty
    svg = loss_svg([(1, 0.5), (2, float("nan")), (3, 0.25)], "Loss of p")
    assert svg.count("<path") == 2 and "viewBox" in svg and "last 0.2500" in svg
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_merge_lists_loras_below_the_lora_folder():
    files = [Path("/w/models/Lora/a/a-01.safetensors"), Path("/w/models/Lora/b.safetensors")]
    assert list(lora_choices(files)) == ["a/a-01.safetensors", "b.safetensors"]
    assert lora_choices([]) == {}


def test_grid_numbers_are_checked_with_their_name():
    assert number("Steps", "20", 1, 150) == 20
    with pytest.raises(BadInput, match="Steps must be between 1 and 150, not 0"):
        number("Steps", 0, 1, 150)
    with pytest.raises(BadInput, match="Width: 'x' is not a number"):
        number("Width", "x", 64, 2048)


def test_the_dataset_gallery_says_when_it_shows_only_some_images(tmp_path):
    """It showed the first 200 images under a plain label: with 300 imported, 100 looked missing."""
    from lib_lora.ui.tab_dataset import gallery_label

    project = projects.create_project(tmp_path, "p")
    make_images(project.dataset / "10_p", 5, size=16)
    assert gallery_label(project, limit=3) == "Images and captions (the first 3 of 5)"
    assert gallery_label(project, limit=200) == "Images and captions (5)"

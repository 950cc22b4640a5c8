from __future__ import annotations

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import projects
from tests.ui.conftest import make_images


def test_create_makes_the_documented_layout(tmp_path):
    project = projects.create_project(tmp_path, "mychar", repeats=12)
    assert (tmp_path / "mychar" / "dataset" / "12_mychar").is_dir()
    for sub in ("logs", "samples", "state"):
        assert (tmp_path / "mychar" / sub).is_dir()
    assert projects.list_projects(tmp_path) == ["mychar"]
    assert projects.open_project(tmp_path, "mychar").meta.activation_tag == "mychar"


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "a\\b", "", "  ", "x:y", ".hidden"])
def test_unsafe_names_are_refused_and_nothing_is_created(tmp_path, name):
    with pytest.raises(BadInput):
        projects.create_project(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_an_existing_project(tmp_path):
    projects.create_project(tmp_path, "p")
    with pytest.raises(BadInput, match="already exists"):
        projects.create_project(tmp_path, "p")


def test_import_copies_images_and_captions_without_overwriting(tmp_path):
    project = projects.create_project(tmp_path, "p")
    src = tmp_path / "src"
    make_images(src, 3, captions=["a cat"])
    (src / "notes.md").write_text("not an image")
    assert projects.import_folder(project, src) == 3
    assert projects.import_folder(project, src) == 3  # again: new names, old files untouched
    concept = project.concepts()[0]
    assert concept.images == 6
    names = sorted(p.name for p in concept.folder.iterdir())
    assert "000.png" in names and "000_1.png" in names and "000_1.txt" in names
    assert (concept.folder / "000.txt").read_text() == "a cat"
    assert (src / "000.png").exists()  # source left alone


def test_import_of_a_folder_without_images_says_so(tmp_path):
    project = projects.create_project(tmp_path, "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images"):
        projects.import_folder(project, tmp_path / "empty")
    with pytest.raises(BadInput, match="does not exist"):
        projects.import_folder(project, tmp_path / "missing")


def test_import_with_an_empty_or_relative_folder_imports_nothing(tmp_path, monkeypatch):
    """An empty box was read as the webui's working folder and copied its screenshot.png into the dataset."""
    project = projects.create_project(tmp_path, "p")
    make_images(tmp_path / "cwd", 2)
    monkeypatch.chdir(tmp_path / "cwd")
    for source in ("", "   ", ".", "cwd"):
        with pytest.raises(BadInput, match="folder to import"):
            projects.import_folder(project, source)
    assert project.images() == []


def test_set_repeats_renames_the_concept_folder(tmp_path):
    project = projects.create_project(tmp_path, "p", repeats=10)
    target = projects.set_repeats(project, "10_p", 4)
    assert target.name == "4_p" and project.concepts()[0].repeats == 4
    with pytest.raises(BadInput):
        projects.set_repeats(project, "4_p", 0)
    with pytest.raises(BadInput):
        projects.set_repeats(project, "../4_p", 3)


def test_project_image_refuses_paths_outside_the_dataset(tmp_path):
    project = projects.create_project(tmp_path, "p")
    make_images(project.dataset / "10_p", 1)
    assert projects.project_image(project, "10_p/000.png").name == "000.png"
    (tmp_path / "secret.png").write_bytes(b"x")
    with pytest.raises(BadInput):
        projects.project_image(project, "../../secret.png")


def test_check_report_lists_what_training_would_skip(tmp_path):
    from lib_lora.ui.tab_dataset import check_report

    project = projects.create_project(tmp_path, "p")
    with pytest.raises(BadInput, match="no images"):
        check_report(project)
    make_images(project.dataset / "10_p", 2, captions=["a cat"])
    (project.dataset / "10_p" / "broken.png").write_bytes(b"not a png")
    report = check_report(project)
    assert "3 images" in report and "broken.png" in report

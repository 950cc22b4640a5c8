"""Projects on disk: `<root>/<project>/` holding `dataset/N_concept/`, `project.toml`, `project.json`, `logs/`,
`samples/`, `state/`.

Why on disk only: everything a user does in the tab is written at once, so closing the browser, reloading the UI
or restarting the webui loses nothing; the same folders are what the CLI trains from.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..fsutil import atomic_write_text, check_name
from ..imagefiles import is_image_file, iter_image_files

CONCEPT = re.compile(r"^(\d+)_(.+)$")
SETTINGS_FILE = "project.toml"
META_FILE = "project.json"  # tab-only facts: activation tag, preferred weight, notes


@dataclass
class ProjectMeta:
    activation_tag: str = ""
    preferred_weight: float = 0.8
    notes: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectMeta":
        known = {k: data[k] for k in ("activation_tag", "preferred_weight", "notes") if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Concept:
    folder: Path
    repeats: int
    name: str
    images: int


@dataclass
class Project:
    root: Path
    name: str
    meta: ProjectMeta = field(default_factory=ProjectMeta)

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def dataset(self) -> Path:
        return self.path / "dataset"

    @property
    def settings_file(self) -> Path:
        return self.path / SETTINGS_FILE

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def state(self) -> Path:
        return self.path / "state"

    def concepts(self) -> list[Concept]:
        """`N_concept` folders (N = repeats) with their image counts, sorted by name."""
        found = []
        if self.dataset.is_dir():
            for sub in sorted(p for p in self.dataset.iterdir() if p.is_dir()):
                match = CONCEPT.match(sub.name)
                if match:
                    count = sum(1 for _ in iter_image_files(sub))
                    found.append(Concept(sub, int(match.group(1)), match.group(2), count))
        return found

    def images(self) -> list[Path]:
        """Every training image of every concept folder, in a stable order."""
        return [img for c in self.concepts() for img in sorted(iter_image_files(c.folder))]

    def save_meta(self) -> None:
        atomic_write_text(self.path / META_FILE, json.dumps(self.meta.__dict__, indent=1))


def list_projects(root: str | Path) -> list[str]:
    """Project names under `root` (folders holding a `dataset/` folder), sorted; dot-folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "dataset").is_dir())


def open_project(root: str | Path, name: str) -> Project:
    """Open an existing project; BadInput if the name is unsafe or the project does not exist."""
    name = check_name(name, "project name")
    project = Project(Path(root), name)
    if not project.dataset.is_dir():
        raise BadInput(f"project {name!r} does not exist in {root}")
    meta_path = project.path / META_FILE
    if meta_path.is_file():
        try:
            project.meta = ProjectMeta.from_dict(json.loads(meta_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            raise BadInput(f"{meta_path} is not valid JSON; fix or delete it") from None
    return project


def create_project(root: str | Path, name: str, concept: str = "", repeats: int = 10) -> Project:
    """Create `<root>/<name>/dataset/<repeats>_<concept>/` (concept defaults to the project name)."""
    name = check_name(name, "project name")
    project = Project(Path(root), name)
    if project.path.exists():
        raise BadInput(f"project {name!r} already exists")
    concept_name = check_name(concept or name, "concept name")
    _check_repeats(repeats)
    (project.dataset / f"{int(repeats)}_{concept_name}").mkdir(parents=True)
    for sub in (project.logs, project.samples, project.state):
        sub.mkdir(exist_ok=True)
    project.meta.activation_tag = name
    project.save_meta()
    return project


def _check_repeats(repeats) -> int:
    try:
        value = int(repeats)
    except (TypeError, ValueError):
        raise BadInput(f"repeats must be a whole number, not {repeats!r}") from None
    if not 1 <= value <= 1000:
        raise BadInput(f"repeats must be between 1 and 1000, not {value}")
    return value


def set_repeats(project: Project, concept_folder: str, repeats: int) -> Path:
    """Rename `N_concept` to `<repeats>_concept` (the folder name is where sd-scripts reads repeats from)."""
    repeats = _check_repeats(repeats)
    folder = project.dataset / check_name(concept_folder, "concept folder")
    match = CONCEPT.match(folder.name)
    if not folder.is_dir() or not match:
        raise BadInput(f"{concept_folder!r} is not a concept folder of project {project.name!r}")
    target = folder.with_name(f"{repeats}_{match.group(2)}")
    if target != folder:
        if target.exists():
            raise BadInput(f"{target.name} already exists")
        folder.rename(target)
    return target


def import_folder(project: Project, source: str | Path, concept_folder: str | None = None) -> int:
    """Copy images (and their same-named .txt captions) from `source` into a concept folder; returns how many.

    Existing files are never overwritten: a name clash gets a numeric suffix. Source files are left alone.
    """
    text = str(source or "").strip()
    if not text:
        raise BadInput("enter the folder to import (its full path)")
    src = Path(text).expanduser()
    if not src.is_absolute():  # it would be read from the server's working folder (the webui's own files)
        raise BadInput(f"enter the full path of the folder to import, not {text!r}")
    if not src.is_dir():
        raise BadInput(f"folder to import does not exist: {src}")
    concepts = project.concepts()
    if concept_folder:
        target = project.dataset / check_name(concept_folder, "concept folder")
        if not CONCEPT.match(target.name):
            raise BadInput(f"concept folder {concept_folder!r} must be named N_name (N = repeats), e.g. 10_{project.name}")
        target.mkdir(parents=True, exist_ok=True)
    elif concepts:
        target = concepts[0].folder
    else:
        target = project.dataset / f"10_{project.name}"
        target.mkdir(parents=True, exist_ok=True)
    if src.resolve() == target.resolve():
        raise BadInput("the folder to import is the concept folder itself")
    images = [p for p in sorted(src.iterdir()) if p.is_file() and is_image_file(p)]
    if not images:
        raise BadInput(f"no images (png, jpg, webp, bmp) in {src}")
    copied = 0
    for image in images:
        dest = _free_name(target, image.stem, image.suffix.lower())
        shutil.copy2(image, dest)
        caption = image.with_suffix(".txt")
        if caption.is_file():
            shutil.copy2(caption, dest.with_suffix(".txt"))
        copied += 1
    return copied


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate = folder / f"{stem}{suffix}"
    n = 1
    while candidate.exists() or candidate.with_suffix(".txt").exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def project_image(project: Project, relative: str) -> Path:
    """Resolve a dataset-relative image path sent back by the browser, refusing anything outside the dataset."""
    path = (project.dataset / relative).resolve()
    if project.dataset.resolve() not in path.parents or not path.is_file():
        raise BadInput(f"{relative!r} is not an image of project {project.name!r}")
    return path

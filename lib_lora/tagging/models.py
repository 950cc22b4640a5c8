"""Where tagger models come from: a local `--model_dir`, or the Hugging Face hub downloaded once into a models folder.

Peers' users lost hours to taggers that re-downloaded or hid weights in an opaque cache; here a repo lands in
`<models folder>/<owner>--<name>/` with its plain file names, so the user can see, copy or delete it, and a
second run finds it without touching the network. A download is only considered done when every needed file is
there (huggingface_hub writes each file under a temporary name and renames it when complete).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import BadInput

DEFAULT_WD14_REPO = "SmilingWolf/wd-swinv2-tagger-v3"
DEFAULT_BLIP_REPO = "Salesforce/blip-image-captioning-large"
WD14_FILES = ("model.onnx", "selected_tags.csv")
BLIP_FILES = ("config.json",)
BLIP_PROCESSOR = ("preprocessor_config.json", "processor_config.json")  # transformers 5 saves the latter
BLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BLIP_TOKENIZER = ("vocab.txt", "tokenizer.json")
MODELS_FOLDER_ENV = "LORA_TRAIN_TAGGER_MODELS"


def default_models_folder() -> Path:
    """`$LORA_TRAIN_TAGGER_MODELS`, else `~/.cache/lora-train/models/lora-train-taggers` (the webui passes its own)."""
    env = os.environ.get(MODELS_FOLDER_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lora-train" / "models" / "lora-train-taggers"


def repo_folder(models_folder: str | os.PathLike, repo_id: str) -> Path:
    """`<models folder>/<owner>--<name>`: one plain folder per hub repo."""
    parts = [p for p in repo_id.strip().split("/") if p]
    if len(parts) != 2 or any(p in (".", "..") or "\\" in p for p in parts):
        raise BadInput(f"model repo {repo_id!r} is not of the form owner/name")
    return Path(models_folder) / "--".join(parts)


def missing_wd14_files(folder: Path) -> list[str]:
    return [name for name in WD14_FILES if not (folder / name).is_file()]


def missing_blip_files(folder: Path) -> list[str]:
    missing = [name for name in BLIP_FILES if not (folder / name).is_file()]
    for group in (BLIP_PROCESSOR, BLIP_WEIGHTS, BLIP_TOKENIZER):
        if not any((folder / name).is_file() for name in group):
            missing.append(" or ".join(group))
    return missing


def _check_local(model_dir: str | os.PathLike, missing_fn) -> Path:
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise BadInput(f"model folder does not exist: {folder}")
    missing = missing_fn(folder)
    if missing:
        raise BadInput(f"model folder {folder} is missing {', '.join(missing)}")
    return folder


def locate_wd14(
    model_repo: str = DEFAULT_WD14_REPO,
    model_dir: str | os.PathLike | None = None,
    models_folder: str | os.PathLike | None = None,
) -> Path:
    """The folder holding `model.onnx` + `selected_tags.csv`: `model_dir` as given, else the repo's download."""
    if model_dir:
        return _check_local(model_dir, missing_wd14_files)
    folder = repo_folder(models_folder or default_models_folder(), model_repo)
    if not missing_wd14_files(folder):
        return folder
    _download(model_repo, folder, files=WD14_FILES)
    return _check_local(folder, missing_wd14_files)


def locate_blip(
    model_repo: str = DEFAULT_BLIP_REPO,
    model_dir: str | os.PathLike | None = None,
    models_folder: str | os.PathLike | None = None,
) -> Path:
    """A folder `BlipForConditionalGeneration.from_pretrained` + `BlipProcessor.from_pretrained` can load offline."""
    if model_dir:
        return _check_local(model_dir, missing_blip_files)
    folder = repo_folder(models_folder or default_models_folder(), model_repo)
    if not missing_blip_files(folder):
        return folder
    # json configs + tokenizer + ONE weights file (the repos also carry .bin / .h5 copies of the same weights)
    _download(model_repo, folder, patterns=["*.json", "vocab.txt", "model.safetensors"])
    if not any((folder / name).is_file() for name in BLIP_WEIGHTS):
        _download(model_repo, folder, patterns=["pytorch_model.bin"])
    return _check_local(folder, missing_blip_files)


def _download(repo_id: str, folder: Path, files: Sequence[str] = (), patterns: Sequence[str] = ()) -> None:
    """Fetch `files` (or `patterns`) of `repo_id` into `folder`; any failure becomes one actionable message."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise BadInput("downloading tagger models needs the 'huggingface_hub' package; use --model_dir") from exc
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create models folder {folder}: {exc.strerror or exc}") from exc
    try:
        if files:
            for name in files:
                hf_hub_download(repo_id, name, local_dir=str(folder))
        else:
            snapshot_download(repo_id, local_dir=str(folder), allow_patterns=list(patterns))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # network, offline mode, missing repo, disk full: all need the same user action
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(
            f"cannot download {repo_id} from the Hugging Face hub into {folder} ({reason}); "
            "check the repo name and the network, or pass --model_dir with the files"
        ) from exc

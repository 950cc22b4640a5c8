"""Shared fixtures: the real CLIP tokenizer (built offline) and tiny diffusers models.

Model fixtures are session-scoped and frozen; a test that changes a model must build its own copy
(`build_components(arch, tokenizer, seed)`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lib_lora.clip_tokenizer import write_tokenizer_files

    return write_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def clip_tokenizer(tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


def _components(arch, tokenizer):
    pytest.importorskip("diffusers")
    from tests.fixtures.diffusers_models import build_components

    return build_components(arch, tokenizer)


@pytest.fixture(scope="session")
def sd1_components(clip_tokenizer):
    return _components("sd1", clip_tokenizer)


@pytest.fixture(scope="session")
def sd2_components(clip_tokenizer):
    return _components("sd2", clip_tokenizer)


@pytest.fixture(scope="session")
def sdxl_components(clip_tokenizer):
    return _components("sdxl", clip_tokenizer)


@pytest.fixture(scope="session")
def sd1_diffusers_dir(tmp_path_factory, clip_tokenizer) -> Path:
    pytest.importorskip("diffusers")
    from tests.fixtures.diffusers_models import save_pipeline

    return save_pipeline("sd1", clip_tokenizer, tmp_path_factory.mktemp("sd1-diffusers"))

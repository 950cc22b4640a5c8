"""Tiny single-file checkpoints (+ yaml) written once per session, and webui-shaped model objects built from them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory):
    """{"sd1": path, "sd2": path (v-prediction yaml), "sdxl": path}: .safetensors with same-name .yaml."""
    from tests.backends.checkpoints import write_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    return {arch: write_checkpoint(arch, folder, parameterization="v" if arch == "sd2" else "eps")
            for arch in ("sd1", "sd2", "sdxl")}


def _webui_model(arch, checkpoint_files):
    from safetensors.torch import load_file

    from tests.backends.checkpoints import tiny_config
    from tests.backends.webui_models import build_sd_model, build_sdxl_model

    state = load_file(str(checkpoint_files[arch]))
    if arch == "sdxl":
        return build_sdxl_model(state)
    return build_sd_model(arch, state, tiny_config(arch, "v" if arch == "sd2" else "eps"))


@pytest.fixture
def webui_model(checkpoint_files):
    """A fresh webui-shaped model object for `arch` (a test may train on it)."""
    return lambda arch: _webui_model(arch, checkpoint_files)


@pytest.fixture(scope="session")
def shared_webui_models(checkpoint_files):
    """Read-only webui-shaped models, built once per session (tests that use them restore what they touch)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _webui_model(arch, checkpoint_files)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def single_file_backends(checkpoint_files):
    """Read-only DiffusersBackends loaded from the tiny single files, once per session (needs diffusers)."""
    pytest.importorskip("diffusers")
    from lib_lora.backends import DiffusersBackend

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = DiffusersBackend.from_single_file(checkpoint_files[arch])
        return cache[arch]

    return get

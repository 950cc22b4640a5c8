"""Session-scoped tiny checkpoints in the webui's key format, written once as .safetensors."""

from __future__ import annotations

import pytest

from tests.merge.lora_files import save_checkpoint


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """{arch: (path, state_dict)} for sd1, sd2, sdxl (fp32, the webui's real key prefixes)."""
    from tests.fixtures.ldm_models import ldm_checkpoint_state_dict

    folder = tmp_path_factory.mktemp("ckpts")
    out = {}
    for arch in ("sd1", "sd2", "sdxl"):
        sd = ldm_checkpoint_state_dict(arch)
        out[arch] = (save_checkpoint(folder / f"{arch}.safetensors", sd, {"modelspec.title": f"base-{arch}"}), sd)
    return out

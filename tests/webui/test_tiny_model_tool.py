"""tools/make_tiny_checkpoint.py without a webui: the SD2 checkpoint carries the key names and shapes the webui
detects and loads, its yaml builds the real ldm model that takes every tensor, and the result computes finite,
non-trivial outputs. (SDXL needs sgm, which only the webui's repositories hold: the webui tests cover it.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "make_tiny_checkpoint.py"


def _tool_module():
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Path:
    pytest.importorskip("ldm")
    pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("tiny-sd2")
    out = folder / "tiny-sd2.safetensors"
    done = subprocess.run([sys.executable, str(TOOL), "--arch", "sd2", "--out", str(out),
                           "--open-clip-config-dir", str(folder / "open_clip_configs")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sd2_checkpoint_has_what_the_webui_detects(sd2):
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    tool = _tool_module()
    state = load_file(str(sd2))
    # the webui's SD2 probe key (fused q/k/v of OpenCLIP), linear proj_in (use_linear_in_transformer), no CLIP-L
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    blocks = {k.split(".")[4] for k in state if ".resblocks." in k}
    assert len(blocks) == tool.OPEN_CLIP_LAYERS
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    assert all(torch.count_nonzero(v) == v.numel() for v in floats.values()), "every weight random and non-zero"
    ln = state["cond_stage_model.model.ln_final.weight"]
    assert 0.5 < float(ln.mean()) < 1.5 and float(ln.std()) > 0.01  # norms 1 + noise, not all-ones
    cfg = OmegaConf.load(str(sd2.with_suffix(".yaml")))
    assert cfg.model.params.parameterization == "v"
    assert cfg.model.params.unet_config.params.use_linear_in_transformer is True
    cond = cfg.model.params.cond_stage_config
    assert cond.target == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    assert (cond.params.arch, cond.params.version, cond.params.layer) == (tool.OPEN_CLIP_ARCH, None, "penultimate")
    name = f"{tool.OPEN_CLIP_ARCH}.json"
    installed = sd2.parent / "open_clip_configs" / name
    assert json.loads(installed.read_text()) == tool.open_clip_config()
    assert installed.read_text() == (sd2.parent / "tiny-sd2-clip" / name).read_text()


def test_eps_and_sd1_yaml_choices():
    pytest.importorskip("omegaconf")
    tool = _tool_module()
    assert "parameterization" not in tool.yaml_text(Path("clip"), "sd2", "eps")
    assert "parameterization: v" in tool.yaml_text(Path("clip"), "sd1", "v")
    sdxl = tool.yaml_text(Path("/x/tiny-sdxl-clip"), "sdxl", "v")
    assert "denoiser_scaling.VScaling" in sdxl and "version: /x/tiny-sdxl-clip" in sdxl
    assert "adm_in_channels: 80" in sdxl and f"arch: {tool.OPEN_CLIP_ARCH}" in sdxl


def test_sd2_yaml_builds_the_ldm_model_that_takes_every_tensor(sd2):
    """What the webui does at load: instantiate the yaml's LatentDiffusion, load the state dict; then encode a prompt
    and predict, which must be finite and depend on the prompt."""
    pytest.importorskip("pytorch_lightning")  # ldm.models.diffusion.ddpm needs it (the webui stack has it)
    import open_clip
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    tool = _tool_module()
    if tool.OPEN_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(sd2.parent / "tiny-sd2-clip" / f"{tool.OPEN_CLIP_ARCH}.json")
    cfg = OmegaConf.load(str(sd2.with_suffix(".yaml")))
    model = instantiate_from_config(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(str(sd2)), strict=False)
    assert not unexpected
    params = {name for name, _ in model.named_parameters()}
    assert not params & set(missing), sorted(params & set(missing))[:5]
    model.eval()
    model.cond_stage_model.device = "cpu"
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        outs = [model.apply_model(x, t, model.get_learned_conditioning([p])) for p in ("a red cat", "a blue dog")]
    assert all(torch.isfinite(o).all() for o in outs)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-3

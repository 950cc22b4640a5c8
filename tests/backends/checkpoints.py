"""Tiny single-file checkpoints (webui key names, from tests/fixtures/ldm_models.py) with their same-name .yaml.

The yaml is what the webui would read beside such a file: real ldm / sgm targets, tiny sizes, and a text encoder
`version` that names a local folder (no download). The same dict builds the real ldm LatentDiffusion in tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures import ldm_models as L

_DD = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
       "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
_UNET = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 1,
         "channel_mult": [1, 2], "num_head_channels": 8, "use_spatial_transformer": True, "legacy": False}


def clip_folder(seed: int = 1) -> str:
    return L._clip_folder("quick_gelu", seed)


def tiny_config(arch: str, parameterization: str = "eps") -> dict:
    """An ldm (SD1/SD2) or sgm (SDXL) model config for the tiny checkpoint of `arch`."""
    first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL",
                   "params": {"embed_dim": 4, "ddconfig": dict(_DD), "lossconfig": {"target": "torch.nn.Identity"}}}
    if arch == "sdxl":
        L._register_openclip_arch()
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
            "scale_factor": 0.13025,
            "denoiser_config": {"params": {"scaling_config": {
                "target": "sgm.modules.diffusionmodules.denoiser_scaling."
                + ("VScaling" if parameterization == "v" else "EpsScaling")}}},
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
                _UNET, adm_in_channels=6 * 8 + L.TEXT_HIDDEN, num_classes="sequential", attention_resolutions=[2],
                use_linear_in_transformer=True, transformer_depth=2, context_dim=2 * L.TEXT_HIDDEN)},
            "conditioner_config": {"params": {"emb_models": [
                {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                 "params": {"layer": "hidden", "layer_idx": -2, "version": clip_folder(3)}},
                {"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": L.OPENCLIP_ARCH, "version": None, "layer": "penultimate",
                            "always_return_pooled": True, "legacy": False}},
                *({"is_trainable": False, "input_key": key,
                   "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 8}}
                  for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"))]}},
            "first_stage_config": first_stage}}}
    if arch == "sd1":
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": clip_folder(1), "device": "cpu"}}
        unet = dict(_UNET, attention_resolutions=[1], transformer_depth=1, context_dim=L.TEXT_HIDDEN)
    else:
        L._register_openclip_arch()
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": L.OPENCLIP_ARCH, "version": None, "device": "cpu", "freeze": True,
                           "layer": "penultimate"}}
        unet = dict(_UNET, attention_resolutions=[1], transformer_depth=1, context_dim=L.TEXT_HIDDEN,
                    use_linear_in_transformer=True)
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
        "parameterization": parameterization,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": first_stage, "cond_stage_config": cond}}}


def write_checkpoint(arch: str, folder: Path, *, fmt: str = "safetensors", parameterization: str = "eps",
                     yaml: bool = True, name: str | None = None) -> Path:
    """Write `<name>.<fmt>` (+ `<name>.yaml`) for the tiny `arch` model; return the checkpoint path."""
    import yaml as pyyaml

    state = L.ldm_checkpoint_state_dict(arch)
    path = Path(folder) / f"{name or arch}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, str(path))
    if yaml:
        path.with_suffix(".yaml").write_text(pyyaml.safe_dump(tiny_config(arch, parameterization)), encoding="utf-8")
    return path

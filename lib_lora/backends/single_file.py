"""Load a single `.safetensors` / `.ckpt` SD checkpoint as diffusers components, offline, the way the webui reads it.

As in the webui, a `.yaml` with the checkpoint's name beside it (or one given explicitly) describes the model: sizes,
`parameterization: "v"` for v-prediction, the text encoders (`cond_stage_config.params.version` may name a local
folder holding a CLIP config and tokenizer). Without one, the standard SD1 / SD2 / SDXL configs apply (facts from
v1-inference.yaml, v2-inference.yaml, sd_xl_base.yaml). Nothing here may reach the network: every size comes from
the yaml or the tensors, the tokenizer from a local folder or is built from open_clip's BPE file.
`.ckpt` files are read with `torch.load(weights_only=True)` (no pickled code runs).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ..errors import BadInput, IncompatibleFile
from . import convert as C
from .base import check_prediction_type, scaled_linear_alphas_cumprod

_VAE_DD = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
_FIRST_STAGE = {"params": {"embed_dim": 4, "ddconfig": _VAE_DD}}
_SD_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "legacy": False}
DEFAULT_CONFIGS = {
    "sd1": {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": dict(_SD_UNET, num_heads=8, context_dim=768)},
        "first_stage_config": _FIRST_STAGE,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {}}}}},
    "sd2": {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": dict(_SD_UNET, num_head_channels=64, use_linear_in_transformer=True,
                                       context_dim=1024)},
        "first_stage_config": _FIRST_STAGE,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}}}},
    "sdxl": {"model": {"params": {
        "scale_factor": 0.13025,
        "network_config": {"params": {
            "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
            "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
            "context_dim": 2048}},
        "conditioner_config": {"params": {"emb_models": [
            {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": 11}},
            {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": "ViT-bigG-14", "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
            {"input_key": "original_size_as_tuple", "params": {"outdim": 256}},
            {"input_key": "crop_coords_top_left", "params": {"outdim": 256}},
            {"input_key": "target_size_as_tuple", "params": {"outdim": 256}}]}},
        "first_stage_config": _FIRST_STAGE}}},
}


# ---- reading ------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a `.safetensors` or `.ckpt`/`.pt`/`.pth` file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise IncompatibleFile(f"{path.name} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleFile(
            f"{path.name} cannot be read safely ({first[:160]}); convert it to .safetensors") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise IncompatibleFile(f"{path.name} holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def detect_arch(state: dict) -> str:
    """sd1 / sd2 / sdxl from the text-encoder keys; refuses inpainting and refiner checkpoints."""
    unet_in = state.get(C.UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        raise IncompatibleFile("not a Stable Diffusion checkpoint (no model.diffusion_model.input_blocks.0.0.weight)")
    if unet_in.shape[1] != 4:
        raise IncompatibleFile(
            f"a UNet with {unet_in.shape[1]} input channels (inpainting / edit model) cannot be trained here")
    if any(k.startswith("conditioner.embedders.") for k in state):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in state):
            raise IncompatibleFile(
                "an SDXL refiner checkpoint (one OpenCLIP encoder) is not supported; use an SDXL base model")
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in state):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return "sd1"
    raise IncompatibleFile("not an SD 1.x, SD 2.x or SDXL checkpoint (no known text-encoder keys)")


def find_yaml(path: str | os.PathLike) -> Path | None:
    """The webui's rule: `<checkpoint stem>.yaml` beside the checkpoint."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"cannot read the model config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model", {}).get("params"), dict):
        raise BadInput(f"{path} is not an ldm/sgm model config (no model.params)")
    return data


def _get(d, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def prediction_of(params: dict, state: dict, metadata: dict, given: str | None) -> str:
    """Given > yaml (`parameterization: v`, sgm VScaling) > a `v_pred` key in the file > ModelSpec > epsilon."""
    if given:
        return check_prediction_type(given)
    if params.get("parameterization"):
        return check_prediction_type(str(params["parameterization"]))
    scaling = str(_get(params, "denoiser_config", "params", "scaling_config", "target", default=""))
    if scaling.endswith("VScaling"):
        return "v_prediction"
    if "v_pred" in state:
        return "v_prediction"
    spec = str(metadata.get("modelspec.prediction_type", "")).lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    return "epsilon"


def schedule_of(params: dict) -> torch.Tensor:
    disc = _get(params, "denoiser_config", "params", "discretization_config", "params", default={})
    start = float(params.get("linear_start", disc.get("linear_start", 0.00085)))
    end = float(params.get("linear_end", disc.get("linear_end", 0.012)))
    steps = int(params.get("timesteps", disc.get("num_timesteps", 1000)))
    if steps != 1000:
        raise IncompatibleFile(f"a {steps}-step noise schedule is not supported (SD uses 1000)")
    return scaled_linear_alphas_cumprod(start, end, steps)


# ---- configs ------------------------------------------------------------------------------------------------------
def unet_config_from_ldm(p: dict, arch: str, size_embed_dim: int = 256) -> dict:
    """diffusers UNet2DConditionModel config from ldm/sgm UNet params (heads per level from num_head_channels)."""
    mult = list(p["channel_mult"])
    att = set(p.get("attention_resolutions") or [])
    channels = [p["model_channels"] * m for m in mult]
    down, up, res = [], [], 1
    for i in range(len(mult)):
        down.append("CrossAttnDownBlock2D" if res in att else "DownBlock2D")
        if i < len(mult) - 1:
            res *= 2
    for _ in range(len(mult)):
        up.append("CrossAttnUpBlock2D" if res in att else "UpBlock2D")
        res //= 2
    head_channels = p.get("num_head_channels", -1)
    heads = [c // head_channels for c in channels] if head_channels and head_channels > 0 else int(p["num_heads"])
    depth = p.get("transformer_depth", 1)
    context = p.get("context_dim")
    context = context[0] if isinstance(context, (list, tuple)) else context
    config = {
        "sample_size": p.get("image_size", 64), "in_channels": p.get("in_channels", 4),
        "out_channels": p.get("out_channels", 4), "down_block_types": down, "up_block_types": up,
        "block_out_channels": channels, "layers_per_block": p["num_res_blocks"], "cross_attention_dim": context,
        "attention_head_dim": heads, "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple)) else int(depth),
        "upcast_attention": arch == "sd2",
    }
    if arch == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=size_embed_dim,
                      projection_class_embeddings_input_dim=p["adm_in_channels"])
    return config


def vae_config_from_ldm(dd: dict, scale_factor: float) -> dict:
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    return {"in_channels": dd.get("in_channels", 3), "out_channels": dd.get("out_ch", 3),
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels), "block_out_channels": channels,
            "layers_per_block": dd["num_res_blocks"], "latent_channels": dd.get("z_channels", 4),
            "sample_size": dd.get("resolution", 256), "scaling_factor": scale_factor}


# ---- building -----------------------------------------------------------------------------------------------------
def _on_meta(factory):
    with torch.device("meta"):
        return factory()


def _build_unet(state: dict, unet_params: dict, arch: str, size_dim: int, dtype):
    from diffusers import UNet2DConditionModel

    from ..network.unet_names import UNetLayout

    config = unet_config_from_ldm(unet_params, arch, size_dim)
    unet = _on_meta(lambda: UNet2DConditionModel(**config))
    weights = C.unet_to_diffusers(C.take(state, C.UNET_PREFIX), UNetLayout.from_diffusers_config(config))
    C.load_exact(unet, weights, "UNet")
    return _cast(unet, dtype)


def _build_vae(state: dict, params: dict, vae_dtype):
    from diffusers import AutoencoderKL

    dd = _get(params, "first_stage_config", "params", "ddconfig") or _VAE_DD
    config = vae_config_from_ldm(dd, float(params.get("scale_factor", 0.18215)))
    vae = _on_meta(lambda: AutoencoderKL(**config))
    C.load_exact(vae, C.vae_to_diffusers(C.take(state, "first_stage_model."), len(dd["ch_mult"])), "VAE")
    return _cast(vae, vae_dtype)


def _cast(model, dtype):
    """The requested dtype (default fp32, whatever the file stores), via torch's own .to (diffusers' warns)."""
    return torch.nn.Module.to(model, dtype or torch.float32)


def _local_folder(version) -> Path | None:
    if isinstance(version, str) and version and Path(version).is_dir():
        return Path(version)
    return None


def _tokenizer(folder: Path | None):
    from transformers import CLIPTokenizer

    from ..clip_tokenizer import load_clip_tokenizer

    if folder is not None and (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    return load_clip_tokenizer()


def _hf_clip(hf_state: dict, folder: Path | None, dtype, *, projection: bool = False, act: str = "quick_gelu",
             heads: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if folder is not None and (folder / "config.json").is_file():
        config = CLIPTextConfig.from_pretrained(str(folder))
    else:
        config = C.clip_config_from_state(hf_state, act=act, heads=heads, projection=projection)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = _on_meta(lambda: cls(config))
    C.load_exact(model, C.fit_text_keys(model, hf_state), "text encoder")
    return _cast(model, dtype)


def _openclip_heads(arch_name) -> int | None:
    """Heads of a named open_clip architecture (they cannot be read off the weights); None if unknown."""
    if not arch_name:
        return None
    try:
        import open_clip

        cfg = open_clip.get_model_config(arch_name)
    except Exception:
        return None
    return _get(cfg or {}, "text_cfg", "heads")


def _openclip_as_hf(state: dict, prefix: str, params: dict, dtype, *, keep_last: bool, projection: bool):
    oc = C.take(state, prefix)
    blocks = {int(k.split(".")[2]) for k in oc if k.startswith("transformer.resblocks.")}
    if not blocks:
        raise IncompatibleFile(f"no OpenCLIP text blocks under {prefix}")
    layers = len(blocks) if keep_last else len(blocks) - 1  # SD2 uses the penultimate layer: the last is never run
    hf_state = C.openclip_to_hf(oc, layers, projection)
    return _hf_clip(hf_state, None, dtype, projection=projection, act="gelu",
                    heads=_openclip_heads(params.get("arch", "ViT-bigG-14" if projection else "ViT-H-14")))


def load_single_file(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                     prediction_type: str | None = None, dtype: torch.dtype | None = None,
                     vae_dtype: torch.dtype | None = None) -> dict:
    """Components dict: unet, vae, text_encoder, tokenizer (+ text_encoder_2, tokenizer_2 for SDXL), arch,
    prediction_type, alphas_cumprod, config_path (the yaml used, or None)."""
    state, metadata = read_checkpoint(path)
    arch = detect_arch(state)
    yaml_path = Path(config) if config else find_yaml(path)
    if config and not yaml_path.is_file():
        raise BadInput(f"model config not found: {yaml_path}")
    cfg = read_yaml(yaml_path) if yaml_path else copy.deepcopy(DEFAULT_CONFIGS[arch])
    params = cfg["model"]["params"]
    try:
        return _build_parts(state, metadata, arch, params, yaml_path, prediction_type, dtype, vae_dtype)
    except IncompatibleFile as exc:
        if yaml_path is None:
            raise IncompatibleFile(f"{exc} (no {Path(path).stem}.yaml beside the checkpoint, so the standard {arch} "
                                   "config was assumed)") from None
        raise


def _build_parts(state, metadata, arch, params, yaml_path, prediction_type, dtype, vae_dtype) -> dict:
    parts: dict = {"arch": arch, "config_path": yaml_path,
                   "prediction_type": prediction_of(params, state, metadata, prediction_type),
                   "alphas_cumprod": schedule_of(params)}
    if arch == "sdxl":
        emb = _get(params, "conditioner_config", "params", "emb_models", default=[])
        size_dim = next((int(_get(e, "params", "outdim", default=256)) for e in emb
                         if (e.get("input_key") or "") in ("original_size_as_tuple", "target_size_as_tuple")), 256)
        unet_params = _get(params, "network_config", "params")
        te1_params = _get(emb[0] if emb else {}, "params", default={})
        te2_params = _get(emb[1] if len(emb) > 1 else {}, "params", default={})
        folder = _local_folder(te1_params.get("version"))
        te1 = _hf_clip(C.hf_clip_keys(C.take(state, "conditioner.embedders.0.transformer.")), folder, dtype)
        te2 = _openclip_as_hf(state, "conditioner.embedders.1.model.", te2_params, dtype, keep_last=True,
                              projection=True)
        tokenizer = _tokenizer(folder)
        parts.update(text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer)
    else:
        size_dim = 256
        unet_params = _get(params, "unet_config", "params")
        cond = _get(params, "cond_stage_config", "params", default={})
        folder = _local_folder(cond.get("version"))
        if arch == "sd1":
            te = _hf_clip(C.hf_clip_keys(C.take(state, "cond_stage_model.transformer.")), folder, dtype)
        else:
            te = _openclip_as_hf(state, "cond_stage_model.model.", cond, dtype,
                                 keep_last=cond.get("layer", "penultimate") == "last", projection=False)
        parts.update(text_encoder=te, tokenizer=_tokenizer(folder))
    if not unet_params:
        raise BadInput(f"{yaml_path} has no UNet config (model.params.unet_config / network_config)")
    parts["unet"] = _build_unet(state, unet_params, arch, size_dim, dtype)
    parts["vae"] = _build_vae(state, params, vae_dtype)
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key in parts:
            parts[key].eval().requires_grad_(False)
    return parts

"""Write a tiny random-weight SD1, SD2 or SDXL checkpoint, its same-named `.yaml` and its text-encoder folder.

Why: integration runs against a real webui (and the standalone app) need a model the webui loads like a real one,
offline, that renders 64x64 in about a second on a CPU. Each layout is the real one, shrunk:
- sd1: ldm `LatentDiffusion`; a UNet with two levels and two resnets per level (so the webui's diffusers->compvis
  LoRA name arithmetic still holds), a CLIP text encoder with the real vocabulary and tokenizer but hidden size 32
  and two layers, and a VAE that downsamples by 8.
- sd2: the same UNet with linear proj_in/out (`use_linear_in_transformer`), an OpenCLIP text tower
  (`cond_stage_model.model.*`, fused `in_proj_weight`, 3 blocks, penultimate layer) and v-prediction
  (`parameterization: "v"`; `--prediction eps` for the 512-base kind).
- sdxl: sgm `DiffusionEngine`; a UNet without attention at level 0 and two transformer blocks at level 1 and in
  the middle (SDXL's (F, T, T) pattern cut to two levels), size conditioning through `label_emb`, CLIP-L-like
  `conditioner.embedders.0.transformer.*` (hidden layer = penultimate) and OpenCLIP-bigG-like
  `conditioner.embedders.1.model.*` (penultimate + pooled projection), scale factor 0.13025.

The webui builds OpenCLIP towers by architecture NAME (`open_clip.create_model_and_transforms(arch, ...)`; its
DisableInitialization drops `pretrained`), so the yaml names a tiny architecture, `lora-train-dev-tiny-openclip`,
whose open_clip config JSON this tool writes into the text-encoder folder. The webui's Python must know that name:
`--open-clip-config-dir auto` also writes the JSON into the running Python's `open_clip/model_configs/` (run the
tool with the webui's venv), or give a folder. That is a development-environment step; the extension never does it.
Nothing is downloaded: open_clip's tokenizer is CLIP's BPE, which open_clip ships.

Random weights need two kinds of care, or the webui renders NaN / black images:
- ldm zero-initialises some output layers (UNet `out`, resnet `out_layers`, attention `proj_out`); with those at
  zero the model's output is exactly zero and no LoRA can change it. Every weight here is drawn afresh instead.
- LayerNorm / GroupNorm weights get 1 + noise (not all-ones / zero bias), the text encoder's especially.

Usage (a Python with torch, transformers, open_clip and the `ldm` package for sd1/sd2 (the webui's venv with
`--ldm-path .../repositories/stable-diffusion-stability-ai`, or a venv with stable-diffusion-sdkit); for sdxl the
webui's venv with `--sgm-path .../repositories/generative-models`, which needs pytorch_lightning):

    python tools/make_tiny_checkpoint.py --out /path/to/webui/models/Stable-diffusion/tiny-sd1.safetensors \
        [--arch sd1|sd2|sdxl] [--prediction eps|v] [--ldm-path DIR] [--sgm-path DIR] \
        [--open-clip-config-dir auto|DIR] [--seed 0] [--hf-cache DIR]

It writes `<name>.safetensors`, `<name>.yaml` and `<name>-clip/` (sd1/sdxl: CLIP config.json + tokenizer files, which
the yaml's CLIP `version` points at; sd2/sdxl: `lora-train-dev-tiny-openclip.json`). With `--hf-cache DIR` (sd1)
the CLIP folder is also installed as the Hugging Face cache entry `openai/clip-vit-large-patch14` under DIR (use
with HF_HOME=DIR).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = ("sd1", "sd2", "sdxl")
TEXT_HIDDEN = 32
TEXT_LAYERS = 2
OPEN_CLIP_ARCH = "lora-train-dev-tiny-openclip"
OPEN_CLIP_LAYERS = 3
SIZE_EMBED = 8  # sgm ConcatTimestepEmbedderND outdim per number (SDXL: 256)

UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=2,
    channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=TEXT_HIDDEN, use_checkpoint=False, legacy=False,
)
SD2_UNET = dict(UNET, use_linear_in_transformer=True)
SDXL_UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=2,
    channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True,
    transformer_depth=[1, 2], context_dim=2 * TEXT_HIDDEN, num_classes="sequential",
    adm_in_channels=TEXT_HIDDEN + 6 * SIZE_EMBED, spatial_transformer_attn_type="softmax", use_checkpoint=False,
    legacy=False,
)
VAE_DD = dict(
    double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)


def clip_config() -> dict:
    """A CLIPTextConfig as JSON: CLIP-L's vocabulary and specials, tiny width and depth."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": TEXT_HIDDEN, "intermediate_size": TEXT_HIDDEN * 4, "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": TEXT_HIDDEN,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 1, "torch_dtype": "float32",
    }


def open_clip_config() -> dict:
    """open_clip's model config for the tiny tower: CLIP's vocabulary and context, width 32, 3 blocks (the vision
    tower is required by open_clip's CLIP class; ldm/sgm delete it after building)."""
    return {
        "embed_dim": TEXT_HIDDEN,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_HIDDEN, "heads": 2,
                     "layers": OPEN_CLIP_LAYERS},
    }


def _first_stage(target: str, extra_dd: dict | None = None) -> dict:
    return {"target": target, "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                                         "ddconfig": dict(VAE_DD, **(extra_dd or {})),
                                         "lossconfig": {"target": "torch.nn.Identity"}}}


def _ldm_model(unet: dict, cond_stage: dict, prediction: str) -> dict:
    params = {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": _first_stage("ldm.models.autoencoder.AutoencoderKL"),
        "cond_stage_config": cond_stage,
    }
    if prediction == "v":
        params = {"parameterization": "v", **params}
    return {"base_learning_rate": 1.0e-04, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def _sgm_model(clip_dir: Path, prediction: str) -> dict:
    kind = "V" if prediction == "v" else "Eps"
    size_embedders = [
        {"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
         "params": {"outdim": SIZE_EMBED}}
        for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
    ]
    return {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "scale_factor": 0.13025, "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": 1000,
                    "weighting_config": {"target": f"sgm.modules.diffusionmodules.denoiser_weighting.{kind}Weighting"},
                    "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{kind}Scaling"},
                    "discretization_config": {
                        "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
                },
            },
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": SDXL_UNET},
            "conditioner_config": {
                "target": "sgm.modules.GeneralConditioner",
                "params": {"emb_models": [
                    {"is_trainable": False, "input_key": "txt",
                     "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                     "params": {"version": str(clip_dir), "layer": "hidden", "layer_idx": TEXT_LAYERS - 1}},
                    {"is_trainable": False, "input_key": "txt",
                     "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                     "params": {"arch": OPEN_CLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                                "always_return_pooled": True, "legacy": False}},
                    *size_embedders,
                ]},
            },
            "first_stage_config": _first_stage("sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                               {"attn_type": "vanilla"}),
        },
    }


def yaml_text(clip_dir: Path, arch: str = "sd1", prediction: str = "eps") -> str:
    """The model config in the shape of the webui's own yaml for `arch` (v1-inference, v2-inference(-v),
    sd_xl_base), with the tiny sizes."""
    from omegaconf import OmegaConf

    if arch == "sd1":
        model = _ldm_model(UNET, {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": str(clip_dir)}}, prediction)
    elif arch == "sd2":
        model = _ldm_model(SD2_UNET, {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                      "params": {"arch": OPEN_CLIP_ARCH, "version": None, "freeze": True,
                                                 "layer": "penultimate"}}, prediction)
    else:
        model = _sgm_model(clip_dir, prediction)
    return OmegaConf.to_yaml(OmegaConf.create({"model": model}))


def _randomize(named_tensors, generator) -> dict:
    """Fresh values for every float tensor: fan-in scaled weights, norms around 1, small non-zero biases."""
    import torch

    out = {}
    for name, tensor in named_tensors:
        if not tensor.is_floating_point():
            out[name] = tensor.detach().clone()
            continue
        shape = tuple(tensor.shape)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(part in name for part in ("norm", "ln_", "layer_norm")) or ".in_layers.0." in name \
            or ".out_layers.0." in name or name.endswith(("out.0.weight", "out.0.bias"))
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
            if "token_embedding" in name or "position_embedding" in name:
                value = torch.randn(shape, generator=generator) * 0.3
        elif leaf == "weight" and is_norm:
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        out[name] = value.to(torch.float32)
    return out


def _prefixed(prefix: str, module, generator) -> dict:
    return {f"{prefix}{k}": v for k, v in _randomize(module.state_dict().items(), generator).items()}


def _vae_state(generator, model_module) -> dict:
    import torch

    parts = {
        "encoder": model_module.Encoder(**VAE_DD),
        "decoder": model_module.Decoder(**VAE_DD),
        "quant_conv": torch.nn.Conv2d(2 * VAE_DD["z_channels"], 2 * 4, 1),
        "post_quant_conv": torch.nn.Conv2d(4, VAE_DD["z_channels"], 1),
    }
    state = {}
    for prefix, module in parts.items():
        state.update(_prefixed(f"first_stage_model.{prefix}.", module, generator))
    return state


def _clip_state(prefix: str, generator) -> dict:
    """An HF CLIPTextModel's tensors under `prefix` + `text_model.` (the spelling every checkpoint uses)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in clip_config().items() if k != "architectures"}))
    state = {}
    for name, value in _randomize(text.state_dict().items(), generator).items():
        if not name.startswith("text_model."):  # transformers 5 drops the level every checkpoint has
            name = "text_model." + name
        if name.endswith("position_ids"):
            continue
        state[f"{prefix}{name}"] = value
    state[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return state


def register_open_clip_arch(config_file: Path) -> None:
    """Make `OPEN_CLIP_ARCH` known to the open_clip imported here (the webui needs the file in its own registry)."""
    import open_clip

    open_clip.add_model_config(config_file)
    if OPEN_CLIP_ARCH not in open_clip.list_models():
        raise RuntimeError(f"open_clip did not register {config_file}")


def _open_clip_state(prefix: str, generator) -> dict:
    """An OpenCLIP text tower's tensors (vision tower removed, as ldm/sgm do) under `prefix`."""
    import open_clip

    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None, device="cpu")
    del model.visual
    return _prefixed(prefix, model, generator)


def build_state_dict(seed: int = 0, arch: str = "sd1") -> dict:
    """Return the checkpoint's tensors with the key names the webui's checkpoints of `arch` use. sd2/sdxl need the
    OpenCLIP architecture registered (`register_open_clip_arch`); sdxl needs sgm on the path."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict = {}
    if arch in ("sd1", "sd2"):
        import ldm.modules.diffusionmodules.model as ldm_model
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        state.update(_prefixed("model.diffusion_model.", UNetModel(**(UNET if arch == "sd1" else SD2_UNET)), generator))
        state.update(_vae_state(generator, ldm_model))
        if arch == "sd1":
            state.update(_clip_state("cond_stage_model.transformer.", generator))
        else:
            state.update(_open_clip_state("cond_stage_model.model.", generator))
    else:
        import sgm.modules.diffusionmodules.model as sgm_model
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        state.update(_prefixed("model.diffusion_model.", UNetModel(**SDXL_UNET), generator))
        state.update(_vae_state(generator, sgm_model))
        state.update(_clip_state("conditioner.embedders.0.transformer.", generator))
        state.update(_open_clip_state("conditioner.embedders.1.model.", generator))
    return {k: v.contiguous() for k, v in state.items()}


def write_clip_dir(folder: Path, arch: str = "sd1") -> Path:
    """The text-encoder folder: CLIP config + tokenizer (sd1, sdxl), the OpenCLIP architecture JSON (sd2, sdxl)."""
    from lib_lora.clip_tokenizer import write_tokenizer_files
    from lib_lora.fsutil import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    if arch in ("sd1", "sdxl"):
        write_tokenizer_files(folder)
        atomic_write_text(folder / "config.json", json.dumps(clip_config(), indent=1))
    if arch in ("sd2", "sdxl"):
        atomic_write_text(folder / f"{OPEN_CLIP_ARCH}.json", json.dumps(open_clip_config(), indent=1))
    return folder


def install_open_clip_config(clip_dir: Path, where: str) -> Path:
    """Copy the OpenCLIP architecture JSON into an open_clip `model_configs` folder ('auto': this Python's)."""
    from lib_lora.fsutil import atomic_write_text

    if where == "auto":
        import open_clip

        folder = Path(open_clip.__file__).resolve().parent / "model_configs"
    else:
        folder = Path(where).resolve()
    target = folder / f"{OPEN_CLIP_ARCH}.json"
    atomic_write_text(target, (clip_dir / f"{OPEN_CLIP_ARCH}.json").read_text())
    return target


def install_hf_cache(clip_dir: Path, hf_home: Path) -> Path:
    """Copy the CLIP folder into `<hf_home>/hub` as the snapshot of `openai/clip-vit-large-patch14`."""
    import shutil

    repo = hf_home / "hub" / "models--openai--clip-vit-large-patch14"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in clip_dir.iterdir():
        shutil.copyfile(item, snapshot / item.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint path ending in .safetensors")
    parser.add_argument("--arch", choices=ARCHS, default="sd1")
    parser.add_argument("--prediction", choices=("eps", "v"),
                        help="eps or v (v-prediction); default v for sd2, eps for sd1 and sdxl")
    parser.add_argument("--ldm-path", help="folder holding the `ldm` package (the webui's stablediffusion repository)")
    parser.add_argument("--sgm-path", help="folder holding the `sgm` package (the webui's generative-models repo)")
    parser.add_argument("--open-clip-config-dir", metavar="auto|DIR",
                        help="sd2/sdxl: also write the tiny OpenCLIP architecture JSON into this open_clip "
                             "model_configs folder ('auto': this Python's open_clip; run with the webui's venv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-cache", help="also install the CLIP folder as openai/clip-vit-large-patch14 here")
    args = parser.parse_args(argv)
    for path in (args.sgm_path, args.ldm_path):
        if path:
            sys.path.insert(0, str(Path(path).resolve()))
    prediction = args.prediction or ("v" if args.arch == "sd2" else "eps")
    out = Path(args.out).resolve()
    if out.suffix != ".safetensors":
        parser.error("--out must end in .safetensors")
    if args.open_clip_config_dir and args.arch == "sd1":
        parser.error("--open-clip-config-dir is for sd2 / sdxl (SD1 has no OpenCLIP text encoder)")
    if args.hf_cache and args.arch == "sd2":
        parser.error("--hf-cache is for the CLIP folder of sd1 / sdxl")
    from safetensors.torch import save_file

    from lib_lora.fsutil import atomic_write_text

    clip_dir = write_clip_dir(out.with_name(out.stem + "-clip"), args.arch)
    installed = None
    if args.arch != "sd1":
        register_open_clip_arch(clip_dir / f"{OPEN_CLIP_ARCH}.json")
        if args.open_clip_config_dir:
            installed = install_open_clip_config(clip_dir, args.open_clip_config_dir)
    atomic_write_text(out.with_suffix(".yaml"), yaml_text(clip_dir, args.arch, prediction))
    state = build_state_dict(args.seed, args.arch)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)
    if args.hf_cache:
        install_hf_cache(clip_dir, Path(args.hf_cache).resolve())
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({args.arch}, {prediction}, {params / 1e6:.2f} M values), {out.with_suffix('.yaml')}, "
          f"{clip_dir}")
    if installed:
        print(f"installed the OpenCLIP architecture {OPEN_CLIP_ARCH!r} as {installed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

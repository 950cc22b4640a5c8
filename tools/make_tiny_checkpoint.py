"""Write a tiny random-weight SD1-layout checkpoint, its same-named `.yaml` and a tiny CLIP folder.

Why: integration runs against a real webui (and the standalone app) need a model the webui loads like a real one,
offline, that renders 64x64 in about a second on a CPU. The layout is SD1's, shrunk: a UNet with two levels and
two resnets per level (so the webui's diffusers->compvis LoRA name arithmetic still holds), a CLIP text encoder
with the real vocabulary and tokenizer but hidden size 32 and two layers, and a VAE that downsamples by 8.

Random weights need two kinds of care, or the webui renders NaN / black images:
- ldm zero-initialises some output layers (UNet `out`, resnet `out_layers`, attention `proj_out`); with those at
  zero the model's output is exactly zero and no LoRA can change it. Every weight here is drawn afresh instead.
- LayerNorm / GroupNorm weights get 1 + noise (not all-ones / zero bias), the text encoder's especially.

Usage (any Python with torch, transformers and the `ldm` package: the webui's venv with
`repositories/stable-diffusion-stability-ai` on the path, or a venv with stable-diffusion-sdkit):

    python tools/make_tiny_checkpoint.py --out /path/to/webui/models/Stable-diffusion/tiny-sd1.safetensors \
        [--ldm-path /path/to/webui/repositories/stable-diffusion-stability-ai] [--seed 0]

It writes `tiny-sd1.safetensors`, `tiny-sd1.yaml` (its `cond_stage_config.params.version` points at the CLIP
folder) and `tiny-sd1-clip/` (config.json + tokenizer files). With `--hf-cache DIR` the CLIP folder is also
installed as the Hugging Face cache entry `openai/clip-vit-large-patch14` under DIR (use with HF_HOME=DIR).
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

TEXT_HIDDEN = 32
TEXT_LAYERS = 2

UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=2,
    channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=TEXT_HIDDEN, use_checkpoint=False, legacy=False,
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


def yaml_text(clip_dir: Path) -> str:
    """The model config in the v1-inference.yaml shape, with the tiny sizes."""
    from omegaconf import OmegaConf

    cfg = {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
                "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
                "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": VAE_DD,
                               "lossconfig": {"target": "torch.nn.Identity"}},
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": str(clip_dir)},
                },
            },
        }
    }
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


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


def build_state_dict(seed: int = 0) -> dict:
    """Return the checkpoint's tensors with the key names the webui's SD1 checkpoints use."""
    import torch
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    state: dict = {}
    unet = UNetModel(**UNET)
    state.update({f"model.diffusion_model.{k}": v for k, v in _randomize(unet.state_dict().items(), generator).items()})

    vae_parts = {
        "encoder": Encoder(**VAE_DD),
        "decoder": Decoder(**VAE_DD),
        "quant_conv": torch.nn.Conv2d(2 * VAE_DD["z_channels"], 2 * 4, 1),
        "post_quant_conv": torch.nn.Conv2d(4, VAE_DD["z_channels"], 1),
    }
    for prefix, module in vae_parts.items():
        tensors = _randomize(module.state_dict().items(), generator)
        state.update({f"first_stage_model.{prefix}.{k}": v for k, v in tensors.items()})

    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in clip_config().items() if k != "architectures"}))
    for name, value in _randomize(text.state_dict().items(), generator).items():
        if not name.startswith("text_model."):  # transformers 5 drops the level every checkpoint has
            name = "text_model." + name
        if name.endswith("position_ids"):
            continue
        state[f"cond_stage_model.transformer.{name}"] = value
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return {k: v.contiguous() for k, v in state.items()}


def write_clip_dir(folder: Path) -> Path:
    from lib_lora.clip_tokenizer import write_tokenizer_files
    from lib_lora.fsutil import atomic_write_text

    write_tokenizer_files(folder)
    atomic_write_text(folder / "config.json", json.dumps(clip_config(), indent=1))
    return folder


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
    parser.add_argument("--ldm-path", help="folder holding the `ldm` package (the webui's stablediffusion repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-cache", help="also install the CLIP folder as openai/clip-vit-large-patch14 here")
    args = parser.parse_args(argv)
    if args.ldm_path:
        sys.path.insert(0, str(Path(args.ldm_path).resolve()))
    from safetensors.torch import save_file

    from lib_lora.fsutil import atomic_write_text

    out = Path(args.out).resolve()
    if out.suffix != ".safetensors":
        parser.error("--out must end in .safetensors")
    clip_dir = write_clip_dir(out.with_name(out.stem + "-clip"))
    atomic_write_text(out.with_suffix(".yaml"), yaml_text(clip_dir))
    state = build_state_dict(args.seed)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)
    if args.hf_cache:
        install_hf_cache(clip_dir, Path(args.hf_cache).resolve())
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({params / 1e6:.2f} M values), {out.with_suffix('.yaml')}, {clip_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

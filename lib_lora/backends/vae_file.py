"""A separate VAE (`--vae`) for DiffusersBackend: a single file in ldm names (SD1's vae-ft-mse-840000-ema-pruned, the
webui's models/VAE files; `.safetensors`, or `.ckpt` / `.pt` read with weights_only), a whole checkpoint (its
`first_stage_model.` part), a diffusers AutoencoderKL folder, or a diffusers model folder (its `vae/`).

The sizes come from the tensors (ldm VAEs normalise in 32 groups, a fixed choice of ldm's); the latent scale stays
the model's, since it belongs to the UNet's training, not to the file. A VAE that does not give the model's latent
shape (channels, 1/8 scale) is refused: it would train on latents the UNet never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import BadInput, IncompatibleFile
from . import convert as C

_LDM_GROUPS = 32
_SKIP_PREFIXES = ("loss.", "model_ema.")  # training leftovers in original VAE .ckpt files


def vae_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for the latent cache: name, size and hashes of the first and last MiB of each weight file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                                                  (".safetensors", ".bin", ".json", ".ckpt", ".pt"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def ldm_vae_config(state: dict, name: str) -> dict:
    """diffusers AutoencoderKL config from ldm VAE tensors; IncompatibleFile when they are not a VAE."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight"):
        if key not in state:
            raise IncompatibleFile(f"{name} is not a VAE (no {key}); give a VAE file such as "
                                   "vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers AutoencoderKL folder")
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise IncompatibleFile(f"{name} is not a VAE in ldm names (no encoder.down.N.block.M)")
    channels = []
    for level in levels:
        w = state.get(f"encoder.down.{level}.block.0.conv2.weight")
        if w is None:
            raise IncompatibleFile(f"{name} is not a complete VAE (no encoder.down.{level}.block.0.conv2.weight)")
        channels.append(int(w.shape[0]))
    if any(c % _LDM_GROUPS for c in channels):
        raise IncompatibleFile(f"{name}: VAE widths {channels} are not multiples of 32 (ldm's group norm)")
    return {"in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "block_out_channels": channels, "layers_per_block": len(blocks),
            "latent_channels": int(state["decoder.conv_in.weight"].shape[1]), "norm_num_groups": _LDM_GROUPS}


def _vae_state(state: dict, name: str) -> dict:
    """The VAE's own tensors in ldm names: a whole checkpoint's `first_stage_model.` part; diffusers names converted."""
    if any(k.startswith("first_stage_model.") for k in state):
        state = C.take(state, "first_stage_model.")
    state = {k: v for k, v in state.items() if not k.startswith(_SKIP_PREFIXES)}
    if any(k.startswith("encoder.down_blocks.") for k in state):  # a diffusers AutoencoderKL saved as one file
        levels = len({int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        try:
            state = C.vae_to_ldm(state, levels)
        except IncompatibleFile as exc:
            raise IncompatibleFile(f"{name} is not a VAE: {exc}") from None
    return state


def _from_file(path: Path, dtype) -> "torch.nn.Module":
    from diffusers import AutoencoderKL

    from .single_file import read_checkpoint

    state, _ = read_checkpoint(path)
    state = _vae_state(state, path.name)
    config = ldm_vae_config(state, path.name)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    try:
        weights = C.vae_to_diffusers(state, len(config["block_out_channels"]))
        C.load_exact(vae, weights, "VAE")
    except IncompatibleFile as exc:
        raise IncompatibleFile(f"{path.name}: {str(exc).replace('the checkpoint', 'the file')}") from None
    return torch.nn.Module.to(vae, dtype)


def _from_folder(path: Path, dtype):
    from diffusers import AutoencoderKL

    sub = {}
    if not (path / "config.json").is_file():
        if (path / "vae" / "config.json").is_file():
            sub = {"subfolder": "vae"}
        else:
            raise BadInput(f"VAE folder {path.name} has no config.json (nor vae/config.json): not a diffusers AutoencoderKL")
    config_file = path / sub.get("subfolder", "") / "config.json"
    try:
        kind = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind not in (None, "AutoencoderKL"):
        raise IncompatibleFile(f"{path.name} is not a VAE folder: its config.json is for {kind}, not AutoencoderKL")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, **sub)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise IncompatibleFile(f"cannot load the VAE in {path.name}: {str(exc).strip().splitlines()[0]}") from None
    return torch.nn.Module.to(vae, dtype)


def precheck_vae(path: str | os.PathLike) -> None:
    """Before the model loads (minutes for a real one): the path exists, and a .safetensors file's header names VAE
    tensors. The full check (sizes) is load_vae's."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"VAE not found: {p}")
    if p.is_file() and p.suffix.lower() == ".safetensors":
        from ..safetensors_header import parse_header

        with open(p, "rb") as fh:
            keys = parse_header(fh, p.name).entries
        if not any(k.removeprefix("first_stage_model.") == "encoder.conv_in.weight" for k in keys):
            raise IncompatibleFile(f"{p.name} is not a VAE (no encoder.conv_in.weight); give a VAE file such as "
                                   "vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers AutoencoderKL folder")
    elif p.is_dir() and not ((p / "config.json").is_file() or (p / "vae" / "config.json").is_file()):
        raise BadInput(f"VAE folder {p.name} has no config.json (nor vae/config.json): not a diffusers AutoencoderKL")


def load_vae(path: str | os.PathLike, *, like) -> "torch.nn.Module":
    """The VAE at `path` as a diffusers AutoencoderKL with the dtype, device and latent scale of `like` (the model's
    own VAE), frozen in eval mode. BadInput / IncompatibleFile with one line for anything that is not such a VAE."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"VAE not found: {p}")
    param = next(like.parameters())
    vae = _from_folder(p, param.dtype) if p.is_dir() else _from_file(p, param.dtype)
    own = like.config
    latent, scale = int(vae.config.latent_channels), 2 ** (len(vae.config.block_out_channels) - 1)
    want_latent, want_scale = int(own.latent_channels), 2 ** (len(own.block_out_channels) - 1)
    if (latent, scale) != (want_latent, want_scale):
        raise IncompatibleFile(f"{p.name} gives {latent} latent channels at 1/{scale} size; the model needs "
                               f"{want_latent} at 1/{want_scale}: not a VAE for this model")
    vae.register_to_config(scaling_factor=float(getattr(own, "scaling_factor", 0.18215)))
    vae.to(param.device)
    return vae.eval().requires_grad_(False)

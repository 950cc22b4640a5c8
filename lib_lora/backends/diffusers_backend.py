"""DiffusersBackend: diffusers UNet + VAE + transformers CLIP text encoders, for the CLI, standalone app and tests.

Loads a diffusers folder (`model_index.json`) or a single `.safetensors` / `.ckpt` file (single_file.py), strictly
offline for single files. Text is encoded the webui's way (text.py) so a LoRA trained here behaves in the webui as
one trained there. Only this module (and single_file.py) import diffusers; the webui path never does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import BadInput, IncompatibleFile
from . import text as T
from .base import (
    Backend,
    Cond,
    check_arch,
    check_prediction_type,
    default_size_ids,
    gaussian_like,
    module_device,
    module_dtype,
    scaled_linear_alphas_cumprod,
)

_DTYPES = {None: None, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise BadInput(f"unknown weight dtype {dtype!r}: use fp32, fp16 or bf16")
    return _DTYPES[dtype]


def detect_arch(unet, text_encoder, text_encoder_2=None) -> str:
    """sdxl: two text encoders / size conditioning; sd2: 1024-wide context or an OpenCLIP-style (gelu) encoder."""
    cfg = unet.config
    if text_encoder_2 is not None or getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    cross = cfg.cross_attention_dim
    if cross == 1024:
        return "sd2"
    if cross == 768:
        return "sd1"
    return "sd2" if getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def schedule_from_config(cfg: dict) -> torch.Tensor:
    """alphas_cumprod from a diffusers scheduler config (scaled_linear or linear betas)."""
    steps = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return scaled_linear_alphas_cumprod(start, end, steps)
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, 0).to(torch.float32)
    raise IncompatibleFile(f"unsupported beta_schedule {kind!r} in the scheduler config")


class DiffusersBackend(Backend):
    """Backend over diffusers / transformers components (which it owns, or borrows and hands back restored)."""

    def __init__(self, unet, vae, text_encoder, tokenizer=None, text_encoder_2=None, tokenizer_2=None, *,
                 arch: str | None = None, prediction_type: str | None = None,
                 alphas_cumprod: torch.Tensor | None = None, scheduler=None,
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        if tokenizer is None:
            from ..clip_tokenizer import load_clip_tokenizer

            tokenizer = load_clip_tokenizer()
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2 or tokenizer
        self.arch = check_arch(arch or detect_arch(unet, text_encoder, text_encoder_2))
        sched_cfg = dict(getattr(scheduler, "config", None) or {})
        self.prediction_type = check_prediction_type(prediction_type or sched_cfg.get("prediction_type") or "epsilon")
        schedule = alphas_cumprod if alphas_cumprod is not None else (
            schedule_from_config(sched_cfg) if sched_cfg else scaled_linear_alphas_cumprod())
        if schedule.shape != (1000,):
            raise IncompatibleFile(f"expected a 1000-step noise schedule, got {tuple(schedule.shape)}")
        self._alphas = schedule.detach().to(torch.float32).cpu()
        self.device = module_device(unet)
        if device is not None:
            self.device = torch.device(device)
            for module in self._roots():
                module.to(self.device)
        if self.arch == "sdxl":
            self.text_encoders = {"te1": text_encoder, "te2": text_encoder_2}
        else:
            self.text_encoders = {"te": text_encoder}
        if self.arch == "sdxl" and text_encoder_2 is None:
            raise IncompatibleFile("an SDXL model needs two text encoders; text_encoder_2 is missing")

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device=None, dtype=None, vae_dtype=None,
                        prediction_type: str | None = None) -> "DiffusersBackend":
        """Load a diffusers folder (what `--pretrained_model_name_or_path` names), from local files only."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(folder)
        index_file = root / "model_index.json"
        if not index_file.is_file():
            raise BadInput(f"not a diffusers model folder (no model_index.json): {root}")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise IncompatibleFile(f"unreadable model_index.json in {root}: {exc}") from None
        dtype, vae_dtype = parse_dtype(dtype), parse_dtype(vae_dtype)
        kw = dict(local_files_only=True)
        try:
            unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=dtype, **kw)
            vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=vae_dtype, **kw)
            te = CLIPTextModel.from_pretrained(str(root / "text_encoder"), torch_dtype=dtype, **kw)
            te2 = None
            if "text_encoder_2" in index and (root / "text_encoder_2").is_dir():
                te2 = CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder_2"), torch_dtype=dtype, **kw)
        except (OSError, ValueError) as exc:
            raise IncompatibleFile(f"cannot load the diffusers model in {root}: {str(exc).splitlines()[0]}") from None
        tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(str(root / name)) if (root / name).is_dir() else None
                                  for name in ("tokenizer", "tokenizer_2"))
        sched_cfg = {}
        sched_file = root / "scheduler" / "scheduler_config.json"
        if sched_file.is_file():
            sched_cfg = json.loads(sched_file.read_text(encoding="utf-8"))
        for module in (unet, vae, te, te2):
            if module is not None:
                module.eval().requires_grad_(False)
        backend = cls(unet, vae, te, tokenizer, te2, tokenizer_2,
                      prediction_type=prediction_type or sched_cfg.get("prediction_type"),
                      alphas_cumprod=schedule_from_config(sched_cfg) if sched_cfg else None, device=device)
        return backend

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, config: str | os.PathLike | None = None, device=None,
                         dtype=None, vae_dtype=None, prediction_type: str | None = None) -> "DiffusersBackend":
        """Load a `.safetensors` / `.ckpt` checkpoint (+ its same-name `.yaml` when present), offline."""
        from .single_file import load_single_file

        parts = load_single_file(path, config=config, prediction_type=prediction_type, dtype=parse_dtype(dtype),
                                 vae_dtype=parse_dtype(vae_dtype))
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts.get("text_encoder_2"),
                   parts.get("tokenizer_2"), arch=parts["arch"], prediction_type=parts["prediction_type"],
                   alphas_cumprod=parts["alphas_cumprod"], device=device)

    @classmethod
    def load(cls, path: str | os.PathLike, *, vae: str | os.PathLike | None = None, **kwargs) -> "DiffusersBackend":
        """A diffusers folder or a single checkpoint file, whichever `path` is; `vae` = a separate VAE (use_vae)."""
        p = Path(path)
        if vae:  # before minutes of model loading
            from .vae_file import precheck_vae

            precheck_vae(vae)
        if p.is_dir():
            kwargs.pop("config", None)
            backend = cls.from_pretrained(p, **kwargs)
        elif p.is_file():
            backend = cls.from_single_file(p, **kwargs)
        else:
            raise BadInput(f"model not found: {p}")
        if vae:
            backend.use_vae(vae)
        return backend

    def use_vae(self, path: str | os.PathLike) -> None:
        """Replace the model's VAE by the one at `path` (vae_file.py: ldm-named file, whole checkpoint or diffusers
        folder), in the dtype and on the device of the model's own, with the model's latent scale. Latents and
        previews then use it; `vae_id` changes so cached latents of the other VAE are not reused."""
        from .vae_file import load_vae, vae_fingerprint

        self.vae = load_vae(path, like=self.vae)
        self.vae_name = Path(path).name
        self._vae_id = f"{self.arch}:vae:{vae_fingerprint(path)}"

    # ---- facts ------------------------------------------------------------------------------------------------
    vae_name: str | None = None  # the separate VAE's file or folder name (use_vae), else None
    _vae_id: str | None = None

    @property
    def vae_id(self) -> str:
        """Names the VAE for the latent cache: the arch for the model's own, plus a fingerprint for a separate one."""
        return self._vae_id or self.arch

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self._alphas.device != self.device:
            self._alphas = self._alphas.to(self.device)
        return self._alphas

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    # ---- work -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels, *, sample=True, generator=None):
        with self._module_on_device(self.vae):
            x = pixels.to(self.device, module_dtype(self.vae))
            dist = self.vae.encode(x).latent_dist
            z = dist.mean + dist.std * gaussian_like(dist.mean, generator) if sample else dist.mean
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents):
        with self._module_on_device(self.vae):
            z = latents.to(self.device, module_dtype(self.vae)) / self.scaling_factor
            pixels = self.vae.decode(z).sample
        return pixels.float().clamp(-1, 1)

    def _encode_chunks(self, ids, clip_skip):
        if self.arch != "sdxl":
            pad = 0 if self.arch == "sd2" else T.EOS_ID  # SD2's encoder is OpenCLIP: pads with 0
            return T.encode_hf_clip(self.text_encoder, ids(pad), clip_skip=clip_skip), None
        # SDXL: CLIP-L hidden layer -2 (no final norm) ++ OpenCLIP-bigG penultimate; pooled from chunk 0
        states1 = T.encode_hf_clip(self.text_encoder, ids(T.EOS_ID), hidden_index=-2)
        states2, pooled = T.encode_hf_clip(self.text_encoder_2, ids(0), hidden_index=-2, pooled=True)
        return torch.cat([states1.float(), states2.float()], dim=-1), pooled

    def predict(self, noisy, timesteps, cond: Cond):
        noisy = noisy.to(self.device)
        timesteps = timesteps.to(self.device)
        in_dtype = torch.float32 if self.compute_dtype is not None else module_dtype(self.unet)
        kwargs = {}
        if self.arch == "sdxl":
            if cond.pooled is None:
                raise BadInput("SDXL conditioning needs the pooled text embedding; encode it with this backend")
            time_ids = cond.time_ids if cond.time_ids is not None else default_size_ids(noisy, self.vae_scale)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.device, in_dtype),
                                           "time_ids": time_ids.to(self.device, in_dtype)}
        with self.autocast():
            context = cond.crossattn.to(self.device, in_dtype)
            out = self.unet(noisy.to(in_dtype), timesteps, encoder_hidden_states=context, **kwargs).sample
        return out.float()

    # ---- training state ---------------------------------------------------------------------------------------
    def _roots(self):
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def _vae_module(self):
        return self.vae

    def _text_modules(self):
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def _checkpoint_modules(self, with_text_encoder: bool):
        blocks = list(self.unet.down_blocks) + [self.unet.mid_block] + list(self.unet.up_blocks)
        if with_text_encoder:
            for te in self._text_modules():
                blocks += list(T.hf_text_core(te).encoder.layers)
        return [b for b in blocks if b is not None]

    def _after_restore(self) -> None:
        self.device = module_device(self.unet)

    def components(self) -> dict:
        """The parts, named as a diffusers pipeline names them."""
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.text_encoder_2 is not None:
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return parts

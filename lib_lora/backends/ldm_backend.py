"""LdmBackend: the webui's own model object (`shared.sd_model`) seen through the Backend contract, weights untouched.

SD1/SD2 are ldm `LatentDiffusion`, SDXL is sgm `DiffusionEngine` (webui-api.md section 3). The webui's hijack wraps
the text embedders (`.wrapped` holds the ldm/sgm embedder); we read through it. Text is encoded by calling the
embedders' own transformer modules (never the hijack's prompt parser), so gradients reach text-encoder LoRA and the
captions are read literally. The UNet is called through `sd_model.model` (the ldm DiffusionWrapper / sgm
OpenAIWrapper), not `diffusion_model` directly, because the webui's medvram hooks sit on that wrapper.
Never imports `modules.*` nor diffusers: this runs inside the webui on its pinned stack.
"""

from __future__ import annotations

import torch

from ..errors import BadInput, IncompatibleFile
from . import text as T
from .base import (
    SIZE_KEYS,
    Backend,
    Cond,
    check_prediction_type,
    default_size_ids,
    gaussian_like,
    module_device,
    module_dtype,
    scaled_linear_alphas_cumprod,
)


def unwrap(module):
    """The ldm/sgm embedder inside a webui hijack wrapper (or the module itself)."""
    return getattr(module, "wrapped", module)


def is_hf_embedder(emb) -> bool:
    return hasattr(emb, "transformer") and hasattr(emb, "tokenizer")


def is_open_clip_embedder(emb) -> bool:
    return hasattr(getattr(getattr(emb, "model", None), "transformer", None), "resblocks")


class LdmBackend(Backend):
    """Backend over an ldm LatentDiffusion (SD1/SD2) or sgm DiffusionEngine (SDXL), as the webui holds it."""

    def __init__(self, sd_model, *, device: str | torch.device | None = None,
                 prediction_type: str | None = None) -> None:
        super().__init__()
        self.model = sd_model
        if getattr(sd_model, "is_sd3", False):
            raise IncompatibleFile("SD3 models cannot be trained here (SD 1.x, 2.x and SDXL only)")
        self.is_sgm = hasattr(sd_model, "conditioner")
        wrapper = getattr(sd_model, "model", None)
        self.unet = getattr(wrapper, "diffusion_model", None)
        if self.unet is None:
            raise IncompatibleFile("the loaded model has no UNet at model.diffusion_model")
        if getattr(wrapper, "conditioning_key", "crossattn") not in ("crossattn", None) and not self.is_sgm:
            raise IncompatibleFile(
                f"{wrapper.conditioning_key!r} conditioning (inpainting / edit models) cannot be trained here")
        in_conv = self.unet.input_blocks[0][0]
        if getattr(in_conv, "in_channels", 4) != 4:
            raise IncompatibleFile(
                f"a UNet with {in_conv.in_channels} input channels (inpainting) cannot be trained here")
        self.first_stage = sd_model.first_stage_model
        if self.is_sgm:
            self._init_sdxl(sd_model.conditioner)
        else:
            self._init_sd(sd_model.cond_stage_model)
        self.prediction_type = check_prediction_type(prediction_type or self._model_prediction())
        self._given_device = torch.device(device) if device is not None else None
        self.device = self._given_device or self._model_device()
        self._alphas_cache: tuple | None = None

    def _model_device(self) -> torch.device:
        """Where the UNet computes. Under the webui's medvram the UNet is parked on the CPU between calls: the webui
        should pass `device=devices.device`; without it, CUDA is assumed when present."""
        here = module_device(self.unet)
        if getattr(self.model, "lowvram", False) and here.type == "cpu" and torch.cuda.is_available():
            return torch.device("cuda")
        return here

    def _init_sd(self, cond_stage) -> None:
        emb = unwrap(cond_stage)
        if is_hf_embedder(emb):
            self.arch, self.te = "sd1", emb
            self.text_encoders = {"te": emb.transformer}
            self.tokenizer = emb.tokenizer
        elif is_open_clip_embedder(emb):
            self.arch, self.te = "sd2", emb
            self.text_encoders = {"te": emb.model}
            self.tokenizer = T.open_clip_tokenizer()
        else:
            raise IncompatibleFile(f"unknown text encoder {type(emb).__name__}: expected CLIP (SD1) or OpenCLIP (SD2)")
        flags = [f for f in ("is_sd1", "is_sd2", "is_sdxl") if getattr(self.model, f, False)]
        if flags and flags != [f"is_{self.arch}"]:
            raise IncompatibleFile(f"the model says {flags[0]} but its text encoder is that of {self.arch}")

    def _init_sdxl(self, conditioner) -> None:
        self.arch = "sdxl"
        self.embedders = list(conditioner.embedders)
        inner = [unwrap(e) for e in self.embedders]
        hf = [e for e in inner if is_hf_embedder(e)]
        oc = [e for e in inner if is_open_clip_embedder(e)]
        if len(hf) != 1 or len(oc) != 1:
            raise IncompatibleFile("only SDXL base models (CLIP-L + OpenCLIP-bigG) can be trained; refiners cannot")
        self.te1, self.te2 = hf[0], oc[0]
        self.text_encoders = {"te1": self.te1.transformer, "te2": self.te2.model}
        self.tokenizer = self.te1.tokenizer
        self._vector_parts: list = []  # in conditioner order: ("pooled", None) or (size index, embedder)
        for outer, emb in zip(self.embedders, inner):
            key = getattr(emb, "input_key", None) or getattr(outer, "input_key", None)
            if emb is self.te2:
                self._vector_parts.append(("pooled", None))
            elif emb is self.te1:
                continue
            elif key in SIZE_KEYS:
                self._vector_parts.append((SIZE_KEYS.index(key), emb))
            else:
                raise IncompatibleFile(f"unsupported SDXL conditioning input {key!r} (refiner or edit model?)")

    def _model_prediction(self) -> str:
        param = getattr(self.model, "parameterization", None)
        if param:
            return "v_prediction" if param == "v" else "epsilon"
        scaling = getattr(getattr(self.model, "denoiser", None), "scaling", None)
        return "v_prediction" if type(scaling).__name__ == "VScaling" else "epsilon"

    # ---- facts ------------------------------------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """`alphas_cumprod_original` when the webui kept one (its live copy may be downcast or zero-terminal-SNR)."""
        ac = getattr(self.model, "alphas_cumprod_original", None)
        if ac is None:
            ac = getattr(self.model, "alphas_cumprod", None)
        if ac is None:
            ac = scaled_linear_alphas_cumprod()  # sgm's LegacyDDPMDiscretization defaults
        key = (id(ac), ac.data_ptr(), self.device)
        if self._alphas_cache is None or self._alphas_cache[0] != key:
            self._alphas_cache = (key, ac.detach().to(self.device, torch.float32))
        return self._alphas_cache[1]

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.model, "scale_factor", 0.13025 if self.arch == "sdxl" else 0.18215))

    # ---- images -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels, *, sample=True, generator=None):
        vae = self.first_stage
        with self._module_on_device(vae):
            x = pixels.to(self.device, module_dtype(vae))
            if hasattr(vae, "encoder") and hasattr(vae, "quant_conv"):
                mean, logvar = vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # ldm's DiagonalGaussianDistribution
                z = mean + std * gaussian_like(mean, generator) if sample else mean
            else:  # an unknown first stage: trust its encode()
                out = vae.encode(x)
                z = (out.sample() if sample else out.mode()) if hasattr(out, "mode") else out
        return (z.float() * self.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents):
        vae = self.first_stage
        with self._module_on_device(vae):
            pixels = vae.decode(latents.to(self.device, module_dtype(vae)) / self.scaling_factor)
        return pixels.float().clamp(-1, 1)

    # ---- text -------------------------------------------------------------------------------------------------
    def _encode_chunks(self, ids, clip_skip):
        if self.arch == "sd1":
            return T.encode_hf_clip(self.te.transformer, ids(T.EOS_ID), clip_skip=clip_skip), None
        if self.arch == "sd2":  # OpenCLIP: penultimate (+ clip skip beyond it) then ln_final, pad 0
            skip = int(getattr(self.te, "layer_idx", 1)) + clip_skip - 1
            return T.encode_open_clip(self.te.model, ids(0), skip_last=skip, final_norm=True), None
        # SDXL: CLIP-L at its configured hidden layer (no final norm) ++ bigG penultimate (no ln_final)
        if getattr(self.te1, "layer", "hidden") == "hidden":
            states1 = T.encode_hf_clip(self.te1.transformer, ids(T.EOS_ID), hidden_index=int(self.te1.layer_idx))
        else:
            states1 = T.encode_hf_clip(self.te1.transformer, ids(T.EOS_ID))
        skip2 = 1 if getattr(self.te2, "layer", "penultimate") == "penultimate" else 0
        states2, pooled = T.encode_open_clip(self.te2.model, ids(0), skip_last=skip2, final_norm=False, pooled=True)
        return torch.cat([states1.float(), states2.float()], dim=-1), pooled

    def sdxl_vector(self, cond: Cond, latents: torch.Tensor | None = None) -> torch.Tensor:
        """sgm's `vector` (the UNet's `y`): pooled text ++ the size embeddings, in the conditioner's order."""
        if cond.pooled is None:
            raise BadInput("SDXL conditioning needs the pooled text embedding; encode it with this backend")
        time_ids = cond.time_ids
        if time_ids is None:
            if latents is None:
                raise BadInput("SDXL size conditioning is missing")
            time_ids = default_size_ids(latents, self.vae_scale)
        time_ids = time_ids.to(self.device, torch.float32)
        parts = []
        for index, embedder in self._vector_parts:
            if index == "pooled":
                parts.append(cond.pooled.to(self.device))
            else:
                parts.append(embedder(time_ids[:, 2 * index: 2 * index + 2]).to(cond.pooled.dtype))
        return torch.cat(parts, dim=1)

    # ---- UNet -------------------------------------------------------------------------------------------------
    def predict(self, noisy, timesteps, cond: Cond):
        x = noisy.to(self.device)
        t = timesteps.to(self.device)
        in_dtype = torch.float32 if self.compute_dtype is not None else module_dtype(self.unet)
        context = cond.crossattn.to(self.device, in_dtype)
        with self.autocast():
            if self.is_sgm:
                vector = self.sdxl_vector(cond, x).to(in_dtype)
                out = self.model.model(x.to(in_dtype), t, {"crossattn": context, "vector": vector})
            else:
                out = self.model.model(x.to(in_dtype), t, c_crossattn=[context])
        if isinstance(out, tuple):
            out = out[0]
        return out.float()

    # ---- training state ---------------------------------------------------------------------------------------
    def _roots(self):
        return [self.model]

    def _vae_module(self):
        return self.first_stage

    def _text_modules(self):
        return [self.te] if not self.is_sgm else [self.te1, self.te2]

    def _checkpoint_modules(self, with_text_encoder: bool):
        blocks = list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks)
        if with_text_encoder:
            for emb in self._text_modules():
                if is_hf_embedder(emb):
                    blocks += list(T.hf_text_core(emb.transformer).encoder.layers)
                else:
                    blocks += list(emb.model.transformer.resblocks)
        return blocks

    def _prepare_extra(self, state, train_text_encoder: bool) -> None:
        # ldm/sgm's own checkpointing (reentrant, or with an explicit parameter list) would starve LoRA of gradients
        for root in [self.unet] + self._text_modules():
            for module in root.modules():
                for flag in ("checkpoint", "use_checkpoint"):
                    if getattr(module, flag, None) is True and flag in module.__dict__:
                        state.set_attr(module, flag, False)
        if self.is_sgm and train_text_encoder:  # sgm runs embedders under no_grad unless is_trainable
            for outer in self.embedders:
                for obj in {id(outer): outer, id(unwrap(outer)): unwrap(outer)}.values():
                    if unwrap(obj) in (self.te1, self.te2) and hasattr(obj, "is_trainable"):
                        state.set_attr(obj, "is_trainable", True)

    def _placement_managed(self) -> bool:
        return bool(getattr(self.model, "lowvram", False))  # the webui's medvram hooks own placement

    def _move_for_training(self, state, device: torch.device) -> None:
        if not self._placement_managed():
            super()._move_for_training(state, device)

    def _after_restore(self) -> None:
        self.device = self._given_device or self._model_device()

"""The Backend contract (docs/architecture.md, docs/backends.md) and what both backends share.

Why one contract: the training loop, the dataset caches, the CLI and the webui tab must not care whether the model is
the webui's ldm/sgm object or a diffusers pipeline loaded from disk. A backend offers exactly what LoRA training needs
(latents, text conditioning, a noise prediction, the modules to attach LoRA to) and promises to hand the model back
exactly as it found it.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import BadInput

ARCHES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@dataclass
class Cond:
    """Text conditioning of one batch.

    `crossattn`: (B, 77*k, D) float32, the cross-attention states (k = number of 75-token chunks).
    `pooled`: SDXL only, (B, P) float32: the second text encoder's projected EOS state.
    `time_ids`: SDXL only, (B, 6) float32: original (h, w), crop (top, left), target (h, w) in pixels; None means
    "derive from the latent size at predict time" (original = target = image size, no crop).
    Kept apart from the size embedding so text outputs can be cached once and the sizes set per batch.
    """

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.crossattn.shape[0])

    def _map(self, fn) -> "Cond":
        return Cond(*(None if t is None else fn(t) for t in (self.crossattn, self.pooled, self.time_ids)))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        return self._map(lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))

    def detach(self) -> "Cond":
        return self._map(lambda t: t.detach())

    def __getitem__(self, index) -> "Cond":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def with_sizes(self, sizes) -> "Cond":
        """The same text conditioning with SDXL size conditioning `sizes` (see `size_ids`)."""
        return replace(self, time_ids=size_ids(sizes, len(self), self.crossattn.device))

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch; every part must have the same token length (same number of chunks)."""
        if not conds:
            raise BadInput("no conditioning to concatenate")
        lengths = {c.crossattn.shape[1] for c in conds}
        if len(lengths) != 1:
            raise BadInput(
                f"text conditionings of different lengths {sorted(lengths)} cannot share a batch: "
                "encode them together or with pad_chunks=True"
            )

        def cat(parts):
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise BadInput("cannot mix conditionings with and without SDXL size/pooled parts")
            return torch.cat(parts, 0)

        return Cond(
            torch.cat([c.crossattn for c in conds], 0),
            cat([c.pooled for c in conds]),
            cat([c.time_ids for c in conds]),
        )


def size_ids(sizes, batch: int, device=None) -> torch.Tensor | None:
    """SDXL size conditioning as a (B, 6) float32 tensor: original (h, w), crop (top, left), target (h, w).

    Accepts None, a (6,) / (B, 6) tensor, one or B flat 6-sequences, or one or B triples
    `((orig_h, orig_w), (crop_top, crop_left), (target_h, target_w))` as the webui / sgm name them.
    """
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        ids = sizes.detach().to(torch.float32)
    else:
        rows = list(sizes)
        if rows and not isinstance(rows[0], (list, tuple, torch.Tensor)) or _is_triple(rows):
            rows = [rows]  # a single sample's sizes
        ids = torch.tensor([_flatten_sizes(r) for r in rows], dtype=torch.float32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] != 6:
        raise BadInput("SDXL sizes must be 6 numbers per image (original h,w, crop top,left, target h,w); "
                       f"got {tuple(ids.shape)}")
    if ids.shape[0] == 1 and batch > 1:
        ids = ids.expand(batch, 6)
    if ids.shape[0] != batch:
        raise BadInput(f"{ids.shape[0]} SDXL sizes given for {batch} images")
    return ids.to(device) if device is not None else ids


def _is_triple(rows) -> bool:
    return len(rows) == 3 and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and not isinstance(r[0], (list, tuple)) for r in rows)


def _flatten_sizes(row) -> list[float]:
    flat: list[float] = []
    for item in row:
        if isinstance(item, (list, tuple, torch.Tensor)):
            flat.extend(float(v) for v in item)
        else:
            flat.append(float(item))
    return flat


def default_size_ids(latents: torch.Tensor, vae_scale: int = 8) -> torch.Tensor:
    """original = target = the image size the latents decode to, no crop (what the webui uses for generation)."""
    h, w = latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale
    row = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
    return row.expand(latents.shape[0], 6)


def gaussian_like(ref: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like `ref`, drawn on the generator's device (reproducible across devices)."""
    where = generator.device if generator is not None else ref.device
    return torch.randn(ref.shape, generator=generator, device=where, dtype=torch.float32).to(ref.device, ref.dtype)


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 steps: int = 1000) -> torch.Tensor:
    """SD's training schedule computed as ldm does (float64, then float32): what `alphas_cumprod` holds in the webui."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on `device` when it can run there, else a no-op (fp32, or an unsupported device)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    kind = device.type
    if kind not in ("cuda", "cpu", "xpu", "mps"):
        return contextlib.nullcontext()
    if kind == "cpu" and dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    try:
        return torch.autocast(kind, dtype=dtype)
    except (RuntimeError, ValueError):  # an old torch without autocast for this device/dtype
        return contextlib.nullcontext()


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` (the current device) are the same place."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.type == "cpu"


MIXED_PRECISION = {"no": None, "fp32": None, None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(abc.ABC):
    """One loaded SD model, seen as LoRA training needs it. See docs/backends.md for the full contract."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    device: torch.device
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # kohya prefix ("te" or "te1"/"te2") -> text model
    latent_channels: int = 4
    vae_scale: int = 8  # pixels per latent

    def __init__(self) -> None:
        from .state import TrainingState

        self._state: TrainingState | None = None
        self._train_te = False
        self._autocast_dtype: torch.dtype | None = None

    # ---- facts ----------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """float32 (1000,) on `device`: the DDPM schedule training noises with."""

    @property
    @abc.abstractmethod
    def scaling_factor(self) -> float:
        """Latent scale (SD 0.18215, SDXL 0.13025)."""

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype `predict` / `encode_prompts` run under (None: plain fp32)."""
        if self._autocast_dtype is not None:
            return self._autocast_dtype
        dtype = module_dtype(self.unet)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def autocast(self):
        return autocast_context(self.device, self.compute_dtype)

    # ---- the work ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1], NCHW -> scaled latents (float32). `sample=False` gives the distribution's mean."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] (float32)."""

    def encode_prompts(self, texts: Sequence[str], clip_skip: int = 1, max_tokens: int = 75, sizes=None, *,
                       pad_chunks: bool = False) -> Cond:
        """Captions -> Cond (text.py has the 75-token chunking). Gradients flow only while the text encoders train.
        The checks, tokens, chunks and the Cond are the same for every backend; `_encode_chunks` runs its encoders."""
        from . import text as T

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise BadInput("no captions to encode")
        clip_skip = int(clip_skip)
        if clip_skip < 1:
            raise BadInput(f"clip_skip must be 1 or more; got {clip_skip}")
        tokens = T.tokenize(self.tokenizer, texts)
        batch = len(texts)

        def ids(pad_id: int) -> torch.Tensor:
            chunked = T.chunk_ids(tokens, max_tokens=max_tokens, pad_id=pad_id, pad_chunks=pad_chunks)
            return chunked.reshape(-1, T.CONTEXT).to(self.device)

        with self._text_on_device(), self._text_grad_context(), self.autocast():
            states, pooled = self._encode_chunks(ids, clip_skip)
        crossattn = T.join_chunks(states.float(), batch)
        if pooled is None:
            return Cond(crossattn)
        pooled = pooled.float().reshape(batch, -1, pooled.shape[-1])[:, 0]  # SDXL: pooled from each caption's chunk 0
        return Cond(crossattn, pooled, size_ids(sizes, batch, self.device))

    @abc.abstractmethod
    def _encode_chunks(self, ids: Callable[[int], torch.Tensor],
                       clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoders over every 75-token chunk: (states (B*k, 77, D), pooled (B*k, P) for SDXL else None).
        `ids(pad_id)` gives the chunks' token ids padded with that encoder's pad token, on the device."""

    @abc.abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's output (noise or v, see `prediction_type`) for noisy latents at DDPM timesteps 0..999, float32."""

    def lora_targets(self, net_cfg) -> list[tuple[str, torch.nn.Module]]:
        """[(kohya_name, module)] for the UNet and every text encoder, from lib_lora.network's target tables."""
        from ..network import text_encoder_targets, unet_targets

        targets = []
        if getattr(net_cfg, "train_unet", True):
            targets += list(unet_targets(self.unet, self.arch, net_cfg))
        if getattr(net_cfg, "train_text_encoder", True):
            for prefix, te in self.text_encoders.items():
                targets += list(text_encoder_targets(te, prefix, net_cfg))
        return targets

    def sample(self, prompt, negative: str = "", steps: int = 20, cfg: float = 7.0, seed: int = 0, width: int = 512,
               height: int = 512, sampler: str = "euler", *, clip_skip: int = 1, max_tokens: int = 75) -> list:
        """Preview images (PIL) for `prompt` (a string or a list), with our own small sampler (sampling.py)."""
        from .sampling import generate

        return generate(self, prompt, negative, steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                        sampler=sampler, clip_skip=clip_skip, max_tokens=max_tokens)

    # ---- training state ---------------------------------------------------------------------------------------
    @property
    def is_prepared(self) -> bool:
        return self._state is not None

    @property
    def trains_text_encoder(self) -> bool:
        return self._state is not None and self._train_te

    def prepare_for_training(self, *, train_text_encoder: bool = False, gradient_checkpointing: bool = False,
                             mixed_precision: str | None = None, device: str | torch.device | None = None) -> None:
        """Snapshot the model, then: base weights frozen and in eval mode, text encoders run with gradients only if
        `train_text_encoder`, optional non-reentrant gradient checkpointing, autocast dtype from `mixed_precision`
        ("no" / "fp16" / "bf16"; default: the base weights' half dtype), components on `device`.
        `restore()` undoes all of it; calling prepare twice without restore raises."""
        from .state import TrainingState

        if self._state is not None:
            raise BadInput("the model is already prepared for training; restore() it first")
        if mixed_precision not in MIXED_PRECISION:
            raise BadInput(f"mixed_precision must be one of no, fp16, bf16; got {mixed_precision!r}")
        state = TrainingState(self._roots())
        self._state = state
        try:
            state.freeze()
            self._prepare_extra(state, train_text_encoder)
            if device is not None:
                self._move_for_training(state, torch.device(device))
            if gradient_checkpointing:
                for module in self._checkpoint_modules(train_text_encoder):
                    state.checkpoint(module)
            self._train_te = bool(train_text_encoder)
            self._autocast_dtype = MIXED_PRECISION[mixed_precision]
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Hand the model back exactly as it was before prepare_for_training (idempotent, exception-safe)."""
        state, self._state = self._state, None
        self._train_te = False
        self._autocast_dtype = None
        if state is not None:
            state.restore()
            self._after_restore()

    @contextlib.contextmanager
    def training(self, **kwargs) -> Iterator["Backend"]:
        """`with backend.training(train_text_encoder=..., ...):` prepare, and restore however the block ends."""
        self.prepare_for_training(**kwargs)
        try:
            yield self
        finally:
            self.restore()

    def offload_vae(self) -> None:
        """Move the VAE to the CPU (after latents are cached); restore() brings it back. Decoding still works.
        A no-op where the host manages placement (the webui's medvram)."""
        state = self._require_state("offload the VAE")
        if not self._placement_managed():
            state.move(self._vae_module(), torch.device("cpu"))

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (after text outputs are cached); restore() brings them back."""
        state = self._require_state("offload the text encoders")
        if self._placement_managed():
            return
        for te in self._text_modules():
            state.move(te, torch.device("cpu"))

    def _require_state(self, what: str):
        if self._state is None:
            raise BadInput(f"cannot {what} before prepare_for_training()")
        return self._state

    # ---- what subclasses describe -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _roots(self) -> list[torch.nn.Module]:
        """Every module object the backend may touch (the state snapshot covers them all)."""

    @abc.abstractmethod
    def _vae_module(self) -> torch.nn.Module: ...

    @abc.abstractmethod
    def _text_modules(self) -> list[torch.nn.Module]:
        """The text-encoder modules that move with the text encoders (embedders / models)."""

    @abc.abstractmethod
    def _checkpoint_modules(self, with_text_encoder: bool) -> list[torch.nn.Module]:
        """The blocks gradient checkpointing wraps."""

    def _prepare_extra(self, state, train_text_encoder: bool) -> None:
        """Backend-specific switches (recorded in `state` so restore undoes them)."""

    def _move_for_training(self, state, device: torch.device) -> None:
        state.move(self.unet, device)
        for te in self._text_modules():
            state.move(te, device)
        state.move(self._vae_module(), device)
        self.device = device

    def _after_restore(self) -> None:
        """Re-read anything cached from the model (e.g. the device) after restore."""

    def _placement_managed(self) -> bool:
        """True when the host moves modules itself (then the backend never moves them for training)."""
        return False

    # ---- helpers for subclasses ---------------------------------------------------------------------------------
    def _text_grad_context(self):
        """Text encoders build a graph only while they train (caching and inference stay cheap)."""
        if self.trains_text_encoder and torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.no_grad()

    def _module_on_device(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Run `module` on the backend device even when it was offloaded (moved back afterwards)."""
        return _TemporarilyOn(module, self.device)

    def _text_on_device(self) -> contextlib.AbstractContextManager:
        """The text encoders on the backend device for one encode (offloaded, or parked by the webui's medvram)."""
        stack = contextlib.ExitStack()
        for module in self._text_modules():
            stack.enter_context(_TemporarilyOn(module, self.device))
        return stack


class _TemporarilyOn:
    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device, self.moved_from = module, device, None

    def __enter__(self):
        current = module_device(self.module)
        if not same_device(current, self.device):
            self.moved_from = current
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc) -> None:
        if self.moved_from is not None:
            self.module.to(self.moved_from)


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise BadInput(f"unknown model architecture {arch!r}: expected one of {', '.join(ARCHES)}")
    return arch


def check_prediction_type(kind: str) -> str:
    aliases = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
               "v-prediction": "v_prediction"}
    if kind not in aliases:
        raise BadInput(f"unknown prediction type {kind!r}: expected epsilon or v_prediction")
    return aliases[kind]


def first_not_none(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None

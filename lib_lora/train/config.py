"""Every setting of a training run in one frozen dataclass, with sd-scripts' option names.

The same names appear in the CLI (`--network_dim`), in TOML files (`network_dim = 16`, what sd-scripts'
`--config_file` reads), in the LoRA metadata (`ss_network_dim`) and in the tab, so a user who knows sd-scripts
knows ours. Field metadata carries the help text, the allowed choices and the group (TOML section / tab panel),
so the CLI parser and the UI are generated from this one table instead of repeating it.

This module imports nothing heavy: the tab builds configs at page load, long before torch is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
NETWORK_MODULES = ("networks.lora",)
TOKEN_LENGTHS = (75, 150, 225)
LOG_WITH = ("", "tensorboard", "all")
# samplers the backends' preview sampler has (lib_lora/backends/sampling.py), under sd-scripts' spellings
SAMPLERS = ("ddim", "euler", "euler_a", "k_euler", "k_euler_a")
# torch.compile: sd-scripts' --dynamo_backend choices that torch still has, and the modes accelerate's --dynamo_mode takes
DYNAMO_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs", "onnxrt", "tvm", "openxla", "ipex", "no")
DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _f(default: Any, help: str, group: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Change it with `dataclasses.replace`; read/write it with `config_io`."""

    # -- model
    pretrained_model_name_or_path: str = _f(
        "", "base model: a diffusers folder or a .safetensors / .ckpt file (with a same-name .yaml when needed)", "model")
    v2: bool = _f(False, "the base model is SD 2.x", "model")
    v_parameterization: bool = _f(False, "the base model predicts v (SD 2.x 768-v); loss uses the v target", "model")
    sdxl: bool = _f(False, "the base model is SDXL", "model")
    vae: str = _f("", "a separate VAE (optional): a .safetensors / .ckpt / .pt file in ldm names (as in the webui's "
                  "models/VAE) or a diffusers AutoencoderKL folder; replaces the model's VAE for latents and previews "
                  "(CLI; inside the webui the webui's selected VAE is used)", "model")
    clip_skip: int | None = _f(None, "use the output of the n-th last text-encoder layer (1 = last; 2 for anime models)", "model")
    max_token_length: int | None = _f(None, "caption tokens: 75, 150 or 225 (chunks of 75, as the webui does)", "model", TOKEN_LENGTHS)

    # -- dataset
    train_data_dir: str = _f("", "folder holding N_concept subfolders (N = repeats)", "dataset")
    reg_data_dir: str = _f("", "regularization images, same N_concept layout (optional)", "dataset")
    dataset_config: str = _f("", "sd-scripts dataset config (.toml / .json: [general], [[datasets]], [[datasets.subsets]] "
                             "with image_dir, num_repeats, class_tokens, is_reg); used instead of train_data_dir / "
                             "reg_data_dir, and its values win over these options", "dataset")
    caption_extension: str = _f(".txt", "extension of caption files beside each image", "dataset")
    resolution: str = _f("512", "training resolution: 'W' or 'W,H'", "dataset")
    enable_bucket: bool = _f(False, "aspect-ratio buckets instead of center crops", "dataset")
    min_bucket_reso: int = _f(256, "smallest bucket side", "dataset")
    max_bucket_reso: int = _f(1024, "largest bucket side", "dataset")
    bucket_reso_steps: int = _f(64, "bucket sides are multiples of this", "dataset")
    bucket_no_upscale: bool = _f(False, "never upscale an image to fit a bucket", "dataset")
    flip_aug: bool = _f(False, "random horizontal flips", "dataset")
    color_aug: bool = _f(False, "random hue shifts (not with cache_latents)", "dataset")
    random_crop: bool = _f(False, "random instead of center crops (not with cache_latents)", "dataset")
    shuffle_caption: bool = _f(False, "shuffle comma-separated tags each step", "dataset")
    keep_tokens: int = _f(0, "keep the first N tags in place when shuffling / dropping", "dataset")
    keep_tokens_separator: str = _f("", "tags before this separator stay in place (instead of keep_tokens)", "dataset")
    caption_dropout_rate: float = _f(0.0, "probability of training a step with an empty caption", "dataset")
    caption_tag_dropout_rate: float = _f(0.0, "probability of dropping each tag", "dataset")
    caption_dropout_every_n_epochs: int = _f(0, "drop all captions every N epochs (0 = never)", "dataset")
    cache_latents: bool = _f(False, "encode every image once and keep the latents in memory (VAE leaves the GPU)", "dataset")
    cache_latents_to_disk: bool = _f(False, "cache latents in .npz files beside the images (reused by later runs)", "dataset")
    prior_loss_weight: float = _f(1.0, "loss weight of regularization images", "dataset")
    validation_split: float = _f(0.0, "fraction of images held out for a validation loss (0 = none)", "dataset")
    validation_data_dir: str = _f("", "folder of validation images, N_concept layout (instead of validation_split)", "dataset")
    validation_seed: int | None = _f(None, "seed of the held-out choice and validation noise (default: seed)", "dataset")

    # -- network
    network_module: str = _f("networks.lora", "network type (LoRA; LoCon via network_args conv_dim/conv_alpha)", "network", NETWORK_MODULES)
    network_dim: int = _f(4, "LoRA rank", "network")
    network_alpha: float = _f(1.0, "LoRA alpha (scale = alpha / dim; 0 = dim)", "network")
    network_args: tuple[str, ...] = _f((), "extra network options 'k=v', e.g. conv_dim=4 conv_alpha=1", "network")
    network_dropout: float | None = _f(None, "dropout on the LoRA down output", "network")
    network_weights: str = _f("", "start from this LoRA file", "network")
    network_train_unet_only: bool = _f(False, "train the UNet modules only (text encoder outputs can be cached)", "network")
    network_train_text_encoder_only: bool = _f(False, "train the text encoder modules only", "network")

    # -- optimizer and schedule
    optimizer_type: str = _f("AdamW", "optimizer; also sd-scripts' SGDNesterov, SGDNesterov8bit, Lion8bit, PagedAdamW, "
                             "PagedAdamW8bit, PagedAdamW32bit, PagedLion8bit (bitsandbytes, CUDA), DAdaptation, DAdaptAdam, "
                             "DAdaptAdaGrad, DAdaptAdan, DAdaptLion, DAdaptSGD (pip install dadaptation), or a class path "
                             "such as torch.optim.RAdam", "optimizer", OPTIMIZERS)
    optimizer_args: tuple[str, ...] = _f((), "optimizer options 'k=v', e.g. weight_decay=0.01 betas=0.9,0.99", "optimizer")
    learning_rate: float = _f(1e-4, "learning rate (about 1.0 for Prodigy)", "optimizer")
    unet_lr: float | None = _f(None, "UNet learning rate (default: learning_rate)", "optimizer")
    text_encoder_lr: float | None = _f(None, "text encoder learning rate (default: learning_rate)", "optimizer")
    lr_scheduler: str = _f("constant", "learning-rate schedule", "optimizer", SCHEDULERS)
    lr_warmup_steps: int | float = _f(0, "warmup: a step count, or a float below 1 = a fraction of all steps", "optimizer")
    lr_scheduler_num_cycles: int = _f(1, "restarts of cosine_with_restarts", "optimizer")
    lr_scheduler_power: float = _f(1.0, "power of the polynomial schedule", "optimizer")
    max_grad_norm: float = _f(1.0, "clip gradients to this norm (0 = off)", "optimizer")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", "optimizer")

    # -- training
    train_batch_size: int = _f(1, "images per batch", "training")
    max_train_epochs: int | None = _f(None, "epochs (overrides max_train_steps)", "training")
    max_train_steps: int = _f(1600, "optimizer steps when max_train_epochs is not set", "training")
    seed: int | None = _f(None, "random seed (default: a random one, recorded in the state)", "training")
    mixed_precision: str = _f("no", "compute precision", "training", MIXED_PRECISIONS)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, ~30% slower", "training")
    min_snr_gamma: float | None = _f(None, "min-SNR loss weighting gamma (5 is common; unset = off)", "training")
    noise_offset: float | None = _f(None, "offset noise strength (0.05-0.1 helps very dark/bright images)", "training")
    torch_compile: bool = _f(False, "compile the UNet forward with torch.compile: faster steps after a slow first one "
                             "(minutes); falls back to eager when compiling fails", "training")
    dynamo_backend: str = _f("inductor", "torch.compile backend for torch_compile (inductor; 'no' = do not compile)", "training")
    dynamo_mode: str = _f("default", "torch.compile mode: reduce-overhead = CUDA graphs (fewer kernel launches on a GPU)",
                          "training", DYNAMO_MODES)

    # -- output
    output_dir: str = _f("", "folder for the LoRA files", "output")
    output_name: str = _f("last", "file name without extension; epochs get -01, -02, ...", "output")
    save_precision: str = _f("fp16", "precision of the saved LoRA", "output", SAVE_PRECISIONS)
    save_every_n_epochs: int | None = _f(None, "save <name>-NN.safetensors every N epochs (the last epoch always)", "output")
    save_every_n_steps: int | None = _f(None, "also save <name>-stepNNNNNNNN.safetensors every N optimizer steps (0 = off)", "output")
    save_last_n_steps: int | None = _f(None, "keep only the step files of the last N steps (older ones are removed; 0 = keep all)", "output")
    save_last_n_steps_state: int | None = _f(None, "keep only the step states of the last N steps (default: save_last_n_steps)", "output")
    save_state: bool = _f(False, "save resumable state (optimizer, scheduler, step) with each saved epoch and step file", "output")
    state_dir: str | None = _f(None, "folder for the state folders (save_state, interrupt; default: output_dir)", "output")
    resume: str = _f("", "resume from this state folder", "output")
    training_comment: str = _f("", "comment stored in the LoRA metadata", "output")

    # -- samples and logs
    sample_every_n_epochs: int | None = _f(None, "generate sample images every N epochs", "sampling")
    sample_every_n_steps: int | None = _f(None, "generate sample images every N optimizer steps (ignored while sample_every_n_epochs "
                                          "is set, as in sd-scripts; 0 = off)", "sampling")
    sample_prompts: str | tuple[str, ...] = _f("", "a prompt file (kohya syntax: --w --h --s --l --d --n), or a list of prompts", "sampling")
    sample_sampler: str = _f("ddim", "sampler for the sample images", "sampling", SAMPLERS)
    sample_dir: str | None = _f(None, "folder for the sample images (default: <output_dir>/sample)", "sampling")
    logging_dir: str = _f("", "folder for the loss log (CSV; tensorboard too when log_with says so)", "logging")
    log_with: str = _f("", "tensorboard: required; '' (default): tensorboard when installed; the CSV is always written", "logging", LOG_WITH)
    dry_run: bool = _f(False, "print the dataset summary, steps, memory and time estimate; write nothing", "logging")

    config_version: int = _f(CONFIG_VERSION, "version of this settings layout (older files are migrated)", "meta")


def field_names() -> tuple[str, ...]:
    """All setting names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


@functools.lru_cache(maxsize=1)
def field_types() -> dict[str, Any]:
    """Resolved type of each field (the annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(TrainConfig)


def field_info(name: str) -> dict[str, Any]:
    """help / group / choices / default of one field (what the CLI and the tab show)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return {**f.metadata, "default": f.default, "type": field_types()[name]}
    raise KeyError(name)


def resolution_wh(cfg: TrainConfig) -> tuple[int, int]:
    """`resolution` as (width, height): '512' -> (512, 512), '768,512' -> (768, 512). Raises ValueError."""
    parts = [p.strip() for p in str(cfg.resolution).replace("x", ",").split(",") if p.strip()]
    if len(parts) not in (1, 2):
        raise ValueError(f"resolution {cfg.resolution!r} is not 'W' or 'W,H'")
    values = [int(float(p)) for p in parts]
    return (values[0], values[-1])


def effective_lrs(cfg: TrainConfig) -> tuple[float, float]:
    """(unet_lr, text_encoder_lr) after sd-scripts' fallbacks: unset -> learning_rate; trained-only flags -> 0."""
    unet = cfg.learning_rate if cfg.unet_lr is None else cfg.unet_lr
    te = cfg.learning_rate if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    if cfg.network_train_unet_only:
        te = 0.0
    if cfg.network_train_text_encoder_only:
        unet = 0.0
    return unet, te


def sample_prompt_lines(cfg: TrainConfig) -> list[str]:
    """The sample prompts: the prompt file's (.txt, .toml or .json, as sd-scripts reads them), or the inline list;
    blank and '#' lines skipped."""
    from .prompts import read_prompt_file

    if isinstance(cfg.sample_prompts, tuple):
        lines = list(cfg.sample_prompts)
    elif cfg.sample_prompts:
        return read_prompt_file(cfg.sample_prompts)
    else:
        lines = []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]

"""Find every bad setting before any model loads.

Returns all problems at once (the tab lists them, the CLI prints them) instead of failing on the first one
twenty minutes into model loading. Only folders and file names are touched; torch is not imported.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..fsutil import check_name
from .config import (
    DYNAMO_BACKENDS, DYNAMO_MODES, LOG_WITH, MIXED_PRECISIONS, NETWORK_MODULES, OPTIMIZERS, SAMPLERS, SAVE_PRECISIONS, SCHEDULERS, TOKEN_LENGTHS,
    TrainConfig, field_names, resolution_wh, sample_prompt_lines,
)
from .optim_names import (
    NAMED_OPTIMIZERS, adapts_its_own_rate, canonical_optimizer, cuda_message, is_class_path, needs_cuda, package_of, pip_hint,
    unknown_message,
)
from .steps import count_concepts


@dataclass(frozen=True)
class Problem:
    field: str  # the setting at fault ("" when it is the combination)
    message: str
    severity: str = "error"  # "error" stops the run; "warning" is shown and the run goes on

    def __str__(self) -> str:
        return f"{self.severity}: {self.field + ': ' if self.field else ''}{self.message}"


def _torch_without_cuda() -> bool:
    """True when torch is loaded and sees no CUDA device. Without torch loaded (the tab at page load) nothing is
    said here; the optimizer's own check speaks when the run starts."""
    torch = sys.modules.get("torch")
    return torch is not None and not torch.cuda.is_available()


def _optimizer_problems(cfg: TrainConfig) -> list[Problem]:
    """A name we know (any letter case) or a class path; its package there; bitsandbytes only with CUDA. A class
    path or a bare torch.optim name is resolved only when torch is already loaded (never imported here)."""
    from .config import effective_lrs

    name = canonical_optimizer(cfg.optimizer_type)
    out: list[Problem] = []
    package = package_of(name)
    if needs_cuda(name) and _torch_without_cuda():
        return [Problem("optimizer_type", cuda_message(name).removeprefix("optimizer_type "))]
    if package and importlib.util.find_spec(package) is None:
        out.append(Problem("optimizer_type", f"{name} needs the '{package}' package ({pip_hint(package)})" if name in NAMED_OPTIMIZERS
                           else f"{name}: module {package} is not installed ({pip_hint(package)}?)"))
    elif name not in NAMED_OPTIMIZERS and "torch" in sys.modules:
        from .optim import resolve_optimizer_class

        try:
            resolve_optimizer_class(name)
        except BadInput as exc:
            out.append(Problem("optimizer_type", str(exc).removeprefix("optimizer_type ")))
    elif name not in NAMED_OPTIMIZERS and not is_class_path(name) and not name.isidentifier():
        out.append(Problem("optimizer_type", unknown_message(name).removeprefix("optimizer_type ")))
    if adapts_its_own_rate(name):
        low = [f"{what} {lr:g}" for what, lr in zip(("unet", "text encoder"), effective_lrs(cfg)) if 0 < lr <= 0.1]
        if low:
            out.append(Problem("learning_rate", f"{name} finds its own step size and multiplies it by the learning rate: "
                               f"set the learning rates around 1.0 ({', '.join(low)}: likely far too low)", "warning"))
    return out


def _kv_problems(name: str, items: tuple[str, ...]) -> list[Problem]:
    bad = [a for a in items if "=" not in a or not a.split("=", 1)[0].strip()]
    return [Problem(name, f"{a!r} is not 'key=value'") for a in bad]


def _folder_problems(name: str, path: str, required: bool) -> tuple[list[Problem], list]:
    if not path:
        return ([Problem(name, "is not set")] if required else []), []
    p = Path(path)
    if not p.is_dir():
        return [Problem(name, f"folder {path} does not exist")], []
    concepts = count_concepts(p)
    problems = []
    if not concepts:
        problems.append(Problem(name, f"{path} has no N_concept subfolders (e.g. 10_mychar: 10 repeats of the images in it)"))
    for c in concepts:
        if c.images == 0:
            problems.append(Problem(name, f"{c.folder} holds no images (png, jpg, jpeg, webp, bmp)", "warning"))
        elif c.repeats == 0:
            problems.append(Problem(name, f"{c.folder} has 0 repeats, its images are not used", "warning"))
    if concepts and not any(c.images and c.repeats for c in concepts):
        problems.append(Problem(name, f"{path} holds no usable images: the dataset is empty"))
    return problems, concepts


def validate(cfg: TrainConfig, need_model_path: bool = True) -> list[Problem]:
    """Every problem with `cfg`; `need_model_path=False` when the host hands over a loaded model (the webui)."""
    dataset_problem = ""
    if cfg.dataset_config:  # its values (resolution, batch size, augmentation) are the run's: check those
        from .dataset_config import apply_dataset_config

        try:
            cfg = apply_dataset_config(cfg)
        except BadInput as exc:
            dataset_problem = str(exc)
    out: list[Problem] = []
    add = lambda f, m, s="error": out.append(Problem(f, m, s))  # noqa: E731

    # model
    model = cfg.pretrained_model_name_or_path
    if need_model_path:
        if not model:
            add("pretrained_model_name_or_path", "is not set")
        elif not Path(model).exists():
            add("pretrained_model_name_or_path", f"{model} does not exist (a diffusers folder or a .safetensors / .ckpt "
                "file; nothing is downloaded)")
    if cfg.v2 and cfg.sdxl:
        add("sdxl", "v2 and sdxl are both set; a model is one or the other")
    if cfg.v_parameterization and not (cfg.v2 or cfg.sdxl):
        add("v_parameterization", "is set for an SD 1.x model; only SD 2.x 768-v models predict v", "warning")
    if cfg.vae and not need_model_path:  # the host's loaded model (the webui) encodes with its own VAE
        add("vae", "is not used here: the loaded model encodes with its own VAE (in the webui: Settings > SD VAE)", "warning")
    elif cfg.vae and not Path(cfg.vae).exists():
        add("vae", f"{cfg.vae} does not exist")
    if cfg.clip_skip is not None and not 1 <= cfg.clip_skip <= 12:
        add("clip_skip", f"{cfg.clip_skip} is outside 1..12")
    elif cfg.v2 and (cfg.clip_skip or 1) > 1:  # seen in the real webui: its SD2 text path never reads the option
        add("clip_skip", f"{cfg.clip_skip} on an SD 2.x model trains on a text-encoder layer the webui never uses "
            "(A1111 ignores clip skip for SD 2.x, also in the previews); keep 1 unless the LoRA is for a UI that "
            "applies it", "warning")
    if cfg.max_token_length is not None and cfg.max_token_length not in TOKEN_LENGTHS:
        add("max_token_length", f"{cfg.max_token_length} is not one of 75, 150, 225")

    # dataset
    if cfg.dataset_config:  # sd-scripts' dataset config: its folders instead of train_data_dir / reg_data_dir
        train_concepts = []
        if dataset_problem:
            add("dataset_config", dataset_problem)
    else:
        problems, train_concepts = _folder_problems("train_data_dir", cfg.train_data_dir, required=True)
        out += problems
        out += _folder_problems("reg_data_dir", cfg.reg_data_dir, required=False)[0]
    if cfg.validation_data_dir:
        out += _folder_problems("validation_data_dir", cfg.validation_data_dir, required=False)[0]
        if cfg.validation_split:
            add("validation_split", "validation_split and validation_data_dir are both set; use one")
    if not 0.0 <= cfg.validation_split < 1.0:
        add("validation_split", f"{cfg.validation_split} is outside [0, 1)")
    elif cfg.validation_split and train_concepts:
        if all(int(c.images * cfg.validation_split) == 0 for c in train_concepts if c.repeats):
            add("validation_split", f"{cfg.validation_split} holds out no image (too few images per folder)", "warning")
    if not cfg.caption_extension.startswith(".") or len(cfg.caption_extension) < 2:
        add("caption_extension", f"{cfg.caption_extension!r} should look like '.txt'")
    try:
        w, h = resolution_wh(cfg)
        if min(w, h) < 64 or w % 8 or h % 8:
            add("resolution", f"{cfg.resolution} must be at least 64 and a multiple of 8")
    except ValueError:
        add("resolution", f"{cfg.resolution!r} is not 'W' or 'W,H'")
    if cfg.enable_bucket:
        if cfg.bucket_reso_steps < 8 or cfg.bucket_reso_steps % 8:
            add("bucket_reso_steps", f"{cfg.bucket_reso_steps} must be a multiple of 8")
        if cfg.min_bucket_reso > cfg.max_bucket_reso:
            add("min_bucket_reso", f"{cfg.min_bucket_reso} is above max_bucket_reso {cfg.max_bucket_reso}")
        if cfg.min_bucket_reso < 64:
            add("min_bucket_reso", f"{cfg.min_bucket_reso} is below 64")
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        for aug in ("color_aug", "random_crop"):
            if getattr(cfg, aug):
                add(aug, "changes the image every epoch, so it cannot be used with cache_latents")
    for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(cfg, rate) <= 1.0:
            add(rate, f"{getattr(cfg, rate)} is outside [0, 1]")
    for count in ("keep_tokens", "caption_dropout_every_n_epochs"):
        if getattr(cfg, count) < 0:
            add(count, "may not be negative")
    if cfg.prior_loss_weight < 0:
        add("prior_loss_weight", "may not be negative")

    # network
    if cfg.network_module not in NETWORK_MODULES:
        add("network_module", f"{cfg.network_module!r} is not supported (use networks.lora; LoCon via conv_dim in network_args)")
    if cfg.network_dim < 1:
        add("network_dim", f"{cfg.network_dim} must be at least 1")
    if not cfg.network_alpha >= 0:
        add("network_alpha", f"{cfg.network_alpha} may not be negative (0 = network_dim, as in sd-scripts)")
    out += _kv_problems("network_args", cfg.network_args)
    if cfg.network_dropout is not None and not 0 <= cfg.network_dropout < 1:
        add("network_dropout", f"{cfg.network_dropout} is outside [0, 1)")
    if cfg.network_weights and not Path(cfg.network_weights).is_file():
        add("network_weights", f"{cfg.network_weights} does not exist")
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        add("network_train_unet_only", "network_train_text_encoder_only is set too: nothing would train")

    # optimizer and schedule
    out += _optimizer_problems(cfg)
    out += _kv_problems("optimizer_args", cfg.optimizer_args)
    for lr in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(cfg, lr)
        if value is not None and (not math.isfinite(value) or value < 0):
            add(lr, f"{value} must be 0 or more")
    if cfg.learning_rate == 0 and cfg.unet_lr is None and cfg.text_encoder_lr is None and cfg.optimizer_type != "Adafactor":
        add("learning_rate", "is 0: nothing would change")
    if cfg.lr_scheduler not in SCHEDULERS:
        add("lr_scheduler", f"{cfg.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if cfg.lr_scheduler == "adafactor" and cfg.optimizer_type != "Adafactor":
        add("lr_scheduler", "adafactor works with optimizer_type Adafactor only")
    warm = cfg.lr_warmup_steps
    if isinstance(warm, float) and not 0 <= warm < 1:
        add("lr_warmup_steps", f"{warm} must be a whole step count or a fraction below 1")
    elif warm < 0:
        add("lr_warmup_steps", "may not be negative")
    elif warm and cfg.lr_scheduler in ("constant", "adafactor"):
        add("lr_warmup_steps", f"is ignored by the {cfg.lr_scheduler} schedule (use constant_with_warmup)", "warning")
    if cfg.lr_scheduler_num_cycles < 1:
        add("lr_scheduler_num_cycles", "must be at least 1")
    if not cfg.lr_scheduler_power > 0:
        add("lr_scheduler_power", "must be above 0")
    if cfg.max_grad_norm < 0:
        add("max_grad_norm", "may not be negative (0 = off)")
    if cfg.gradient_accumulation_steps < 1:
        add("gradient_accumulation_steps", "must be at least 1")

    # training
    if cfg.train_batch_size < 1:
        add("train_batch_size", "must be at least 1")
    if cfg.max_train_epochs is not None and cfg.max_train_epochs < 1:
        add("max_train_epochs", "must be at least 1")
    if cfg.max_train_epochs is None and cfg.max_train_steps < 1:
        add("max_train_steps", "must be at least 1")
    if cfg.seed is not None and not 0 <= cfg.seed < 2**63:
        add("seed", f"{cfg.seed} is outside 0 .. 2^63")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        add("mixed_precision", f"{cfg.mixed_precision!r} is not one of no, fp16, bf16")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma < 0:
        add("min_snr_gamma", "may not be negative")
    if cfg.noise_offset is not None and not 0 <= cfg.noise_offset <= 1:
        add("noise_offset", f"{cfg.noise_offset} is outside [0, 1] (0.05-0.1 is usual)")
    if cfg.dynamo_mode not in DYNAMO_MODES:
        add("dynamo_mode", f"{cfg.dynamo_mode!r} is not one of {', '.join(DYNAMO_MODES)}")
    if cfg.torch_compile:
        backend = cfg.dynamo_backend.strip().lower()
        if backend == "no":
            add("dynamo_backend", "'no' turns torch_compile off (use inductor to compile)", "warning")
        elif backend not in DYNAMO_BACKENDS:
            add("dynamo_backend", f"{cfg.dynamo_backend!r} is not a torch.compile backend known here "
                f"({', '.join(DYNAMO_BACKENDS[:-1])}); the run tries it and trains eagerly if torch refuses it", "warning")
        elif cfg.dynamo_mode != "default" and backend != "inductor":
            add("dynamo_mode", f"{cfg.dynamo_mode} is a mode of the inductor backend; {backend} ignores it", "warning")

    # output
    if not cfg.dry_run and not cfg.output_dir:
        add("output_dir", "is not set")
    try:
        check_name(cfg.output_name, "output_name")
    except BadInput as exc:
        add("output_name", str(exc))
    if cfg.save_precision not in SAVE_PRECISIONS:
        add("save_precision", f"{cfg.save_precision!r} is not one of fp16, bf16, fp32")
    if cfg.save_every_n_epochs is not None and cfg.save_every_n_epochs < 1:
        add("save_every_n_epochs", "must be at least 1")
    for name in ("save_every_n_steps", "save_last_n_steps", "save_last_n_steps_state", "sample_every_n_steps"):
        if (getattr(cfg, name) or 0) < 0:
            add(name, f"must be at least 1 (0 or unset = off), not {getattr(cfg, name)}")
    if not cfg.save_every_n_steps:
        for name in ("save_last_n_steps", "save_last_n_steps_state"):
            if (getattr(cfg, name) or 0) > 0:
                add(name, "has no effect without save_every_n_steps (it keeps the newest step files)", "warning")
    elif (cfg.save_last_n_steps_state or 0) > 0 and not cfg.save_state:
        add("save_last_n_steps_state", "has no effect without save_state", "warning")
    if cfg.resume:
        state = Path(cfg.resume)
        if not (state / "state.json").is_file():
            add("resume", f"{cfg.resume} is not a saved state folder (no state.json in it)")

    # samples and logs
    if cfg.sample_every_n_epochs and (cfg.sample_every_n_steps or 0) > 0:
        add("sample_every_n_steps", "is ignored while sample_every_n_epochs is set (sd-scripts' rule): previews come at "
            "epoch ends only", "warning")
    sampling = "sample_every_n_epochs" if cfg.sample_every_n_epochs is not None else \
        "sample_every_n_steps" if (cfg.sample_every_n_steps or 0) > 0 else None
    if sampling:
        if cfg.sample_every_n_epochs is not None and cfg.sample_every_n_epochs < 1:
            add("sample_every_n_epochs", "must be at least 1")
        try:
            if not sample_prompt_lines(cfg):
                add("sample_prompts", f"is empty, but {sampling} is set")
        except OSError:
            add("sample_prompts", f"cannot read prompt file {cfg.sample_prompts}")
        except BadInput as exc:
            add("sample_prompts", str(exc))
    if cfg.sample_sampler not in SAMPLERS:
        add("sample_sampler", f"{cfg.sample_sampler!r} is not one of {', '.join(SAMPLERS)}")
    if cfg.log_with not in LOG_WITH:
        add("log_with", f"{cfg.log_with!r} is not one of tensorboard, all")
    elif cfg.log_with in ("tensorboard", "all") and importlib.util.find_spec("tensorboard") is None:
        add("log_with", "tensorboard is not installed; only the CSV loss log is written", "warning")
    out += _dataset_option_problems(cfg, {p.field for p in out})
    return out


def _dataset_option_problems(cfg: TrainConfig, known: set[str]) -> list[Problem]:
    """The dataset package's own checks (bucket range against the resolution, ...), minus what was said above."""
    from ..dataset.options import DatasetOptions, validate_options

    names = set(field_names())
    found = []
    for message in validate_options(DatasetOptions.from_config(cfg, seed=cfg.seed or 0)):
        name = message.split()[0]
        if name == "train_data_dir" and cfg.dataset_config:  # the dataset config's subsets stand in for it
            continue
        said = {"give": {"validation_split"}, "cache_latents": {"color_aug", "random_crop"}}.get(name, {name})
        if said & known:
            continue
        found.append(Problem(name if name in names else "", message))
    return found


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def raise_for_problems(problems: list[Problem]) -> None:
    """BadInput with every error on one line (library callers that do not show a list)."""
    errs = errors_of(problems)
    if errs:
        raise BadInput("; ".join(str(p.field + " " + p.message).strip() for p in errs))

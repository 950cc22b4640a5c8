"""The `ss_*` training keys of a LoRA file's header, as sd-scripts' train_network writes them (lora-format.md 4.1).

Every value is `str(v)` the way sd-scripts writes it (None -> "None", booleans "True"/"False", the resolution
as "(W, H)"), JSON for the dataset tables. These are the run's settings and counts; `lib_lora.network.build_metadata`
adds the network, model, dataset-table and `modelspec.*` keys (its explicit values win) and `save_lora` the hashes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..network.metadata import base_model_version as network_base_model_version
from .config import TrainConfig, effective_lrs, resolution_wh


def base_model_version(arch: str, prediction_type: str) -> str:
    """`ss_base_model_version` from the backend's prediction type (the network package's table)."""
    return network_base_model_version(arch, prediction_type == "v_prediction")


def training_metadata(
    cfg: TrainConfig,
    *,
    arch: str,
    prediction_type: str,
    dataset: Any,
    session_id: int,
    started_at: float,
    epoch: int,
    num_epochs: int,
    step: int,
    total_steps: int,
    batches_per_epoch: int,
    optimizer_name: str,
    seed: int,
    world: int = 1,
    model_name: str | None = None,
) -> dict[str, str]:
    unet_lr, te_lr = effective_lrs(cfg)
    w, h = resolution_wh(cfg)
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.output_name,
        "ss_training_comment": cfg.training_comment or None,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": total_steps,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_train_images": getattr(dataset, "num_train_images", None),
        "ss_num_validation_images": getattr(dataset, "num_validation_images", 0),
        "ss_num_reg_images": getattr(dataset, "num_reg_images", 0),
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": te_lr,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_cache_latents": cfg.cache_latents or cfg.cache_latents_to_disk,
        "ss_seed": seed,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": float(cfg.network_alpha),
        "ss_network_dropout": cfg.network_dropout,
        "ss_v2": arch == "sd2",
        "ss_base_model_version": base_model_version(arch, prediction_type),
        "ss_sd_model_name": model_name or (Path(cfg.pretrained_model_name_or_path).name or None),
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_validation_split": cfg.validation_split,
        "ss_validation_seed": cfg.validation_seed if cfg.validation_seed is not None else seed,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world,
        "ss_resolution": (w, h),
        "ss_color_aug": cfg.color_aug,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens,
    }
    if cfg.network_args:
        raw = (a.partition("=") for a in cfg.network_args)
        md["ss_network_args"] = json.dumps({k.strip(): v.strip() for k, _, v in raw})
    out = {k: str(v) for k, v in md.items()}
    reg_dirs = getattr(dataset, "dataset_dirs", None)
    if reg_dirs is not None:
        out["ss_reg_dataset_dirs"] = json.dumps(reg_dirs(reg=True))
    return out


def activation_text(dataset: Any) -> str:
    """The concept names of the training folders (`10_mychar` -> `mychar`), the words a user types to use the LoRA;
    with a dataset config, the class_tokens of its training subsets (there a folder's name means nothing)."""
    if getattr(getattr(dataset, "options", None), "subsets", ()):
        uses: dict[str, int] = {}
        for placed in dataset.images:
            if placed.role == "train" and placed.entry.concept:
                uses[placed.entry.concept] = uses.get(placed.entry.concept, 0) + placed.repeats
        return ", ".join(sorted(uses, key=lambda c: (-uses[c], c)))
    dirs = getattr(dataset, "dataset_dirs", None)
    table = dirs() if dirs else {}
    names = []
    # the concept trained most (most repeats x images) first: it is usually the subject of the LoRA
    for folder in sorted(table, key=lambda f: (-table[f].get("n_repeats", 1) * table[f].get("img_count", 1), f)):
        concept = folder.split("_", 1)[1] if "_" in folder and folder.split("_", 1)[0].isdigit() else folder
        if concept not in names:
            names.append(concept)
    return ", ".join(names)

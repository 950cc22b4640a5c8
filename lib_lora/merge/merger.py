"""merge_loras(): bake LoRA files into a checkpoint in the webui's format, streaming tensor by tensor.

Every check (files exist and parse, every LoRA module finds its weight with a fitting shape, output name and
place are safe, disk space) happens before the first byte is written, so bad input never leaves a file behind.
The output is written to a temporary file beside the target and renamed at the end (lib_lora.fsutil.atomic_open):
an interrupt, a crash or a full disk leaves no partial checkpoint.

Per touched tensor: W' = W + sum over LoRAs of m * (alpha / rank) * compose(up, down), added in float32 and cast
once to the tensor's own dtype (or the requested precision). Untouched tensors are copied byte for byte (or cast
to the requested precision). Peak memory: one target tensor in float32 plus one LoRA module at a time.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from ..errors import BadInput, IncompatibleFile
from ..fsutil import atomic_open, atomic_write_bytes, check_name
from ..network.metadata import IMPLEMENTATION_SGM, modelspec_architecture
from .lora_file import LoraFile, LoraModule, open_lora
from .safetensors_io import FLOAT_DTYPES, PlannedTensor, StreamWriter, encode_header, torch_dtype
from .sources import CheckpointSource, open_checkpoint
from .targets import CheckpointIndex, Target

PRECISIONS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
_MODELSPEC_FAMILY = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl"}
_STALE_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")
_EXAMPLES = 3

Progress = Callable[[int, int], None]


@dataclass
class LoraReport:
    """What one LoRA file contributed."""

    path: str
    multiplier: float
    merged: dict[str, int]  # part ("unet", "te", "te1", "te2") -> modules merged
    not_found: list[str] = field(default_factory=list)  # module names with no weight (only with allow_missing)
    ignored_keys: list[str] = field(default_factory=list)  # bundled embeddings (`bundle_emb.*`), alpha without weights


@dataclass
class MergeReport:
    out_path: str
    arch: str  # "sd1" | "sd2" | "sdxl"
    precision: str | None
    loras: list[LoraReport]
    tensors_changed: int
    tensors_total: int
    bytes_written: int
    seconds: float
    yaml_copied: bool = False

    @property
    def modules_merged(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for lora in self.loras:
            for part, count in lora.merged.items():
                total[part] += count
        return dict(total)

    @property
    def not_found(self) -> list[str]:
        return [name for lora in self.loras for name in lora.not_found]

    def summary(self) -> str:
        lines = [
            f"wrote {self.out_path} ({_ARCH_TITLE.get(self.arch, self.arch)}, {self.bytes_written / 2**20:.1f} MiB, "
            f"{self.tensors_changed} of {self.tensors_total} tensors changed, {self.seconds:.1f} s)"
        ]
        for lora in self.loras:
            parts = ", ".join(f"{part} {count}" for part, count in sorted(lora.merged.items()))
            lines.append(f"  {Path(lora.path).name} x {lora.multiplier:g}: modules merged: {parts}")
            if lora.not_found:
                lines.append(f"  {Path(lora.path).name}: {len(lora.not_found)} modules not in the checkpoint, skipped: "
                             + _examples(lora.not_found))
            if lora.ignored_keys:
                lines.append(f"  {Path(lora.path).name}: {_ignored(lora.ignored_keys)}")
        if self.yaml_copied:
            lines.append(f"  copied {Path(self.out_path).with_suffix('.yaml').name} beside it")
        return "\n".join(lines)


_ARCH_TITLE = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def _ignored(keys: list[str]) -> str:
    kinds = (("bundled embeddings", [k for k in keys if k.startswith("bundle_emb.")]),
             ("alpha without lora_down / lora_up", [k for k in keys if not k.startswith("bundle_emb.")]))
    n = len(keys)
    return f"{n} key{'s' if n != 1 else ''} ignored (" + "; ".join(f"{what}" if len(found) == n else f"{what}: {len(found)}"
                                                              for what, found in kinds if found) + ")"


@dataclass
class _Contribution:
    lora: LoraFile
    module: LoraModule
    target: Target
    multiplier: float


def merge_loras(
    model_path: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    out_path: str | os.PathLike,
    precision: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    allow_missing: bool = False,
) -> MergeReport:
    """Merge `loras` ([(path, multiplier)]) into `model_path`, writing a safetensors checkpoint to `out_path`.

    precision: None keeps every tensor's dtype; "fp16" / "bf16" / "fp32" casts every floating weight.
    progress(done_bytes, total_bytes) is called after each tensor; an exception raised there aborts the merge
    and leaves nothing behind. allow_missing: skip (and report) LoRA modules the checkpoint has no weight for,
    instead of refusing; wrong shapes are always refused.
    Raises BadInput / IncompatibleFile with a one-line message; nothing is written then.
    """
    started = time.monotonic()
    model, out, lora_specs, out_dtype = _check_arguments(model_path, loras, out_path, precision, overwrite)
    yaml_in, yaml_out = model.with_suffix(".yaml"), out.with_suffix(".yaml")
    copy_yaml = yaml_in.is_file() and yaml_in.resolve() != yaml_out.resolve()  # a.ckpt -> a.safetensors shares it
    if copy_yaml and yaml_out.exists() and not overwrite:
        raise BadInput(f"{yaml_out} already exists (use --overwrite to replace it)")

    source = open_checkpoint(model)
    opened: list[LoraFile] = []
    try:
        index = CheckpointIndex(source.keys, source.shape, model.name)
        plan: dict[str, list[_Contribution]] = defaultdict(list)
        reports = []
        for lora_path, multiplier in lora_specs:
            lora = open_lora(lora_path, index.arch)
            opened.append(lora)
            reports.append(_plan_lora(lora, multiplier, index, plan, allow_missing))
        for key in plan:
            if source.dtype(key) not in FLOAT_DTYPES and not source.dtype(key).startswith("F8"):
                raise IncompatibleFile(f"{model.name}: weight {key} is stored as {source.dtype(key)}; cannot add a LoRA to it")

        out_plan = [
            PlannedTensor(key, _output_dtype(key, source.dtype(key), out_dtype), source.shape(key)) for key in source.keys
        ]
        metadata = _metadata(source, index, out, opened, lora_specs, precision)
        total = len(encode_header(out_plan, metadata)) + sum(t.nbytes for t in out_plan)
        _check_space(out, total)
        _write(source, out, out_plan, metadata, plan, total, progress)
    finally:
        for lora in opened:
            lora.close()
        source.close()

    if copy_yaml:
        try:
            atomic_write_bytes(yaml_out, yaml_in.read_bytes())
        except OSError as exc:
            raise BadInput(f"wrote {out.name} but could not copy {yaml_in.name} beside it: {exc.strerror or exc}") from None
    return MergeReport(
        out_path=str(out), arch=index.arch, precision=precision, loras=reports, tensors_changed=len(plan),
        tensors_total=len(out_plan), bytes_written=total, seconds=time.monotonic() - started, yaml_copied=copy_yaml,
    )


def _check_arguments(model_path, loras, out_path, precision, overwrite):
    if precision is not None and precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if not loras:
        raise BadInput("no LoRA file given")
    model = Path(model_path)
    if not model.is_file():
        raise BadInput(f"model file not found: {model}" if not model.exists() else f"model is not a file: {model}")
    out = Path(out_path)
    check_name(out.name, "output file name")
    if out.suffix.lower() != ".safetensors":
        raise BadInput(f"output file {out.name} must end in .safetensors")
    specs = []
    for lora_path, multiplier in loras:
        lp = Path(lora_path)
        if not lp.is_file():
            raise BadInput(f"LoRA file not found: {lp}" if not lp.exists() else f"LoRA is not a file: {lp}")
        try:
            multiplier = float(multiplier)
        except (TypeError, ValueError):
            raise BadInput(f"multiplier for {lp.name} is not a number: {multiplier!r}") from None
        if not math.isfinite(multiplier):
            raise BadInput(f"multiplier for {lp.name} must be a finite number")
        specs.append((lp, multiplier))
    for src in [model] + [lp for lp, _ in specs]:
        if _same_file(src, out):
            raise BadInput(f"output {out.name} is the same file as input {src.name}; choose another output name")
    if out.exists():
        if out.is_dir():
            raise BadInput(f"output {out} is a folder")
        if not overwrite:
            raise BadInput(f"{out} already exists (use --overwrite to replace it)")
    return model, out, specs, PRECISIONS.get(precision) if precision else None


def _same_file(a: Path, b: Path) -> bool:
    if b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return a.resolve() == b.resolve()


def _plan_lora(lora: LoraFile, multiplier: float, index: CheckpointIndex, plan, allow_missing: bool) -> LoraReport:
    not_found: list[str] = []
    wrong_shape: list[str] = []
    found: list[tuple[LoraModule, Target]] = []
    for module in lora.modules.values():
        target = index.locate(module.name)
        if target is None:
            not_found.append(module.name)
            continue
        shape = lora.delta_shape(module)
        if shape[0] != target.shape[0] or math.prod(shape) != math.prod(target.shape):
            wrong_shape.append(f"{module.name} {_fmt(shape)} vs {_fmt(target.shape)}")
            continue
        found.append((module, target))
    total = len(lora.modules)
    if not found or wrong_shape or (not_found and not allow_missing):
        problems = []
        if not found and not wrong_shape:
            problems.append(f"none of its {total} modules matches a weight (e.g. {_examples(not_found)})")
        else:
            if not_found and not allow_missing:
                problems.append(f"{len(not_found)} of {total} modules have no matching weight (e.g. {_examples(not_found)})")
            if wrong_shape:
                problems.append(f"{len(wrong_shape)} of {total} modules have the wrong shape (e.g. {_examples(wrong_shape)})")
        hint = _guess_lora_arch(lora)
        hint_text = f"; it looks like an {hint} LoRA" if hint and hint != index.title else ""
        raise IncompatibleFile(
            f"LoRA {lora.path.name} does not fit this {index.title} checkpoint: {'; '.join(problems)}{hint_text}"
        )
    merged: dict[str, int] = defaultdict(int)
    for module, target in found:
        plan[target.key].append(_Contribution(lora, module, target, multiplier))
        merged[target.part] += 1
    return LoraReport(str(lora.path), multiplier, dict(merged), not_found, list(lora.ignored_keys))


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _examples(names: list[str]) -> str:
    more = f", ... {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else ""
    return ", ".join(names[:_EXAMPLES]) + more


def _guess_lora_arch(lora: LoraFile) -> str | None:
    """SD1 / SD2 / SDXL from the LoRA's metadata or its names and context widths (only for error messages)."""
    meta = lora.metadata
    version = meta.get("ss_base_model_version", "")
    spec = meta.get("modelspec.architecture", "")
    if version.startswith("sdxl") or "-xl-" in spec:
        return "SDXL"
    if version.startswith("sd_v2") or meta.get("ss_v2") == "True" or "-v2-" in spec:
        return "SD2"
    if version.startswith("sd_v1") or "-v1" in spec:
        return "SD1"
    names = lora.modules
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "SDXL"
    for name, module in names.items():
        if name.endswith("attn2_to_k"):
            width = lora.shape(module.down)[1]
            return {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(width)
    return None


def _output_dtype(key: str, dtype: str, out_dtype: str | None) -> str:
    # top-level schedule buffers (alphas_cumprod, betas, ...) keep their precision; weights get the requested one
    if out_dtype and dtype in FLOAT_DTYPES and "." in key:
        return out_dtype
    return dtype


def _title(metadata: dict[str, str], path: Path) -> str:
    return metadata.get("modelspec.title") or metadata.get("ss_output_name") or path.stem


def _metadata(source: CheckpointSource, index: CheckpointIndex, out: Path, loras: list[LoraFile], specs, precision):
    meta = {k: v for k, v in source.metadata.items() if k not in _STALE_METADATA}
    arch = meta.get("modelspec.architecture", "")
    if not arch:
        for lora in loras:
            candidate = lora.metadata.get("modelspec.architecture", "")
            if candidate.startswith(_MODELSPEC_FAMILY[index.arch]):
                arch = candidate
                break
    if not arch:
        v_prediction = index.arch == "sd2" and _yaml_says_v(source.path.with_suffix(".yaml"))
        arch = modelspec_architecture(index.arch, v_prediction, lora=False)
    meta["modelspec.architecture"] = arch.removesuffix("/lora")
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    meta["modelspec.implementation"] = IMPLEMENTATION_SGM  # any full checkpoint, as sd-scripts writes it
    meta["modelspec.title"] = out.stem
    meta["modelspec.date"] = datetime.now().isoformat(timespec="seconds")
    meta["modelspec.merged_from"] = ", ".join(
        [_title(source.metadata, source.path)] + [_title(lora.metadata, lora.path) for lora in loras]
    )
    meta["lora_train_merge"] = json.dumps({
        "model": source.path.name,
        "loras": [{"file": Path(p).name, "multiplier": m} for p, m in specs],
        "precision": precision or "as stored",
    })
    meta["format"] = "pt"
    return meta


def _yaml_says_v(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(f"parameterization: {v}" in text for v in ('"v"', "'v'", "v\n", "v\r"))


def _check_space(out: Path, needed: int) -> None:
    folder = out.parent if out.parent.exists() else _existing_parent(out.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed + _HEADROOM:
        raise BadInput(
            f"not enough disk space for {out.name}: needs {_size(needed)} + {_HEADROOM >> 20} MiB headroom, "
            f"{_size(free)} free in {folder}"
        )


_HEADROOM = 16 * 2**20


def _size(n: int) -> str:
    """MiB below 1 GiB, so that small sizes don't all read 0.01 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _write(source, out: Path, out_plan, metadata, plan, total: int, progress: Progress | None) -> None:
    done = 0
    try:
        with atomic_open(out, "wb") as fh:
            writer = StreamWriter(fh, out_plan, metadata)
            done = fh.tell()
            for item in out_plan:
                contributions = plan.get(item.key)
                if contributions:
                    writer.write_tensor(item.key, _merged_tensor(source, item, contributions))
                elif item.dtype == source.dtype(item.key):
                    writer.mark_copied(item.key, source.copy_raw(item.key, fh))
                else:
                    writer.write_tensor(item.key, source.read(item.key).to(torch_dtype(item.dtype)))
                done += item.nbytes
                if progress is not None:
                    progress(done, total)
            writer.finish()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BadInput(f"disk full while writing {out.name}; nothing was written") from None
        raise BadInput(f"could not write {out}: {exc.strerror or exc}") from None


def _merged_tensor(source, item: PlannedTensor, contributions: list[_Contribution]):
    import torch

    weight = source.read(item.key).to(torch.float32, copy=True)
    for c in contributions:
        region = weight if c.target.rows is None else weight[c.target.rows[0]:c.target.rows[1]]
        c.lora.add_to(c.module, region, c.multiplier)
    if not _all_finite(weight):
        for c in contributions:  # slow path, only on failure: name the culprit
            if not _all_finite(c.lora.delta(c.module), exact=True):
                raise IncompatibleFile(f"LoRA {c.lora.path.name}: module {c.module.name} holds NaN or infinite values")
        raise IncompatibleFile(f"merging into {item.key} gives NaN or infinite values")
    result = weight.to(torch_dtype(item.dtype))
    if item.dtype == "F16" and not _all_finite(result):
        raise IncompatibleFile(f"merging into {item.key} overflows fp16; lower the multiplier or use bf16 / fp32")
    return result


def _all_finite(tensor, exact: bool = False) -> bool:
    """NaN and inf propagate into a sum, which is much cheaper than isfinite(); a sum that overflows although every
    element is finite is settled by the exact check."""
    import torch

    if not exact and math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())

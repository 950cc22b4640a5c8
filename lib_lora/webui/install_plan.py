"""What install.py adds to the webui's environment, decided without touching it.

Why a separate module: install.py runs on every webui start, so deciding must be cheap (no torch import unless
something is missing) and testable without a webui. Installing goes through the webui's own `launch.run_pip`
with a constraints file that pins every distribution already installed, so pip can add packages but can never
upgrade, downgrade or replace torch, gradio, transformers, numpy, Pillow or anything else the webui put there.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Requirement:
    check: str  # the name handed to launch.is_installed (distribution name, falling back to import name)
    spec: str  # what pip installs
    why: str  # the feature that needs it, shown when it cannot be installed


# The tab's needs beyond the webui's own pins (requirements_versions.txt already brings torch, transformers,
# accelerate, safetensors, numpy, Pillow, gradio, huggingface_hub, omegaconf, einops).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("prodigyopt", "prodigyopt>=1.0", "the Prodigy optimizer"),
    Requirement("lion-pytorch", "lion-pytorch>=0.1", "the Lion optimizer"),
    Requirement("tomli_w", "tomli-w>=1.0", "saving settings and presets as TOML"),
)
TOMLI = Requirement("tomli", "tomli>=2.0", "reading TOML settings on Python 3.10")


def onnxruntime_requirement(cuda_version: str | None) -> Requirement:
    """onnxruntime-gpu where torch has CUDA (1.19+ is built for CUDA 12, 1.18 for CUDA 11), else the CPU build."""
    why = "WD14 tagging"
    if not cuda_version:
        return Requirement("onnxruntime", "onnxruntime>=1.16", why)
    if cuda_version.split(".")[0] == "11":
        return Requirement("onnxruntime", "onnxruntime-gpu>=1.16,<1.19", why)
    return Requirement("onnxruntime", "onnxruntime-gpu>=1.19", why)


def torch_cuda_version() -> str | None:
    """CUDA version torch was built for and can use, or None (CPU, ROCm, MPS). Imports torch: call only if needed."""
    try:
        import torch
    except ImportError:
        return None
    if getattr(torch.version, "hip", None) or not torch.cuda.is_available():
        return None
    return torch.version.cuda


def missing(is_installed: Callable[[str], bool], cuda_version: Callable[[], str | None] = torch_cuda_version,
            python: tuple[int, int] = sys.version_info[:2]) -> list[Requirement]:
    """Requirements not yet installed. `is_installed("onnxruntime")` is also true for onnxruntime-gpu."""
    todo = [r for r in REQUIREMENTS if not is_installed(r.check)]
    if python < (3, 11) and not is_installed(TOMLI.check):
        todo.append(TOMLI)
    if not is_installed("onnxruntime"):
        todo.append(onnxruntime_requirement(cuda_version()))
    return todo


def constraints_text(distributions: Iterable[importlib.metadata.Distribution] | None = None) -> str:
    """One `name==version` line per installed distribution: pip may add packages, never change these."""
    lines = set()
    for dist in distributions if distributions is not None else importlib.metadata.distributions():
        name = dist.metadata.get("Name") if dist.metadata else None
        if name and dist.version:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"

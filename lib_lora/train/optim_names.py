"""Which optimizer names we accept and what each needs, without importing torch (the tab and `validate` use it at
page load).

The names are sd-scripts' (`--optimizer_type`, matched in any letter case as sd-scripts does). Besides them, any
optimizer class by its dotted path (`torch.optim.RAdam`, `prodigyopt.Prodigy`) or a bare `torch.optim` class name
(`NAdam`), as sd-scripts' fallback allows. Schedule-free optimizers are refused: they need train / eval switching
around every preview and save, which the loop does not do.
"""

from __future__ import annotations

BNB = "bitsandbytes"
DADAPT = "dadaptation"

# name -> the package it needs (None: torch or transformers, always there)
NAMED_OPTIMIZERS: dict[str, str | None] = {
    "AdamW": None, "AdamW8bit": BNB, "Adafactor": None, "Prodigy": "prodigyopt", "Lion": "lion_pytorch",
    "SGDNesterov": None, "SGDNesterov8bit": BNB, "Lion8bit": BNB, "PagedAdamW": BNB, "PagedAdamW8bit": BNB,
    "PagedAdamW32bit": BNB, "PagedLion8bit": BNB, "AdEMAMix8bit": BNB, "PagedAdEMAMix8bit": BNB,
    "DAdaptation": DADAPT, "DAdaptAdamPreprint": DADAPT, "DAdaptAdam": DADAPT, "DAdaptAdaGrad": DADAPT,
    "DAdaptAdan": DADAPT, "DAdaptAdanIP": DADAPT, "DAdaptLion": DADAPT, "DAdaptSGD": DADAPT,
}

# pip's name where it differs from the import name
PIP_NAMES = {"lion_pytorch": "lion-pytorch"}

_BY_LOWER = {n.lower(): n for n in NAMED_OPTIMIZERS}


def canonical_optimizer(value: str) -> str:
    """'pagedadamw8bit' -> 'PagedAdamW8bit'; '' -> 'AdamW'; a class path or an unknown name is returned as given."""
    value = str(value).strip()
    if not value:
        return "AdamW"
    return _BY_LOWER.get(value.lower(), value)


def is_class_path(name: str) -> bool:
    return "." in name


def needs_cuda(name: str) -> bool:
    """bitsandbytes' optimizers run on CUDA only."""
    return NAMED_OPTIMIZERS.get(name, "") == BNB or name.split(".")[0] == BNB


def package_of(name: str) -> str | None:
    """The top-level package a name needs (a class path: its first part)."""
    if name in NAMED_OPTIMIZERS:
        return NAMED_OPTIMIZERS[name]
    return name.split(".")[0] if is_class_path(name) else None


def pip_hint(package: str) -> str:
    return f"pip install {PIP_NAMES.get(package, package)}"


def adapts_its_own_rate(name: str) -> bool:
    """Prodigy and D-Adaptation: the learning rate is a multiplier of the step size they find (about 1.0)."""
    last = name.split(".")[-1]
    return last == "Prodigy" or last.startswith("DAdapt")


def cuda_message(name: str) -> str:
    return f"optimizer_type {name} needs an NVIDIA GPU (bitsandbytes runs on CUDA only); use AdamW on this machine"


def unknown_message(name: str) -> str:
    if name.lower().endswith("schedulefree"):
        return (f"optimizer_type {name}: schedule-free optimizers are not supported (they need a train / eval switch "
                "around every preview and save)")
    return (f"optimizer_type {name!r} is not one of {', '.join(NAMED_OPTIMIZERS)}, nor a torch.optim class or a class "
            "path such as torch.optim.RAdam")

"""What a LoRA / LoCon network is made of: ranks, alphas, dropouts, which model parts it covers.

One frozen dataclass with sd-scripts' meanings (lora-format.md 2.1, 3): `dim` / `alpha` for Linear and 1x1 convs,
`conv_dim` / `conv_alpha` for kxk convs (set = "LoCon", still `networks.lora`), alpha 0 or None = alpha equals
the rank. `from_args` reads sd-scripts' `--network_args` strings so a kohya command line carries over unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping

from ..errors import BadInput

# network_args keys we understand (sd-scripts networks.lora spellings) -> field name
_ARG_FIELDS = {
    "conv_dim": "conv_dim",
    "conv_alpha": "conv_alpha",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
}


@dataclass(frozen=True)
class NetworkConfig:
    """Shape and regularisation of a kohya `networks.lora` network.

    `alpha` / `conv_alpha` of None or 0 mean "alpha = rank" (scale 1), as in sd-scripts' module constructor; the
    value written to the file is then the rank, never 0 (0 means "no effect" to every other loader).
    """

    dim: int = 4
    alpha: float | None = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    # the `--network_args` strings as given to `from_args` (sd-scripts stores these, not the parsed values); not
    # part of equality: "conv_alpha=4" and "conv_alpha=4.0" make the same network
    given_args: tuple[tuple[str, str], ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_rank("network_dim", self.dim)
        if self.conv_dim is not None:
            _check_rank("conv_dim", self.conv_dim)
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0 or value != value):
                raise BadInput(f"{name} must be a number >= 0, got {value!r}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 <= value < 1):
                raise BadInput(f"{name} must be in [0, 1), got {value!r}")
        if not (self.train_unet or self.train_text_encoder):
            raise BadInput("nothing to train: both train_unet and train_text_encoder are off")

    @property
    def is_locon(self) -> bool:
        """True when kxk convs (ResNet, down/upsamplers) get LoRA too."""
        return self.conv_dim is not None

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.dim)

    @property
    def effective_conv_alpha(self) -> float:
        if self.conv_dim is None:
            raise ValueError("no conv_dim")
        return float(self.conv_alpha) if self.conv_alpha else float(self.conv_dim)

    @classmethod
    def from_args(
        cls,
        dim: int = 4,
        alpha: float | None = 1.0,
        network_args: Iterable[str] | Mapping[str, object] = (),
        dropout: float | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
    ) -> "NetworkConfig":
        """Build from sd-scripts' options: `--network_dim`, `--network_alpha`, `--network_args k=v ...`,
        `--network_dropout`. `conv_alpha` defaults to 1.0 when `conv_dim` is given (as sd-scripts)."""
        items = network_args.items() if isinstance(network_args, Mapping) else (_split_arg(a) for a in network_args)
        values: dict[str, object] = {}
        given: dict[str, str] = {}
        for key, raw in items:
            key = key.strip()
            if key not in _ARG_FIELDS:
                raise BadInput(f"unknown network arg {key!r} (known: {', '.join(sorted(_ARG_FIELDS))})")
            values[_ARG_FIELDS[key]] = _number(key, raw, integer=key == "conv_dim")
            given[key] = raw.strip() if isinstance(raw, str) else _fmt(raw)
        if "conv_dim" in values and "conv_alpha" not in values:
            values["conv_alpha"] = 1.0
        if "conv_alpha" in values and "conv_dim" not in values:
            raise BadInput("conv_alpha was given without conv_dim")
        return cls(
            dim=dim, alpha=alpha, dropout=dropout, train_unet=train_unet, train_text_encoder=train_text_encoder,
            given_args=tuple(given.items()), **values,  # type: ignore[arg-type]
        )

    def network_args(self) -> dict[str, str]:
        """The `--network_args` of this config as sd-scripts stores them in `ss_network_args`: the strings the user
        gave to `from_args` (`conv_alpha=4` stays "4"; a defaulted conv_alpha is no arg), else, for a config built
        directly, the args a kohya user would type for it. Empty = no args (sd-scripts then writes no key)."""
        if self.given_args is not None:
            return dict(self.given_args)
        out: dict[str, str] = {}
        if self.conv_dim is not None:
            out["conv_dim"] = str(self.conv_dim)
            out["conv_alpha"] = _fmt(self.effective_conv_alpha)
        if self.rank_dropout:
            out["rank_dropout"] = _fmt(self.rank_dropout)
        if self.module_dropout:
            out["module_dropout"] = _fmt(self.module_dropout)
        return out

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def _check_rank(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{name} must be a whole number >= 1, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _split_arg(arg: str) -> tuple[str, str]:
    if "=" not in arg:
        raise BadInput(f"network arg {arg!r} is not key=value")
    key, value = arg.split("=", 1)
    return key, value


def _number(key: str, raw: object, integer: bool) -> float | int:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadInput(f"network arg {key} must be a number, got {raw!r}") from None
    if integer:
        if value != int(value):
            raise BadInput(f"network arg {key} must be a whole number, got {raw!r}")
        return int(value)
    return value


def _fmt(value: object) -> str:
    """A number as a user types it: 4 -> "4", 0.5 -> "0.5"."""
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else str(number)

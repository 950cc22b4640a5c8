"""A kohya `networks.lora` network over a model: build from targets, attach, detach, train, load.

`LoraNetwork` is an `nn.Module` whose children are the `LoraModule`s under their kohya names, so its
`state_dict()` holds exactly the keys a kohya file holds (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`)
and nothing of the base model. `apply()` / `restore()` are exact inverses; `inject()` wraps them in a context
manager that restores even when the body raises.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import IncompatibleFile
from .config import NetworkConfig
from .keys import module_names, normalise_state_dict, split_key
from .modules import ForwardPatch, LoraModule, MhaAdapter, cast_together, linear_patch
from .targets import MHA_PARTS, Target, name_aliases

_PART_OF = {name: part for name, part in (("self_attn_q_proj", "q"), ("self_attn_k_proj", "k"),
                                          ("self_attn_v_proj", "v"), ("self_attn_out_proj", "out"))}


def _mha_part(name: str) -> str:
    for suffix, part in _PART_OF.items():
        if name.endswith("_" + suffix):
            return part
    raise ValueError(f"{name}: a MultiheadAttention target must be a q/k/v/out projection")


def is_text_encoder_name(name: str) -> bool:
    return name.startswith("lora_te")


class LoraNetwork(nn.Module):
    """LoRA / LoCon modules for a list of `(kohya_name, layer)` targets.

    Ranks: Linear, 1x1 conv and MHA parts get `cfg.dim` / `cfg.alpha`; kxk convs `cfg.conv_dim` / `cfg.conv_alpha`
    (targets with a kxk conv but no conv_dim are skipped, as sd-scripts does). `ranks` overrides per module
    `{name: (rank, alpha)}` (used when loading a file whose ranks vary).
    """

    def __init__(
        self,
        targets: Iterable[Target],
        cfg: NetworkConfig | None = None,
        *,
        multiplier: float = 1.0,
        dtype: torch.dtype = torch.float32,
        ranks: Mapping[str, tuple[int, float]] | None = None,
        mha_before: Callable[[nn.Module], None] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or NetworkConfig()
        self._patches: list[ForwardPatch] = []
        self._matmul_loras: list[LoraModule] | None = None
        self._applied = False
        self._mha_before = mha_before
        # modules of the last loaded file that were left out (see `_past_the_last_te_layer`), and why
        self.skipped: list[str] = []
        for name, module in targets:
            if ranks is not None:
                if name not in ranks:
                    continue
                rank, alpha = ranks[name]
            else:
                picked = self._rank_for(module)
                if picked is None:
                    continue
                rank, alpha = picked
            part = _mha_part(name) if isinstance(module, nn.MultiheadAttention) else None
            lora = LoraModule(
                name, module, rank, alpha, part=part, dropout=self.cfg.dropout, rank_dropout=self.cfg.rank_dropout,
                module_dropout=self.cfg.module_dropout, dtype=dtype,
            )
            self.add_module(name, lora)
        self.multiplier = multiplier

    def _rank_for(self, module: nn.Module) -> tuple[int, float] | None:
        cfg = self.cfg
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
            return (cfg.conv_dim, cfg.effective_conv_alpha) if cfg.conv_dim else None
        return cfg.dim, cfg.effective_alpha

    # ------------------------------------------------------------------------------------------- access
    def loras(self) -> Iterator[LoraModule]:
        for child in self.children():
            if isinstance(child, LoraModule):
                yield child

    def names(self) -> list[str]:
        return [lora.lora_name for lora in self.loras()]

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for lora in self.loras():
            lora.multiplier = self._multiplier

    def param_groups(self, unet_lr: float | None, text_encoder_lr: float | None) -> list[dict]:
        """Optimizer parameter groups: UNet LoRA params at `unet_lr`, text-encoder ones at `text_encoder_lr`
        (None = leave the optimizer's default lr). Empty groups and lr 0 groups are left out."""
        groups = []
        for is_te, lr in ((False, unet_lr), (True, text_encoder_lr)):
            params = [p for lora in self.loras() if is_text_encoder_name(lora.lora_name) == is_te
                      for p in lora.parameters()]
            if not params or lr == 0:
                continue
            group: dict = {"params": params, "name": "text_encoder" if is_te else "unet"}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    # ---------------------------------------------------------------------------------- attach / detach
    @property
    def applied(self) -> bool:
        return self._applied

    def apply(self) -> "LoraNetwork":
        """Attach every module to its layer (idempotent). The base weights are not touched."""
        if self._applied:
            return self
        patches: list[ForwardPatch] = []
        adapters: dict[int, MhaAdapter] = {}
        for lora in self.loras():
            if lora.part is None:
                patches.append(linear_patch(lora))
                continue
            adapter = adapters.get(id(lora.target))
            if adapter is None:
                adapter = adapters[id(lora.target)] = MhaAdapter(lora.target, self._mha_before)
                patches.append(adapter.patch)
            adapter.add(lora)
        done: list[ForwardPatch] = []
        try:
            for patch in patches:
                patch.install()
                done.append(patch)
        except BaseException:
            for patch in reversed(done):
                patch.remove()
            raise
        self._patches = done
        self._applied = True
        return self

    def restore(self) -> None:
        """Detach every module (idempotent): each layer's instance `forward` is removed again."""
        if not self._applied:
            return
        errors = []
        for patch in reversed(self._patches):
            try:
                patch.remove()
            except RuntimeError as exc:
                errors.append(str(exc))
        self._patches = []
        self._applied = False
        if errors:
            raise RuntimeError(errors[0])

    @contextlib.contextmanager
    def cast_weights(self, dtype: torch.dtype | None) -> Iterator["LoraNetwork"]:
        """`with net.cast_weights(torch.bfloat16):` around a forward under autocast: the LoRA weights are cast to
        autocast's dtype once for the whole forward, with one multi-tensor copy (and their gradients back with
        another), instead of autocast casting each weight when it is used: two kernel launches per step instead of
        four per LoRA module, which is what a GPU step at batch 1 waits for. The values are those autocast would
        use. A no-op for float32 / None, outside autocast, or where torch lacks the multi-tensor copy."""
        if dtype in (None, torch.float32):
            yield self
            return
        if self._matmul_loras is None:  # the modules never change after construction: listed once, not per step
            self._matmul_loras = [lora for lora in self.loras() if lora.part is None]
        loras = self._matmul_loras
        weights = [w for lora in loras for w in (lora.lora_down.weight, lora.lora_up.weight)]
        cast = cast_together(weights, dtype) if weights and all(w.dtype == torch.float32 for w in weights) else None
        if cast is None:
            yield self
            return
        for i, lora in enumerate(loras):
            lora._cast = (dtype, cast[2 * i], cast[2 * i + 1])
        try:
            yield self
        finally:
            for lora in loras:
                lora._cast = None

    @contextlib.contextmanager
    def inject(self) -> Iterator["LoraNetwork"]:
        """`with net.inject(): ...` attaches, and restores on exit whatever happened inside."""
        self.apply()
        try:
            yield self
        finally:
            self.restore()

    # --------------------------------------------------------------------------------------- kohya files
    def load_kohya(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a kohya LoRA state dict into this network (shapes must fit; 2-D <-> 1x1 4-D is reshaped).

        Raises IncompatibleFile naming the file's modules this network does not have, or mismatched shapes.
        Modules of the network that the file lacks keep their values (a partial LoRA is fine)."""
        own = dict(self.named_children())
        aliases = name_aliases((lora.lora_name, lora.target) for lora in self.loras())
        tensors = _own_spelling(normalise_state_dict(state_dict), set(own), aliases)
        unmatched = [name for name in module_names(tensors) if name not in own]
        skipped = _past_the_last_te_layer(unmatched, set(own), tensors)
        if skipped:
            tensors = {k: v for k, v in tensors.items() if split_key(k)[0] not in skipped}
            unmatched = []
        if unmatched:
            raise IncompatibleFile(_unmatched_message(unmatched, len(module_names(tensors))))
        updates: dict[str, torch.Tensor] = {}
        bad = []
        current = self.state_dict()
        for key, value in tensors.items():
            target = current.get(key)
            if target is None:
                bad.append(f"{key} (not a LoRA tensor)")
            elif value.shape == target.shape:
                updates[key] = value
            elif value.numel() == target.numel() and _squeezable(value.shape, target.shape):
                updates[key] = value.reshape(target.shape)
            else:
                bad.append(f"{key} {tuple(value.shape)} != {tuple(target.shape)}")
        if bad:
            raise IncompatibleFile(f"LoRA shapes do not fit the model: {', '.join(bad[:5])}"
                                   + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        with torch.no_grad():
            for key, value in updates.items():
                current[key].copy_(value.to(current[key].dtype))
        for key in updates:
            name, part = split_key(key)
            if part == "alpha":
                own[name].sync_scale()  # written in place: the float scale each forward uses follows
        self.skipped = skipped

    @property
    def skip_note(self) -> str | None:
        """One line for the user when the last loaded file had modules this model never runs; None otherwise."""
        if not self.skipped:
            return None
        layers = sorted({int(m.group(1)) for m in map(_TE_LAYER.match, self.skipped) if m})
        return (f"skipped {len(self.skipped)} modules of {len(layers)} text-encoder layer "
                f"{', '.join(map(str, layers))} (the last OpenCLIP layer: SD2 reads the penultimate one, so it never "
                "runs; sd-scripts does not train it)")

    @classmethod
    def from_kohya(
        cls,
        targets: Iterable[Target],
        state_dict: Mapping[str, torch.Tensor],
        *,
        multiplier: float = 1.0,
        dtype: torch.dtype = torch.float32,
        mha_before: Callable[[nn.Module], None] | None = None,
    ) -> "LoraNetwork":
        """A network built from a kohya file's own ranks and alphas (they may vary per module), in eval mode.

        `targets` must cover the file: pass LoCon targets (a config with conv_dim) to load LoCon files. Raises
        IncompatibleFile listing the file's modules that match no target (e.g. a LoRA for another architecture)."""
        targets = list(targets)
        known = {name for name, _ in targets}
        tensors = _own_spelling(normalise_state_dict(state_dict), known, name_aliases(targets))
        names = module_names(tensors)
        unmatched = [name for name in names if name not in known]
        if _past_the_last_te_layer(unmatched, known, tensors):
            names = [name for name in names if name in known]  # load_kohya skips (and names) the others
            unmatched = []
        if unmatched:
            raise IncompatibleFile(_unmatched_message(unmatched, len(names)))
        ranks = {}
        for name in names:
            down = tensors[f"{name}.lora_down.weight"]
            alpha = tensors.get(f"{name}.alpha")
            ranks[name] = (int(down.shape[0]), float(alpha) if alpha is not None else float(down.shape[0]))
        net = cls(targets, NetworkConfig(), multiplier=multiplier, dtype=dtype, ranks=ranks, mha_before=mha_before)
        net.load_kohya(tensors)
        return net.eval()


def _own_spelling(tensors: dict[str, torch.Tensor], known: set[str], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """UNet modules named in the other spelling (diffusers names in an SDXL file, ldm names in an SD1/SD2 file) under
    the names of this network's modules, as the webui reads such files. Only when that makes every module of the
    file match: a file for another architecture keeps its own names, so the error lists them as they are."""
    if not aliases:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module, part = split_key(key)
        if module not in known and module in aliases:
            module = aliases[module]
            if f"{module}.{part}" in tensors:
                raise IncompatibleFile(f"module {module} is in the file twice (also as {split_key(key)[0]})")
        elif module not in known:
            return tensors
        out[f"{module}.{part}"] = value
    return out


_TE_LAYER = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_(.+)$")


def _past_the_last_te_layer(unmatched: list[str], known: set[str], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The file's unmatched modules when all of them belong to the one SD2 text-encoder layer right after the last
    one targeted, shaped like that layer's modules in the file; else [] (the file is refused as before).

    sd-scripts trains 23 of OpenCLIP-H's 24 layers because SD2 reads the penultimate layer; other trainers write
    layer 23 too. The webui loads such a module onto resblocks.23, which never runs, so leaving it out gives the
    webui's result while every other stray module still makes the file "not for this model"."""
    if not unmatched:
        return []
    layers = [int(m.group(1)) for m in map(_TE_LAYER.match, known) if m]
    if not layers:
        return []
    last = max(layers)
    for name in unmatched:
        match = _TE_LAYER.match(name)
        if match is None or int(match.group(1)) != last + 1:
            return []
        twin = f"lora_te_text_model_encoder_layers_{last}_{match.group(2)}"
        if twin not in known or not _same_width(tensors, name, twin):
            return []
    return sorted(unmatched)


def _same_width(tensors: Mapping[str, torch.Tensor], name: str, twin: str) -> bool:
    """Both modules' down/up tensors agree on everything but the rank (the twin must be in the file)."""
    for part, kept in (("lora_down.weight", slice(1, None)), ("lora_up.weight", slice(0, 1))):
        a, b = tensors.get(f"{name}.{part}"), tensors.get(f"{twin}.{part}")
        if a is None or b is None or tuple(a.shape[kept]) != tuple(b.shape[kept]):
            return False
    return True


def _squeezable(a: torch.Size, b: torch.Size) -> bool:
    """2-D (r, C) <-> 4-D (r, C, 1, 1): the same 1x1 LoRA written for a Linear or a 1x1 conv projection."""
    return tuple(a[:2]) == tuple(b[:2]) and all(s == 1 for s in tuple(a[2:]) + tuple(b[2:]))


def _unmatched_message(unmatched: list[str], total: int) -> str:
    shown = ", ".join(unmatched[:6])
    more = f" and {len(unmatched) - 6} more" if len(unmatched) > 6 else ""
    hint = " (a LoRA for another architecture?)" if len(unmatched) == total else ""
    return f"{len(unmatched)} of {total} LoRA modules match no layer of this model{hint}: {shown}{more}"


def inject(targets: Iterable[Target], cfg: NetworkConfig | None = None, **kwargs) -> contextlib.AbstractContextManager:
    """`with inject(targets, cfg) as net:` builds a network, attaches it and always restores the model."""
    return LoraNetwork(targets, cfg, **kwargs).inject()


__all__ = ["LoraNetwork", "inject", "is_text_encoder_name", "MHA_PARTS", "split_key"]

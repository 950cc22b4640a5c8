"""Everything a backend changes on a model for training, recorded so that `restore()` undoes it exactly.

Why a journal rather than "set it back to the usual": the webui's model arrives in a state we do not choose (eval
mode, a few instance `train` overrides from ldm, UNet weights with requires_grad left True, medvram placement) and
the Lora built-in keeps references to its module objects. So we never replace a module or a parameter object and
never write a weight; we record the prior value of every flag, attribute, instance forward and tensor placement we
touch, and put exactly those back (in reverse order, continuing past a failure so one bad step cannot leave the
rest undone).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

_MISSING = object()
CHECKPOINT_MARK = "__lora_train_checkpoint__"


class TrainingState:
    """A journal over the module trees in `roots` (modules shared between roots are recorded once)."""

    def __init__(self, roots: list[torch.nn.Module]) -> None:
        seen: dict[int, torch.nn.Module] = {}
        for root in roots:
            for module in root.modules():
                seen.setdefault(id(module), module)
        self.modules = list(seen.values())
        self.training = [(m, m.training) for m in self.modules]
        params: dict[int, torch.nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters(recurse=False):
                params.setdefault(id(p), p)
        self.params = list(params.values())
        self.grad_flags = [(p, p.requires_grad, p.grad) for p in self.params]
        self._devices: dict[int, tuple] = {}  # id -> (kind, owner, name_or_param, device)
        self._attrs: list[tuple] = []  # (obj, name, old value or _MISSING, was_in_dict)
        self._restored = False

    # ---- changes ----------------------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Base weights get no gradients and every module runs in eval mode (dropout off); LoRA trains on top."""
        for p in self.params:
            p.requires_grad_(False)
        for m in self.modules:
            m.training = False  # attribute, not .train(): ldm replaces .train with a no-op on frozen sub-models

    def set_attr(self, obj, name: str, value) -> None:
        """setattr, remembering the previous value (or its absence) for restore."""
        in_dict = name in getattr(obj, "__dict__", {})
        old = getattr(obj, name, _MISSING)
        self._attrs.append((obj, name, old, in_dict))
        setattr(obj, name, value)

    def checkpoint(self, module: torch.nn.Module) -> None:
        """Wrap `module.forward` in non-reentrant activation checkpointing (an instance attribute, removed on restore).

        Non-reentrant: parameters inside the block (the LoRA weights hooked onto its layers) receive gradients even
        when no input requires grad, which the reentrant variant silently skips."""
        if getattr(module.forward, CHECKPOINT_MARK, False):
            return
        original = module.forward

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return torch_checkpoint(original, *args, use_reentrant=False, **kwargs)
            return original(*args, **kwargs)

        setattr(forward, CHECKPOINT_MARK, True)
        self.set_attr(module, "forward", forward)

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        """module.to(device), remembering where each parameter and buffer lived before."""
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                self._devices.setdefault(id(p), ("param", None, p, p.device))
            for name, buf in sub._buffers.items():
                if buf is not None:
                    self._devices.setdefault(id(sub) * 1_000_003 + hash(name), ("buffer", sub, name, buf.device))
        module.to(device)

    # ---- undo -------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        errors: list[BaseException] = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except BaseException as exc:  # keep undoing the rest; report the first failure afterwards
                errors.append(exc)

        for obj, name, old, in_dict in reversed(self._attrs):
            attempt(_put_back, obj, name, old, in_dict)
        for kind, owner, ref, device in self._devices.values():
            attempt(_move_back, kind, owner, ref, device)
        for p, flag, grad in self.grad_flags:
            attempt(_reset_param, p, flag, grad)
        for m, flag in self.training:
            m.training = flag
        if errors:
            raise errors[0]


def _put_back(obj, name: str, old, in_dict: bool) -> None:
    if in_dict:  # it was an instance attribute: give it its old value
        setattr(obj, name, old)
        return
    if name in getattr(obj, "__dict__", {}):  # we created an instance attribute (e.g. shadowing the class's forward)
        delattr(obj, name)
    if old is not _MISSING and isinstance(getattr(type(obj), name, None), property):
        setattr(obj, name, old)  # a property (sgm's `is_trainable`): set it back through its setter


def _move_back(kind: str, owner, ref, device: torch.device) -> None:
    if kind == "param":
        if ref.device != device:
            ref.data = ref.data.to(device)
            if ref.grad is not None:
                ref.grad = ref.grad.to(device)
    else:
        buf = owner._buffers.get(ref)
        if buf is not None and buf.device != device:
            owner._buffers[ref] = buf.to(device)


def _reset_param(p: torch.nn.Parameter, flag: bool, grad) -> None:
    p.grad = grad
    p.requires_grad_(flag)

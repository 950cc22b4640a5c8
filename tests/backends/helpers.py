"""What "the model is handed back bit-exactly" means, as data a test can compare."""

from __future__ import annotations

import torch


def model_state(*roots: torch.nn.Module) -> dict:
    """Every parameter and buffer (value, dtype, device), grad flags and grads, train/eval flags, instance forwards
    and hooks of every module under `roots`."""
    tensors, flags, modes, instance, hooks = {}, {}, {}, {}, {}
    for r, root in enumerate(roots):
        for name, module in root.named_modules(remove_duplicate=False):
            key = f"{r}:{name}"
            modes[key] = module.training
            instance[key] = sorted(k for k in ("forward", "train", "is_trainable") if k in module.__dict__)
            instance[key + "#fwd"] = module.__dict__.get("forward")
            hooks[key] = (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks))
            for pname, p in module.named_parameters(recurse=False):
                tensors[f"{key}.{pname}"] = p.detach().clone()
                flags[f"{key}.{pname}"] = (p.requires_grad, p.grad is None, p.device, p.dtype, id(p))
            for bname, b in module.named_buffers(recurse=False):
                tensors[f"{key}.{bname}"] = b.detach().clone()
                flags[f"{key}.{bname}"] = (b.device, b.dtype)
    return {"tensors": tensors, "flags": flags, "modes": modes, "instance": instance, "hooks": hooks}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    for part in ("flags", "modes", "instance", "hooks"):
        diff = [k for k in before[part] if before[part][k] != after[part][k]]
        assert not diff, f"{part} differ: {diff[:5]}"


class TinyAdapter:
    """A stand-in for a LoRA layer (the network package owns the real one): a trainable low-rank delta added to a
    Linear's output by a forward hook, so a test can run a real training step and see where gradients go."""

    def __init__(self, linear: torch.nn.Linear, rank: int = 2, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.down = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=gen) * 0.1)
        self.up = torch.nn.Parameter(torch.randn(linear.out_features, rank, generator=gen) * 0.1)
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0]
        return output + (x.to(self.down.dtype) @ self.down.t() @ self.up.t()).to(output.dtype)

    def parameters(self):
        return [self.down, self.up]

    def remove(self) -> None:
        self.handle.remove()

"""One LoRA module per target layer, and how it is attached to the layer and taken off again.

`LoraModule` owns exactly the kohya tensors of one module: `lora_down.weight`, `lora_up.weight` and the 0-dim
`alpha` buffer (scale = alpha / rank). The target layer is held in a tuple, so torch never registers it as a child:
the network's `state_dict()` is the file's contents and `.to()` never touches base weights.

Attaching = setting an instance attribute `forward` on the target that calls the ORIGINAL forward for the base
path (looked up on the class at call time, so a class-level patch such as the webui's Lora extension keeps working)
and adds the LoRA branch. Detaching = deleting that attribute again: no module is replaced, no weight is written.

`nn.MultiheadAttention` (OpenCLIP text encoders) is different: its forward reads `in_proj_weight` and
`out_proj.weight` directly, so the q/k/v/out LoRAs of one layer are applied together by `MhaAdapter` as
`W + scale * up @ down` on the matching rows of the fused weight (what the webui's loader does at inference).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

MHA_SLICE = {"q": 0, "k": 1, "v": 2}


class LoraModule(nn.Module):
    """LoRA for one Linear, Conv2d (1x1 or kxk: down keeps kernel/stride/padding, up is 1x1) or one q/k/v/out part
    of a fused MultiheadAttention (`part` = 'q' | 'k' | 'v' | 'out')."""

    def __init__(
        self,
        name: str,
        target: nn.Module,
        rank: int,
        alpha: float | None,
        *,
        part: str | None = None,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.lora_name = name
        self.rank = int(rank)
        self.part = part
        self._target = (target,)  # a tuple: not a registered child, so never in state_dict / .to() / parameters()
        self.multiplier = 1.0
        self.dropout = dropout or 0.0
        self.rank_dropout = rank_dropout or 0.0
        self.module_dropout = module_dropout or 0.0
        weight = _reference_weight(target, part)
        device = weight.device if weight.device.type != "meta" else None
        kw = dict(bias=False, device=device, dtype=dtype)
        if isinstance(target, nn.Conv2d) and part is None:
            if target.groups != 1:
                raise ValueError(f"{name}: grouped convolutions are not supported")
            self.is_conv = True
            self.lora_down = nn.Conv2d(
                target.in_channels, self.rank, target.kernel_size, target.stride, target.padding, **kw
            )
            self.lora_up = nn.Conv2d(self.rank, target.out_channels, 1, 1, **kw)
        else:
            self.is_conv = False
            out_features, in_features = weight.shape[0] // (3 if part in MHA_SLICE else 1), weight.shape[1]
            self.lora_down = nn.Linear(in_features, self.rank, **kw)
            self.lora_up = nn.Linear(self.rank, out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # a fresh network changes nothing
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(self.rank), dtype=torch.float32,
                                                   device=device))

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def _factor(self) -> torch.Tensor:
        return self.alpha * (self.multiplier / self.rank)

    def _skip(self) -> bool:
        return self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout

    def branch(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA output added to the layer's output: `multiplier * alpha/rank * up(drop(down(x)))`.

        None when module dropout skips this module for the step. Dropouts act only in training mode (sd-scripts'
        order: dropout on the down output, then rank dropout with 1/(1-p) rescaling)."""
        if self.multiplier == 0 or self._skip():
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        factor = self._factor()
        if self.training and self.dropout > 0:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            mask = (torch.rand(lx.shape[0], self.rank, device=lx.device) > self.rank_dropout).to(lx.dtype)
            if self.is_conv:
                mask = mask[:, :, None, None]
            elif lx.dim() == 3:
                mask = mask[:, None, :]
            lx = lx * mask
            factor = factor / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * factor.to(lx.dtype)

    def delta_weight(self, with_dropout: bool = False) -> torch.Tensor | None:
        """`multiplier * alpha/rank * up @ down`, shaped like this module's slice of the target weight.

        With `with_dropout` (fused MHA in training) module / rank dropout apply per forward, and network dropout
        drops single down-weight entries (the weight-space analogue; see docs/lora-format.md)."""
        if self.multiplier == 0 or (with_dropout and self._skip()):
            return None
        down = self.lora_down.weight
        factor = self._factor()
        if with_dropout and self.training:
            if self.dropout > 0:
                down = F.dropout(down, p=self.dropout)
            if self.rank_dropout > 0:
                keep = (torch.rand(self.rank, device=down.device) > self.rank_dropout).to(down.dtype)
                down = down * keep.view(-1, *([1] * (down.dim() - 1)))
                factor = factor / (1.0 - self.rank_dropout)
        up = self.lora_up.weight
        delta = up.reshape(up.shape[0], self.rank) @ down.reshape(self.rank, -1)
        if self.is_conv:
            delta = delta.reshape(up.shape[0], *down.shape[1:])
        return delta * factor

    def extra_repr(self) -> str:
        return f"{self.lora_name}, rank={self.rank}, alpha={float(self.alpha)}"


def _reference_weight(target: nn.Module, part: str | None) -> torch.Tensor:
    if part is None:
        return target.weight
    if not isinstance(target, nn.MultiheadAttention):
        raise ValueError("a q/k/v/out part needs an nn.MultiheadAttention target")
    return target.out_proj.weight if part == "out" else target.in_proj_weight


# ------------------------------------------------------------------------------------- attach / detach
class ForwardPatch:
    """Instance-level `forward` override on one layer. `install` remembers a forward already set on the instance
    (another wrapper) and calls it; `remove` puts back exactly what was there before."""

    def __init__(self, module: nn.Module, call: Callable[..., object]) -> None:
        self.module = module
        self._call = call
        self._previous = None
        self._installed: Optional[Callable[..., object]] = None

    def base(self, *args, **kwargs):
        previous = self._previous
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def install(self) -> None:
        if self._installed is not None:
            return
        self._previous = self.module.__dict__.get("forward")
        call = self._call

        def forward(*args, **kwargs):
            return call(*args, **kwargs)

        forward.__lora_patch__ = self  # type: ignore[attr-defined]
        self.module.forward = forward  # type: ignore[method-assign]
        self._installed = forward

    def remove(self) -> None:
        if self._installed is None:
            return
        current = self.module.__dict__.get("forward")
        if current is not self._installed:
            raise RuntimeError(
                f"cannot detach LoRA from {type(self.module).__name__}: its forward was replaced after attaching"
            )
        if self._previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.forward = self._previous  # type: ignore[method-assign]
        self._previous = None
        self._installed = None


def linear_patch(lora: LoraModule) -> ForwardPatch:
    """Patch for a Linear / Conv2d: base output + LoRA branch of the same input."""
    patch: ForwardPatch

    def call(x, *args, **kwargs):
        out = patch.base(x, *args, **kwargs)
        extra = lora.branch(x)
        return out if extra is None else out + extra.to(out.dtype)

    patch = ForwardPatch(lora.target, call)
    return patch


class MhaAdapter:
    """Runs one `nn.MultiheadAttention` with its q/k/v/out LoRAs merged into the weights it reads.

    The computation is torch's own non-fast path (`F.multi_head_attention_forward`) with `in_proj_weight + [dq;
    dk; dv]` and `out_proj.weight + dout`, so gradients reach the LoRA weights. `before` (optional) runs on the
    module first: the webui passes its `network_apply_weights` so its own LoRA bookkeeping stays consistent.
    """

    def __init__(self, mha: nn.MultiheadAttention, before: Callable[[nn.Module], None] | None = None) -> None:
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only MultiheadAttention with a fused in_proj_weight is supported")
        self.mha = mha
        self.parts: dict[str, LoraModule] = {}
        self.before = before
        self.patch = ForwardPatch(mha, self.forward)

    def add(self, lora: LoraModule) -> None:
        self.parts[lora.part] = lora  # type: ignore[index]

    def _in_weight(self) -> torch.Tensor:
        mha = self.mha
        weight = mha.in_proj_weight
        deltas = []
        for part in ("q", "k", "v"):
            lora = self.parts.get(part)
            delta = lora.delta_weight(with_dropout=True) if lora is not None else None
            deltas.append(delta)
        if all(d is None for d in deltas):
            return weight
        d = mha.embed_dim
        filled = [
            (delta.to(weight.dtype) if delta is not None else weight.new_zeros(d, weight.shape[1])) for delta in deltas
        ]
        return weight + torch.cat(filled, 0)

    def _out_weight(self) -> torch.Tensor:
        weight = self.mha.out_proj.weight
        lora = self.parts.get("out")
        delta = lora.delta_weight(with_dropout=True) if lora is not None else None
        return weight if delta is None else weight + delta.to(weight.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        mha = self.mha
        if self.before is not None:
            self.before(mha)
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        if mha.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, self._in_weight(), mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, self._out_weight(), mha.out_proj.bias,
            training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if mha.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

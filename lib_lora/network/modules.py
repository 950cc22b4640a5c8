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
        # autocast runs nn.Linear / nn.Conv2d in its lower dtype: their input may be cast once for layer and LoRA
        self._autocast_input = part is None and isinstance(target, (nn.Linear, nn.Conv2d))
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
        self._cast: tuple | None = None  # (dtype, down, up) while LoraNetwork.cast_weights is active
        self._alpha_ref: torch.Tensor | None = None
        self._alpha_version: int | None = None
        self._alpha_value = 0.0
        self.sync_scale()

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    # ------------------------------------------------------------------------------ alpha as a Python float
    # alpha / rank is read on every forward. Reading it from the buffer (`float(alpha)`) would be a device sync on a
    # GPU and `alpha * (m / r)` two more kernels per call, so the value is kept as a float, refreshed whenever the
    # buffer is written (load_state_dict, load_kohya) or replaced; `_scale()` also notices any other in-place write
    # through the tensor's version counter, a Python attribute read.
    def sync_scale(self) -> None:
        """Re-read alpha from the buffer (one device read): after writing it in place by other means than
        load_state_dict / LoraNetwork.load_kohya, which call this themselves."""
        alpha = self._buffers["alpha"]
        self._alpha_ref = alpha
        self._alpha_version = None if alpha.is_inference() else alpha._version
        self._alpha_value = float(alpha)

    def _scale(self) -> float:
        """alpha / rank as a float, from the cache unless the buffer changed since it was read. Under torch.compile
        the cached float is used as it is (the version check would split the graph at every LoRA module); the
        compiled code is guarded on that float, so `sync_scale()` after a write recompiles with the new value."""
        if _compiling():
            return self._alpha_value / self.rank
        alpha = self._buffers["alpha"]
        if alpha is not self._alpha_ref or (self._alpha_version is not None and alpha._version != self._alpha_version):
            self.sync_scale()
        return self._alpha_value / self.rank

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_scale()

    def _apply(self, fn, *args, **kwargs):
        """`.to()` / `.cuda()` replace the buffer with a copy of the same value: keep the float without reading the
        new (maybe GPU) tensor back; a dtype change (`.half()`) rounds alpha, so that one is read again."""
        before = self._buffers["alpha"]
        fresh = before is self._alpha_ref and (self._alpha_version is None or before._version == self._alpha_version)
        out = super()._apply(fn, *args, **kwargs)
        after = self._buffers["alpha"]
        if fresh and after is not before and after.dtype == before.dtype:
            self._alpha_ref = after
            self._alpha_version = None if after.is_inference() else after._version
        return out

    @property
    def scale(self) -> float:
        return self._scale()

    def _factor(self) -> float:
        return self._scale() * self.multiplier

    def _skip(self) -> bool:
        return self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout

    # --------------------------------------------------------------------------------------------- forward
    # On a GPU a LoRA step at batch 1 is bound by the CPU launching kernels, so the forward is written for the fewest
    # operator calls: functional ops (no module calls), the factor as a Python float, the scale folded into the
    # residual add, and for Linear targets plain 2-D matmuls (no reshape / view pairs in forward and backward).
    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, down weight, up weight) as the matmuls take them. Under autocast: the input as it is (autocast
        casts it) and the weights cast for this forward by `LoraNetwork.cast_weights` when it is active for autocast's
        dtype; otherwise the input is cast to the weights' dtype when it differs."""
        down, up = self.lora_down.weight, self.lora_up.weight
        amp = _autocast_dtype(x.device.type)
        if amp is None:
            if x.dtype != down.dtype:
                x = x.to(down.dtype)
        elif self._cast is not None and self._cast[0] == amp:
            down, up = self._cast[1], self._cast[2]
        return x, down, up

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            conv = self.lora_down
            return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation)
        return F.linear(x, weight)

    def _up(self, lx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(lx, weight) if self.is_conv else F.linear(lx, weight)

    def _dropped(self, lx: torch.Tensor, factor: float) -> tuple[torch.Tensor, float]:
        """The training dropouts on the down output (sd-scripts' order: dropout, then rank dropout per sample and
        rank, its 1/(1-p) rescaling folded into the factor)."""
        if self.dropout > 0:
            lx = F.dropout(lx, p=self.dropout)
        if self.rank_dropout > 0:
            mask = (torch.rand(lx.shape[0], self.rank, device=lx.device) > self.rank_dropout).to(lx.dtype)
            if self.is_conv:
                mask = mask[:, :, None, None]
            elif lx.dim() == 3:
                mask = mask[:, None, :]
            lx = lx * mask
            factor = factor / (1.0 - self.rank_dropout)
        return lx, factor

    def _extra(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(up(drop(down(x))), factor): the unscaled LoRA output and the factor it takes."""
        x, down, up = self._weights(x)
        factor = self._factor()
        if self.training and (self.dropout > 0 or self.rank_dropout > 0):
            lx, factor = self._dropped(self._down(x, down), factor)
            return self._up(lx, up), factor
        if self.is_conv:
            return self._up(self._down(x, down), up), factor
        lx = torch.mm(x.reshape(-1, x.shape[-1]), down.t())
        return torch.mm(lx, up.t()).view(*x.shape[:-1], up.shape[0]), factor

    def branch(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA output added to the layer's output: `multiplier * alpha/rank * up(drop(down(x)))`, in the LoRA's
        dtype (or autocast's). None when module dropout skips this module for the step. Dropouts act only in training
        mode."""
        if self.multiplier == 0 or self._skip():
            return None
        extra, factor = self._extra(x)
        return extra * factor

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer and the LoRA will both see it. Under autocast a float input is cast to autocast's
        dtype here, once: the layer's own linear / conv would cast it anyway (the same values, so the layer's output
        is unchanged), and the LoRA's down projection would cast it a second time."""
        if self._autocast_input and isinstance(x, torch.Tensor) and x.is_floating_point():
            amp = _autocast_dtype(x.device.type)
            if amp is not None and x.dtype != amp and x.dtype != torch.float64:
                return x.to(amp)
        return x

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out + branch(x)`, the scale and the residual add in one `torch.add(out, extra, alpha=factor)`. When the
        LoRA's dtype differs from the layer's output (no autocast, e.g. fp16 base and fp32 LoRA) the LoRA output is
        scaled in its own dtype and cast to the output's, as `out + extra.to(out.dtype)`."""
        if self.multiplier == 0 or self._skip():
            return out
        extra, factor = self._extra(x)
        if extra.dtype != out.dtype:
            return out + (extra * factor).to(out.dtype)
        return torch.add(out, extra, alpha=factor)

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
        return f"{self.lora_name}, rank={self.rank}, alpha={self._scale() * self.rank:g}"


def _autocast_getter():
    """`device_type -> autocast dtype, or None when autocast is off there`. torch >= 2.4 has per-device-type
    functions; older torch (the webui's 2.1) has separate CPU and CUDA ones."""
    try:
        torch.is_autocast_enabled("cpu")
        torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):
        def dtype_of(device_type: str) -> torch.dtype | None:
            if device_type == "cpu":
                return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
            if device_type == "cuda":
                return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
            return None

        return dtype_of

    def dtype_of(device_type: str) -> torch.dtype | None:  # noqa: F811
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    return dtype_of


_autocast_dtype = _autocast_getter()


def _compiling_getter() -> Callable[[], bool]:
    """A function that is True while torch.compile traces: `torch.compiler.is_compiling` (torch >= 2.3), else
    `torch._utils.is_compiling` (which dynamo also reads as True), else `lambda: False` (a torch without compile)."""
    for owner in (getattr(torch, "compiler", None), getattr(torch, "_utils", None)):
        found = getattr(owner, "is_compiling", None)
        if callable(found):
            return found
    return lambda: False


_compiling = _compiling_getter()


class _CastTogether(torch.autograd.Function):
    """Casts a list of weights to one dtype with one multi-tensor copy (`torch._foreach_copy_`: a single kernel
    launch on a GPU instead of one per weight), and their gradients back the same way. The values are exactly what
    autocast's own per-weight casts give, so results do not change; only the launch count does."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [w.dtype for w in weights]
        out = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(out, list(weights))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        result: list = [None] * len(grads)
        if present:
            src = [grads[i] for i in present]
            dst = [torch.empty_like(g, dtype=ctx.dtypes[i]) for i, g in zip(present, src)]
            torch._foreach_copy_(dst, src)
            for i, g in zip(present, dst):
                result[i] = g
        return (None, *result)


def cast_together(weights: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """`weights` cast to `dtype` by one multi-tensor copy, differentiable; None where torch lacks `_foreach_copy_`
    or the weights are not all on one device (callers then let autocast cast each weight)."""
    if not weights or not hasattr(torch, "_foreach_copy_") or len({w.device for w in weights}) != 1:
        return None
    return list(_CastTogether.apply(dtype, *weights))


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
        x = lora.layer_input(x)
        return lora.add_to(patch.base(x, *args, **kwargs), x)

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

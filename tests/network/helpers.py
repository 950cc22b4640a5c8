"""Small helpers for the network tests: forwards that run on both stacks, model snapshots, twin models."""

from __future__ import annotations

import torch
from torch import nn

from tests.fixtures.diffusers_models import TEXT_HIDDEN, clip_text_config

TOKENS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70,
                       [49406, 1929, 2368, 49407] + [49407] * 73])


def openclip_forward(embedder: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Run every resblock of an ldm FrozenOpenCLIPEmbedder's tower (open_clip 2.20 is sequence-first, 3.x batch-first;
    ldm's own encode_with_transformer assumes sequence-first, so it is not used here)."""
    model = embedder.model
    x = model.token_embedding(tokens) + model.positional_embedding
    batch_first = model.transformer.resblocks[0].attn.batch_first
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=model.attn_mask)
    return x if batch_first else x.permute(1, 0, 2)


def clip_forward(embedder: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Last hidden state of an ldm FrozenCLIPEmbedder's HF CLIPTextModel."""
    return embedder.transformer(input_ids=tokens).last_hidden_state


def ldm_unet_forward(unet: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    width = 2 * TEXT_HIDDEN if arch == "sdxl" else TEXT_HIDDEN
    context = torch.randn(2, 7, width, generator=gen)
    t = torch.tensor([10, 500])
    y = torch.randn(2, 6 * 8 + TEXT_HIDDEN, generator=gen) if arch == "sdxl" else None
    return unet(x, timesteps=t, context=context, y=y)


def snapshot(*models: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Every parameter and buffer (cloned) of each model."""
    out = []
    for model in models:
        state = {f"p:{k}": v.detach().clone() for k, v in model.named_parameters()}
        state.update({f"b:{k}": v.detach().clone() for k, v in model.named_buffers()})
        out.append(state)
    return out


def assert_snapshot_equal(before: list[dict[str, torch.Tensor]], *models: nn.Module) -> None:
    after = snapshot(*models)
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        for key in old:
            assert old[key].dtype == new[key].dtype and torch.equal(old[key], new[key]), key


def instance_forwards(*models: nn.Module) -> list[str]:
    """Names of modules that carry an instance-level `forward` (there must be none outside an injection)."""
    return [name for model in models for name, module in model.named_modules() if "forward" in module.__dict__]


def hf_clip(layers: int = 2, act: str = "quick_gelu", with_projection: bool = False, seed: int = 0):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(clip_text_config(layers=layers, act=act)).eval().requires_grad_(False)


class V4Tree(nn.Module):
    """A transformers-5 CLIPTextModel under a `text_model` attribute: the module tree transformers 4 builds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_model = getattr(model, "text_model", model)


class WebuiWrapper(nn.Module):
    """The webui's hijack wrapper shape: the ldm embedder under `.wrapped`."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}

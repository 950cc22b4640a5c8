"""Model objects shaped like the webui's `shared.sd_model`, built from the tiny checkpoints (checkpoints.py).

SD1/SD2: the real ldm `LatentDiffusion` where pytorch_lightning imports (the webui stack); elsewhere a container
with LatentDiffusion's attribute layout over the same real ldm modules. SDXL: an sgm-shaped engine (sgm is not on
PyPI) over the fixtures' sgm-like UNet and ldm embedders. Then what the webui does after loading: eval(), text
embedders wrapped in hijack-style modules (`.wrapped`), their token embeddings wrapped (`EmbeddingsWithFixes`),
`alphas_cumprod_original`, type flags. Weights are loaded from the checkpoint before wrapping, as the webui does.
"""

from __future__ import annotations

import torch

from tests.fixtures import ldm_models as L


class HijackLike(torch.nn.Module):
    """The webui's FrozenCLIPEmbedderWithCustomWords & co.: holds the embedder as `.wrapped`, copies is_trainable."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")


class EmbeddingsWithFixesLike(torch.nn.Module):
    """The webui's token-embedding wrapper (textual inversion): `.wrapped` is the nn.Embedding; no `.weight`."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.fixes = None

    def forward(self, input_ids):
        self.fixes = None
        return self.wrapped(input_ids)


def _wrap_token_embedding(embedder) -> None:
    if L_is_hf(embedder):
        emb = embedder.transformer.text_model.embeddings if hasattr(embedder.transformer, "text_model") else embedder.transformer.embeddings
        emb.token_embedding = EmbeddingsWithFixesLike(emb.token_embedding)
    else:
        embedder.model.token_embedding = EmbeddingsWithFixesLike(embedder.model.token_embedding)


def L_is_hf(embedder) -> bool:
    return hasattr(embedder, "transformer") and hasattr(embedder, "tokenizer")


def disabled_train(self, mode=True):
    return self


class VaeLike(torch.nn.Module):
    """ldm AutoencoderKL's layout and encode/decode over the fixture's Encoder/Decoder."""

    def __init__(self):
        super().__init__()
        base = L.ldm_vae()
        self.encoder, self.decoder = base.encoder, base.decoder
        self.quant_conv, self.post_quant_conv = base.quant_conv, base.post_quant_conv

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class DiffusionWrapperLike(torch.nn.Module):
    """ldm DiffusionWrapper (crossattn)."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class LatentDiffusionLike(torch.nn.Module):
    """LatentDiffusion's attribute layout (where pytorch_lightning, hence ldm.models.diffusion.ddpm, is missing)."""

    def __init__(self, arch: str, parameterization: str):
        super().__init__()
        self.model = DiffusionWrapperLike(L.ldm_unet(arch))
        self.first_stage_model = VaeLike().eval()
        self.first_stage_model.train = disabled_train.__get__(self.first_stage_model)
        self.cond_stage_model = (L.clip_embedder() if arch == "sd1" else L.openclip_embedder()).eval()
        self.cond_stage_model.train = disabled_train.__get__(self.cond_stage_model)
        self.scale_factor = 0.18215
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", torch.zeros(1000))
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        for p in self.cond_stage_model.parameters():
            p.requires_grad = False

    def apply_model(self, x, t, cond):
        return self.model(x, t, c_crossattn=[cond])


def fit_state(model: torch.nn.Module, state: dict) -> dict:
    """Checkpoint keys carry `transformer.text_model.`; transformers 5's CLIPTextModel has no `text_model` level."""
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in own and ".transformer.text_model." in key:
            key = key.replace(".transformer.text_model.", ".transformer.")
        out[key] = value
    return out


def real_ldm_available() -> bool:
    try:
        import ldm.models.diffusion.ddpm  # noqa: F401  (needs pytorch_lightning, as in the webui)
    except Exception:
        return False
    return True


def build_sd_model(arch: str, state: dict, config: dict, *, real: bool | None = None):
    """SD1/SD2 model object as the webui holds it, weights from `state` (a webui-keyed checkpoint dict)."""
    parameterization = config["model"]["params"].get("parameterization", "eps")
    use_real = real_ldm_available() if real is None else real
    if use_real:
        from ldm.util import instantiate_from_config

        model = instantiate_from_config(config["model"])
    else:
        model = LatentDiffusionLike(arch, parameterization)
    missing, unexpected = model.load_state_dict(fit_state(model, state), strict=False)
    assert not unexpected, unexpected[:5]
    assert all(not k.startswith(("model.", "cond_stage_model.", "first_stage_model.")) or k.endswith("position_ids")
               for k in missing), missing[:5]
    model.eval()
    _webui_after_load(model)
    _wrap_token_embedding(model.cond_stage_model)
    model.cond_stage_model = HijackLike(model.cond_stage_model)
    model.is_sd1, model.is_sd2, model.is_sdxl = arch == "sd1", arch == "sd2", False
    return model


def _webui_after_load(model) -> None:
    model.alphas_cumprod_original = model.alphas_cumprod


# ---- SDXL (sgm-shaped) --------------------------------------------------------------------------------------------
class ConcatTimestepEmbedderNDLike(torch.nn.Module):
    """sgm ConcatTimestepEmbedderND: each number gets a sinusoidal embedding of `outdim`, concatenated."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key = outdim, input_key
        self.is_trainable = False

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(b, dims * self.outdim)


class OpenAIWrapperLike(torch.nn.Module):
    """sgm OpenAIWrapper: forward(x, t, c) with c = {"crossattn", "vector"}."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c, **kwargs):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class ConditionerLike(torch.nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)


class SgmEngineLike(torch.nn.Module):
    """sgm DiffusionEngine's layout after the webui's extend_sdxl."""

    def __init__(self, parameterization: str = "eps"):
        super().__init__()
        self.model = OpenAIWrapperLike(L.ldm_unet("sdxl"))
        cond = L.sdxl_conditioner()
        embedders = list(cond.embedders) + [
            ConcatTimestepEmbedderNDLike(8, key)
            for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        for e in embedders:  # sgm GeneralConditioner freezes non-trainable embedders this way
            e.is_trainable = False
            e.train = disabled_train.__get__(e)
            e.requires_grad_(False)
            e.eval()
        self.conditioner = ConditionerLike(embedders)
        self.first_stage_model = VaeLike().eval()
        self.scale_factor = 0.13025
        self.parameterization = parameterization
        self.alphas_cumprod = None


def build_sdxl_model(state: dict, parameterization: str = "eps"):
    from lib_lora.backends.base import scaled_linear_alphas_cumprod

    model = SgmEngineLike(parameterization)
    sgm_state = {k: v for k, v in state.items() if k != "alphas_cumprod"}
    missing, unexpected = model.load_state_dict(fit_state(model, sgm_state), strict=False)
    assert not unexpected, unexpected[:5]
    assert all(k.endswith("position_ids") for k in missing), missing[:5]
    model.eval()
    model.alphas_cumprod = scaled_linear_alphas_cumprod()
    model.alphas_cumprod_original = model.alphas_cumprod
    emb = model.conditioner.embedders
    for i in (0, 1):
        _wrap_token_embedding(emb[i])
        emb[i] = HijackLike(emb[i])
    model.cond_stage_model = model.conditioner
    model.is_sdxl, model.is_sd1, model.is_sd2 = True, False, False
    return model

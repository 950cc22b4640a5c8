"""LdmBackend over webui-shaped model objects (the real ldm LatentDiffusion on the webui stack): text encoding as the
webui does it, SDXL size conditioning, v-prediction, and a model handed back bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lib_lora.backends import Cond, LdmBackend
from lib_lora.backends.text import BOS_ID, EOS_ID
from lib_lora.errors import BadInput, IncompatibleFile

from .helpers import TinyAdapter, assert_same_state, model_state

CAPTION = "a photo of a cat, sitting on a red sofa"


def clip_ids(n_words: int = 0, text_ids=(320, 1125, 539, 320, 2368), pad=EOS_ID):
    ids = [BOS_ID, *text_ids, EOS_ID]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


def hf_core(transformer):
    return getattr(transformer, "text_model", transformer)


def test_sd1_is_read_through_the_hijack_wrapper(shared_webui_models):
    from tests.backends.webui_models import real_ldm_available

    model = shared_webui_models("sd1")
    if real_ldm_available():  # the webui stack: the very class the webui holds
        assert type(model).__module__ == "ldm.models.diffusion.ddpm" and type(model).__name__ == "LatentDiffusion"
    b = LdmBackend(model)
    assert (b.arch, b.prediction_type) == ("sd1", "epsilon")
    assert b.unet is model.model.diffusion_model
    assert b.text_encoders == {"te": model.cond_stage_model.wrapped.transformer}
    assert b.alphas_cumprod.dtype == torch.float32 and b.alphas_cumprod.shape == (1000,)
    assert b.scaling_factor == pytest.approx(0.18215)


def test_sd1_clip_skip_is_hidden_state_minus_n_with_final_norm(shared_webui_models):
    b = LdmBackend(shared_webui_models("sd1"))
    transformer = b.text_encoders["te"]
    ids = clip_ids()  # "a photo of a cat"
    with torch.no_grad():
        out = transformer(input_ids=ids, output_hidden_states=True)
        skip2 = hf_core(transformer).final_layer_norm(out.hidden_states[-2])
    c1, c2 = b.encode_prompts(["a photo of a cat"], clip_skip=1), b.encode_prompts(["a photo of a cat"], clip_skip=2)
    torch.testing.assert_close(c1.crossattn, out.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(c2.crossattn, skip2, rtol=0, atol=1e-6)
    assert (c1.crossattn - c2.crossattn).abs().max() > 1e-3


@pytest.mark.parametrize("max_tokens, length", [(75, 77), (150, 154), (225, 231)])
def test_long_captions_give_chunks_of_77(shared_webui_models, max_tokens, length):
    b = LdmBackend(shared_webui_models("sd1"))
    long = " ".join(["cat"] * 260)
    assert b.encode_prompts([long, "dog"], max_tokens=max_tokens).crossattn.shape == (2, length, 32)


def test_sd2_is_openclip_penultimate_with_ln_final_and_zero_padding(shared_webui_models):
    model = shared_webui_models("sd2")
    b = LdmBackend(model)
    assert (b.arch, b.prediction_type) == ("sd2", "v_prediction")
    oc = model.cond_stage_model.wrapped.model
    ids = clip_ids(pad=0)
    with torch.no_grad():  # by hand: embeddings, all blocks but the last, ln_final (sequence-first on open_clip 2.x)
        x = oc.token_embedding(ids) + oc.positional_embedding
        batch_first = getattr(oc.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        x = oc.transformer.resblocks[0](x, attn_mask=oc.attn_mask)
        x = x if batch_first else x.permute(1, 0, 2)
        expected = oc.ln_final(x)
    torch.testing.assert_close(b.encode_prompts(["a photo of a cat"]).crossattn, expected, rtol=0, atol=1e-5)


def _sinusoid(value: float, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.cos(value * freqs), torch.sin(value * freqs)])


def test_sdxl_cond_pooled_and_size_vector(shared_webui_models):
    model = shared_webui_models("sdxl")
    b = LdmBackend(model)
    assert (b.arch, set(b.text_encoders)) == ("sdxl", {"te1", "te2"})
    assert b.scaling_factor == pytest.approx(0.13025)
    sizes = [((96, 64), (8, 0), (64, 64))]
    cond = b.encode_prompts(["a photo of a cat"], sizes=sizes)
    assert cond.crossattn.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    assert cond.time_ids.tolist() == [[96, 64, 8, 0, 64, 64]]
    te1, te2 = model.conditioner.embedders[0].wrapped, model.conditioner.embedders[1].wrapped
    with torch.no_grad():
        h1 = te1.transformer(input_ids=clip_ids(), output_hidden_states=True).hidden_states[-2]  # no final norm
        oc = te2.model
        x = oc.token_embedding(clip_ids(pad=0)) + oc.positional_embedding
        bf = getattr(oc.transformer, "batch_first", False)
        x = x if bf else x.permute(1, 0, 2)
        pen = oc.transformer.resblocks[0](x, attn_mask=oc.attn_mask)
        last = oc.transformer.resblocks[1](pen, attn_mask=oc.attn_mask)
        pen, last = (pen, last) if bf else (pen.permute(1, 0, 2), last.permute(1, 0, 2))
        pooled = oc.ln_final(last)[0, 6] @ oc.text_projection  # EOS sits at index 6
    torch.testing.assert_close(cond.crossattn, torch.cat([h1, pen], -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled[0], pooled, rtol=0, atol=1e-5)
    vector = b.sdxl_vector(cond)
    expected = torch.cat([pooled] + [_sinusoid(v, 8) for v in (96, 64, 8, 0, 64, 64)])
    assert vector.shape == (1, 32 + 6 * 8)
    torch.testing.assert_close(vector[0], expected, rtol=0, atol=1e-5)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    other = cond.with_sizes([(64, 64, 0, 0, 64, 64)])
    assert (b.predict(lat, t, cond) - b.predict(lat, t, other)).abs().max() > 1e-4  # the sizes reach the UNet
    torch.testing.assert_close(b.predict(lat, t, Cond(cond.crossattn, cond.pooled)), b.predict(lat, t, other))


def test_v_prediction_comes_from_the_model_or_the_caller(shared_webui_models):
    assert LdmBackend(shared_webui_models("sd1"), prediction_type="v").prediction_type == "v_prediction"
    assert LdmBackend(shared_webui_models("sd2")).prediction_type == "v_prediction"
    with pytest.raises(BadInput, match="prediction type"):
        LdmBackend(shared_webui_models("sd1"), prediction_type="x0")


def test_latents_are_the_scaled_posterior_mean_or_a_seeded_sample(shared_webui_models):
    model = shared_webui_models("sd1")
    b = LdmBackend(model)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = model.first_stage_model.encode(pixels).mean * 0.18215
    torch.testing.assert_close(b.encode_images(pixels, sample=False), expected)
    a1 = b.encode_images(pixels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, b.encode_images(pixels, generator=torch.Generator().manual_seed(5)))
    assert b.decode_latents(a1).shape == (2, 3, 64, 64)


def test_refuses_inpainting_and_unknown_models(webui_model):
    model = webui_model("sd1")
    model.model.conditioning_key = "hybrid"
    with pytest.raises(IncompatibleFile, match="inpainting"):
        LdmBackend(model)
    model.model.conditioning_key = "crossattn"
    model.is_sd3 = True
    with pytest.raises(IncompatibleFile, match="SD3"):
        LdmBackend(model)


def _step(backend, adapters, train_te: bool):
    params = [p for a in adapters for p in a.parameters()]
    for p in params:
        p.grad = None
    lat = backend.encode_images(torch.zeros(2, 3, 64, 64), sample=False)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    cond = backend.encode_prompts(["a cat", "a dog"], sizes=[(64, 64, 0, 0, 64, 64)] * 2)
    pred = backend.predict(a.sqrt() * lat + (1 - a).sqrt() * noise, t, cond)
    torch.nn.functional.mse_loss(pred, noise).backward()
    torch.optim.SGD(params, lr=0.1).step()
    return [None if p.grad is None else float(p.grad.abs().sum()) for p in params]


def _adapters(backend):
    unet_linear = next(m for n, m in backend.unet.named_modules() if n.endswith("attn2.to_k"))
    te = list(backend.text_encoders.values())[-1]
    te_linear = next(m for n, m in te.named_modules() if n.endswith(("mlp.fc1", "mlp.c_fc")))
    return [TinyAdapter(unet_linear), TinyAdapter(te_linear, seed=1)]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_training_step_then_restore_is_bit_exact(webui_model, arch):
    model = webui_model(arch)
    model.model.diffusion_model.requires_grad_(True)  # as ldm builds it: restore must keep it so
    backend = LdmBackend(model)
    backend.encode_prompts(["warm up"])  # transformers 5 installs its hidden-state hooks on first use, for good
    before = model_state(model)
    flags_before = [getattr(e, "is_trainable", None) for e in getattr(getattr(model, "conditioner", None), "embedders", [])]
    adapters = _adapters(backend)
    try:
        with backend.training(train_text_encoder=True, gradient_checkpointing=True):
            assert not any(p.requires_grad for p in model.parameters())
            assert "forward" in backend.unet.middle_block.__dict__
            if arch == "sdxl":
                assert model.conditioner.embedders[1].is_trainable is True
                assert model.conditioner.embedders[1].wrapped.is_trainable is True
            grads = _step(backend, adapters, True)
        assert all(g is not None and g > 0 for g in grads), grads  # UNet and text-encoder adapters both learn
        with backend.training(train_text_encoder=False):
            grads = _step(backend, adapters, False)
        assert grads[0] > 0 and grads[2] is None and grads[3] is None
    finally:
        for a in adapters:
            a.remove()
    assert_same_state(before, model_state(model))
    assert flags_before == [getattr(e, "is_trainable", None) for e in getattr(getattr(model, "conditioner", None), "embedders", [])]


def test_restore_after_an_exception_and_ldm_checkpoint_flags(webui_model):
    model = webui_model("sd1")
    blocks = [m for m in model.model.diffusion_model.modules() if "checkpoint" in m.__dict__]
    for m in blocks:  # an old config with use_checkpoint: ldm's own checkpointing would starve LoRA of gradients
        m.checkpoint = True
    backend = LdmBackend(model)
    backend.encode_prompts(["warm up"])
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with backend.training(gradient_checkpointing=True):
            assert blocks and not any(m.checkpoint for m in blocks)
            backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([3]), backend.encode_prompts(["x"])).sum()
            raise RuntimeError("boom")
    assert all(m.checkpoint is True for m in blocks)
    assert_same_state(before, model_state(model))


def test_bf16_mixed_precision_with_fp32_adapters_runs_under_autocast(shared_webui_models, webui_model):
    """mixed_precision="bf16": the UNet and text encoder compute in bf16 under autocast while the adapters stay fp32.
    (bf16 *weights* on a CPU cannot run ldm at all: its GroupNorm32 upcasts inputs and CPU autocast does not cast
    group_norm; the webui runs fp32 on CPUs. fp16 weights are the CUDA case, where autocast covers it.)"""
    ref = LdmBackend(shared_webui_models("sd1"))
    backend = LdmBackend(webui_model("sd1"))
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300])
    expected = ref.predict(lat, t, ref.encode_prompts([CAPTION]))
    adapter = TinyAdapter(next(m for n, m in backend.unet.named_modules() if n.endswith("attn2.to_v")))
    try:
        with backend.training(mixed_precision="bf16"):
            assert backend.compute_dtype == torch.bfloat16
            with torch.autocast("cpu", enabled=False):
                cond = backend.encode_prompts([CAPTION])
            out = backend.predict(lat, t, cond)
            assert cond.crossattn.dtype == torch.float32 and out.dtype == torch.float32
            assert 0 < (out - expected).abs().max() < 0.1 * expected.abs().max()  # bf16 compute, close to fp32
            out.pow(2).mean().backward()
        assert adapter.down.dtype == torch.float32 and adapter.down.grad.abs().sum() > 0
        assert backend.compute_dtype is None  # restored: plain fp32 again
    finally:
        adapter.remove()


def test_offloaded_vae_and_text_encoders_come_back(webui_model):
    model = webui_model("sd1")
    backend = LdmBackend(model)
    with backend.training():
        backend.offload_vae()
        backend.offload_text_encoders()
        assert backend.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8)  # still usable
    with pytest.raises(BadInput, match="prepare_for_training"):
        backend.offload_vae()


def test_webui_path_imports_neither_diffusers_nor_webui_modules():
    from tests.fixtures.handback import assert_imports_none_of

    code = (
        "import lib_lora.backends as b\n"
        "from lib_lora.backends import LdmBackend, Cond, generate\n"
        "import lib_lora.backends.ldm_backend, lib_lora.backends.sampling, lib_lora.backends.text\n"
    )
    assert_imports_none_of(code, ("diffusers", "modules"), timeout=120)

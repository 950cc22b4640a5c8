"""DiffusersBackend over a tiny diffusers SD1 folder: what it computes equals the hand computation with the parts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lib_lora.backends import Cond, DiffusersBackend  # noqa: E402
from lib_lora.backends.base import scaled_linear_alphas_cumprod  # noqa: E402
from lib_lora.errors import BadInput  # noqa: E402

from .helpers import TinyAdapter, assert_same_state, model_state  # noqa: E402

CAPTION = "a photo of a cat, sitting on a red sofa"


@pytest.fixture(scope="module")
def sd1(sd1_diffusers_dir):
    return DiffusersBackend.from_pretrained(sd1_diffusers_dir)


def ids77(tokenizer, text):
    return tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_folder_loads_as_sd1_epsilon(sd1):
    assert (sd1.arch, sd1.prediction_type) == ("sd1", "epsilon")
    assert set(sd1.text_encoders) == {"te"} and sd1.text_encoders["te"] is sd1.text_encoder
    ac = sd1.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.allclose(ac, scaled_linear_alphas_cumprod(), atol=1e-7)
    assert abs(float(ac[0]) - 0.99915) < 1e-5 and float(ac[-1]) < 0.005
    assert sd1.scaling_factor == pytest.approx(0.18215)


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BadInput, match="model_index.json"):
        DiffusersBackend.from_pretrained(tmp_path)
    with pytest.raises(BadInput, match="model not found"):
        DiffusersBackend.load(tmp_path / "nope.safetensors")


def test_prompt_states_equal_the_text_encoder_with_clip_skip(sd1):
    te, tok = sd1.text_encoder, sd1.tokenizer
    with torch.no_grad():
        out = te(input_ids=ids77(tok, CAPTION), output_hidden_states=True)
        final_norm = getattr(te, "text_model", te).final_layer_norm
        skip2 = final_norm(out.hidden_states[-2])
    c1 = sd1.encode_prompts([CAPTION], clip_skip=1)
    c2 = sd1.encode_prompts([CAPTION], clip_skip=2)
    assert c1.crossattn.shape == (1, 77, 32) and c1.pooled is None
    torch.testing.assert_close(c1.crossattn, out.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(c2.crossattn, skip2, rtol=0, atol=1e-6)
    assert (c1.crossattn - c2.crossattn).abs().max() > 1e-3


def test_long_captions_become_77_token_chunks_encoded_separately(sd1):
    long = " ".join(["cat"] * 100 + ["dog"] * 100)  # 200 tokens
    for max_tokens, length in ((75, 77), (150, 154), (225, 231)):
        assert sd1.encode_prompts([long], max_tokens=max_tokens).crossattn.shape == (1, length, 32)
    c = sd1.encode_prompts([long], max_tokens=150).crossattn
    with torch.no_grad():
        first = sd1.text_encoder(input_ids=ids77(sd1.tokenizer, " ".join(["cat"] * 75))).last_hidden_state
        second = sd1.text_encoder(input_ids=ids77(sd1.tokenizer, " ".join(["cat"] * 25 + ["dog"] * 50))).last_hidden_state
    torch.testing.assert_close(c[:, :77], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(c[:, 77:], second, rtol=0, atol=1e-6)
    # beyond max_tokens the caption is truncated: 300 tokens at 225 = the first 225 tokens
    longer = long + " " + " ".join(["bird"] * 100)
    torch.testing.assert_close(sd1.encode_prompts([longer], max_tokens=225).crossattn,
                               sd1.encode_prompts([long + " bird" * 25], max_tokens=225).crossattn)
    # a short caption in a long batch gets an empty chunk, and the batch shares one length
    batch = sd1.encode_prompts(["cat", long], max_tokens=225)
    assert batch.crossattn.shape == (2, 231, 32)
    torch.testing.assert_close(batch.crossattn[0, :77], sd1.encode_prompts(["cat"]).crossattn[0])


def test_latents_are_the_scaled_vae_mean_or_a_seeded_sample(sd1):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = sd1.vae.encode(pixels).latent_dist.mean
    lat = sd1.encode_images(pixels, sample=False)
    assert lat.shape == (2, 4, 8, 8) and lat.dtype == torch.float32
    torch.testing.assert_close(lat, mean * 0.18215)
    a = sd1.encode_images(pixels, generator=torch.Generator().manual_seed(3))
    b = sd1.encode_images(pixels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, lat)


def test_predict_is_the_unet_output(sd1):
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 700])
    cond = sd1.encode_prompts([CAPTION, "a dog"])
    with torch.no_grad():
        expected = sd1.unet(noisy, t, encoder_hidden_states=cond.crossattn).sample
    torch.testing.assert_close(sd1.predict(noisy, t, cond), expected)
    assert isinstance(Cond.cat([cond[0], cond[1]]), Cond)


def _train_step(backend, adapters, captions=("a cat", "a dog")):
    params = [p for a in adapters for p in a.parameters()]
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=1e-2)
    latents = backend.encode_images(torch.zeros(2, 3, 64, 64), sample=False)
    noise = torch.randn_like(latents)
    t = torch.tensor([100, 800])
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = backend.predict(noisy, t, backend.encode_prompts(list(captions)))
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    grads = [None if p.grad is None else p.grad.abs().sum().item() for p in params]
    opt.step()
    return grads


def test_training_step_trains_only_the_adapters_and_restore_is_bit_exact(sd1_diffusers_dir):
    backend = DiffusersBackend.from_pretrained(sd1_diffusers_dir)
    backend.unet.requires_grad_(True)  # as ldm leaves its UNet: restore must keep whatever we were given
    backend.unet.down_blocks[0].train()
    roots = backend._roots()
    backend.encode_prompts(["warm up"])  # transformers 5 adds its hidden-state capture hooks on first use, for good
    before = model_state(*roots)
    unet_linear = backend.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    te_linear = backend.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj") if not hasattr(
        backend.text_encoder, "text_model") else backend.text_encoder.text_model.encoder.layers[0].self_attn.q_proj
    adapters = [TinyAdapter(unet_linear), TinyAdapter(te_linear, seed=1)]
    try:
        with backend.training(train_text_encoder=True, gradient_checkpointing=True):
            assert not any(p.requires_grad for r in roots for p in r.parameters())
            assert not any(m.training for r in roots for m in r.modules())
            assert "forward" in backend.unet.mid_block.__dict__  # checkpoint wrapper installed
            grads = _train_step(backend, adapters)
        assert all(g is not None and g > 0 for g in grads), grads  # both adapters learn, through checkpointed blocks
        with backend.training(train_text_encoder=False):
            grads = _train_step(backend, adapters)
        assert grads[0] > 0 and grads[2] is None  # text encoder frozen: no graph through it
    finally:
        for a in adapters:
            a.remove()
    assert_same_state(before, model_state(*roots))
    assert "forward" not in backend.unet.mid_block.__dict__


def test_restore_after_an_exception_mid_step(sd1_diffusers_dir):
    backend = DiffusersBackend.from_pretrained(sd1_diffusers_dir)
    roots = backend._roots()
    backend.encode_prompts(["warm up"])  # transformers 5 adds its hidden-state capture hooks on first use, for good
    before = model_state(*roots)
    with pytest.raises(RuntimeError, match="boom"):
        with backend.training(train_text_encoder=True, gradient_checkpointing=True, mixed_precision="bf16"):
            pred = backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([3]), backend.encode_prompts(["x"]))
            pred.sum()
            raise RuntimeError("boom")
    assert_same_state(before, model_state(*roots))
    backend.restore()  # idempotent
    with pytest.raises(BadInput, match="already prepared"):
        backend.prepare_for_training()
        backend.prepare_for_training()
    backend.restore()


def test_sample_gives_seeded_images(sd1):
    a = sd1.sample("a cat", steps=3, width=64, height=64, seed=7)
    b = sd1.sample("a cat", steps=3, width=64, height=64, seed=7, sampler="ddim")
    assert len(a) == 1 and a[0].size == (64, 64)
    assert list(a[0].getdata()) == list(sd1.sample("a cat", steps=3, width=64, height=64, seed=7)[0].getdata())
    assert list(a[0].getdata()) != list(b[0].getdata())
    with pytest.raises(BadInput, match="sampler"):
        sd1.sample("a cat", steps=2, width=64, height=64, sampler="plms")


def test_bf16_base_weights_with_fp32_adapter(sd1_diffusers_dir, sd1):
    backend = DiffusersBackend.from_pretrained(sd1_diffusers_dir, dtype="bf16")
    assert backend.unet.dtype == torch.bfloat16 and backend.vae.dtype == torch.float32
    assert backend.compute_dtype == torch.bfloat16
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300])
    cond = backend.encode_prompts([CAPTION])
    out = backend.predict(lat, t, cond)
    expected = sd1.predict(lat, t, sd1.encode_prompts([CAPTION]))
    assert out.dtype == torch.float32 and 0 < (out - expected).abs().max() < 0.1 * expected.abs().max()
    adapter = TinyAdapter(backend.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v)
    try:
        with backend.training():
            backend.predict(lat, t, cond).pow(2).mean().backward()
        assert adapter.down.dtype == torch.float32 and adapter.down.grad.abs().sum() > 0
    finally:
        adapter.remove()


def test_sd2_components_report_v_prediction_and_pad_with_zero(sd2_components):
    backend = DiffusersBackend(**sd2_components)
    assert (backend.arch, backend.prediction_type) == ("sd2", "v_prediction")
    ids = ids77(backend.tokenizer, "a photo of a cat")
    ids[0, 7:] = 0  # OpenCLIP-style padding after the EOS at index 6
    with torch.no_grad():
        expected = backend.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(backend.encode_prompts(["a photo of a cat"]).crossattn, expected, rtol=0, atol=1e-6)


def test_sdxl_components_two_encoders_pooled_and_size_ids(sdxl_components):
    backend = DiffusersBackend(**sdxl_components)
    assert (backend.arch, set(backend.text_encoders)) == ("sdxl", {"te1", "te2"})
    ids1 = ids77(backend.tokenizer, "a photo of a cat")
    ids2 = ids1.clone()
    ids2[0, 7:] = 0
    with torch.no_grad():
        h1 = backend.text_encoder(input_ids=ids1, output_hidden_states=True).hidden_states[-2]
        out2 = backend.text_encoder_2(input_ids=ids2, output_hidden_states=True)
    cond = backend.encode_prompts(["a photo of a cat"], sizes=[((96, 64), (8, 0), (64, 64))])
    torch.testing.assert_close(cond.crossattn, torch.cat([h1, out2.hidden_states[-2]], -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, out2.text_embeds, rtol=0, atol=1e-6)
    assert cond.time_ids.tolist() == [[96, 64, 8, 0, 64, 64]]
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    with torch.no_grad():
        expected = backend.unet(lat, t, encoder_hidden_states=cond.crossattn, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
    torch.testing.assert_close(backend.predict(lat, t, cond), expected)
    default = backend.predict(lat, t, Cond(cond.crossattn, cond.pooled))  # no sizes: 64x64, no crop
    torch.testing.assert_close(default, backend.predict(lat, t, cond.with_sizes((64, 64, 0, 0, 64, 64))))
    assert (default - expected).abs().max() > 1e-5
    with pytest.raises(BadInput, match="6 numbers"):
        cond.with_sizes([(64, 64)])

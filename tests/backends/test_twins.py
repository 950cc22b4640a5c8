"""The same checkpoint seen by both backends: the webui's ldm/sgm object (LdmBackend) and the diffusers conversion
of the single file (DiffusersBackend) give the same latents, conditioning and prediction for SD1, SD2 (v) and SDXL."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lib_lora.backends import LdmBackend  # noqa: E402

CAPTIONS = ["a photo of a cat, " * 30, "a dog"]  # 150+ tokens: two chunks, comma back-tracking
SIZES = [((96, 64), (8, 0), (64, 64)), ((64, 64), (0, 0), (64, 64))]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_both_backends_compute_the_same(arch, shared_webui_models, single_file_backends):
    ldm, dif = LdmBackend(shared_webui_models(arch)), single_file_backends(arch)
    assert (ldm.arch, ldm.prediction_type) == (dif.arch, dif.prediction_type)
    assert dif.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    torch.testing.assert_close(ldm.alphas_cumprod, dif.alphas_cumprod, rtol=0, atol=1e-7)
    assert ldm.scaling_factor == pytest.approx(dif.scaling_factor)

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = ldm.encode_images(pixels, sample=False)
    torch.testing.assert_close(lat, dif.encode_images(pixels, sample=False), rtol=1e-4, atol=1e-5)
    seeded = [b.encode_images(pixels, generator=torch.Generator().manual_seed(9)) for b in (ldm, dif)]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=1e-4, atol=1e-5)

    for clip_skip in (1, 2):
        c_ldm = ldm.encode_prompts(CAPTIONS, clip_skip=clip_skip, max_tokens=150, sizes=SIZES)
        c_dif = dif.encode_prompts(CAPTIONS, clip_skip=clip_skip, max_tokens=150, sizes=SIZES)
        assert c_ldm.crossattn.shape == (2, 154, 64 if arch == "sdxl" else 32)
        torch.testing.assert_close(c_ldm.crossattn, c_dif.crossattn, rtol=1e-4, atol=1e-5)
        if arch == "sdxl":
            torch.testing.assert_close(c_ldm.pooled, c_dif.pooled, rtol=1e-4, atol=1e-5)
            assert torch.equal(c_ldm.time_ids, c_dif.time_ids)

    t = torch.tensor([20, 850])
    pred_ldm = ldm.predict(lat, t, c_ldm)
    torch.testing.assert_close(pred_ldm, dif.predict(lat, t, c_ldm), rtol=1e-4, atol=1e-5)
    assert pred_ldm.abs().mean() > 0.05  # a real signal, not two zeros


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_previews_match_across_backends(arch, shared_webui_models, single_file_backends):
    ldm, dif = LdmBackend(shared_webui_models(arch)), single_file_backends(arch)
    a = ldm.sample("a cat", steps=2, width=64, height=64, seed=3)[0]
    b = dif.sample("a cat", steps=2, width=64, height=64, seed=3)[0]
    diff = max(abs(x - y) for pa, pb in zip(a.getdata(), b.getdata()) for x, y in zip(pa, pb))
    assert diff <= 2

"""The fixtures themselves: the offline tokenizer is CLIP's, and the tiny models run and differ from zero."""

import torch


def test_tokenizer_is_clips(clip_tokenizer):
    ids = clip_tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer) == 49408


def test_tiny_sd1_runs(sd1_components, clip_tokenizer):
    unet, vae, te = sd1_components["unet"], sd1_components["vae"], sd1_components["text_encoder"]
    ids = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = te(ids)[0]
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        out = unet(latents, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert latents.shape == (1, 4, 8, 8)
    assert out.shape == (1, 4, 8, 8) and out.abs().sum() > 0


def test_tiny_sdxl_runs(sdxl_components, clip_tokenizer):
    c = sdxl_components
    ids = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = c["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        o2 = c["text_encoder_2"](ids, output_hidden_states=True)
        ctx = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = c["unet"](torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 8, 8)

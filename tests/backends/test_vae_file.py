"""A separate VAE (`--vae`): an ldm-named .safetensors / .ckpt file or a diffusers folder replaces the model's VAE
in DiffusersBackend, for latents and previews; anything else is refused with one line."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lib_lora.backends import DiffusersBackend  # noqa: E402
from lib_lora.backends.convert import vae_to_diffusers, vae_to_ldm  # noqa: E402
from lib_lora.errors import LoraTrainError  # noqa: E402
from tests.fixtures.vae_files import ldm_vae_state, tiny_ldm_shaped_vae, write_vae_file  # noqa: E402


@pytest.fixture(scope="module")
def ref_vae():
    return tiny_ldm_shaped_vae(seed=7)


@pytest.fixture(scope="module")
def vae_file(ref_vae, tmp_path_factory):
    # stored in fp16 (as many VAE files are): the loaded VAE must still run in the run's dtype
    return write_vae_file(ref_vae, tmp_path_factory.mktemp("vae") / "tiny-vae.safetensors", dtype=torch.float16)


def _pixels(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1


def _ref_latents(vae, pixels, scaling=0.18215):
    ref = tiny_ldm_shaped_vae(seed=7)  # the same weights rounded through fp16, as the file holds them
    ref.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})
    with torch.no_grad():
        return ref.encode(pixels).latent_dist.mean * scaling, ref


def test_vae_names_round_trip(ref_vae):
    state = ref_vae.state_dict()
    ldm = vae_to_ldm(state, 4)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.3.block.0.conv1.weight" in ldm
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    back = vae_to_diffusers(ldm, 4)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_a_vae_file_replaces_the_models_vae(sd1_diffusers_dir, ref_vae, vae_file):
    plain = DiffusersBackend.load(sd1_diffusers_dir)
    backend = DiffusersBackend.load(sd1_diffusers_dir, vae=vae_file)
    assert backend.vae is not plain.vae and next(backend.vae.parameters()).dtype == torch.float32
    assert backend.vae_name == "tiny-vae.safetensors" and backend.vae_id != plain.vae_id
    assert backend.scaling_factor == plain.scaling_factor
    pixels = _pixels()
    want, ref = _ref_latents(ref_vae, pixels)
    got = backend.encode_images(pixels, sample=False)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain.encode_images(pixels, sample=False), atol=1e-2)
    with torch.no_grad():
        decoded = ref.decode(want / 0.18215).sample.clamp(-1, 1)
    assert torch.allclose(backend.decode_latents(want), decoded, atol=1e-5)
    image = backend.sample("a cat", steps=2, width=64, height=64, seed=1)[0]
    assert image.size == (64, 64)
    # the UNet and text encoder are the model's own
    assert all(torch.equal(a, b) for a, b in zip(backend.unet.state_dict().values(), plain.unet.state_dict().values()))


def test_ckpt_full_checkpoint_and_folders(sd1_diffusers_dir, ref_vae, vae_file, tmp_path):
    pixels = _pixels(1)
    want = DiffusersBackend.load(sd1_diffusers_dir, vae=vae_file).encode_images(pixels, sample=False)
    ckpt = write_vae_file(ref_vae, tmp_path / "vae.ckpt", dtype=torch.float16)
    full = write_vae_file(ref_vae, tmp_path / "whole-model.safetensors", dtype=torch.float16, prefix="first_stage_model.")
    folder = tmp_path / "vae-folder"
    half = tiny_ldm_shaped_vae(seed=7)
    half.load_state_dict({k: v.half().float() for k, v in ref_vae.state_dict().items()})
    half.save_pretrained(str(folder))
    for given in (ckpt, full, folder):
        got = DiffusersBackend.load(sd1_diffusers_dir, vae=given).encode_images(pixels, sample=False)
        assert torch.allclose(got, want, atol=1e-6), given
    # a whole diffusers model folder: its vae/ is used
    own = DiffusersBackend.load(sd1_diffusers_dir)
    via = DiffusersBackend.load(sd1_diffusers_dir, vae=sd1_diffusers_dir)
    assert torch.equal(via.encode_images(pixels, sample=False), own.encode_images(pixels, sample=False))


def test_the_vae_dtype_follows_the_run(sd1_diffusers_dir, vae_file):
    backend = DiffusersBackend.load(sd1_diffusers_dir, vae=vae_file, vae_dtype="bf16")
    assert {p.dtype for p in backend.vae.parameters()} == {torch.bfloat16}
    assert backend.encode_images(_pixels(), sample=False).dtype == torch.float32


def test_what_is_not_a_fitting_vae_is_one_line(sd1_diffusers_dir, tmp_path):
    from safetensors.torch import save_file

    cases = {}
    lora = tmp_path / "a-lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)}, str(lora))
    cases[lora] = "is not a VAE"
    wide = tmp_path / "eight-channel.safetensors"
    save_file(ldm_vae_state(tiny_ldm_shaped_vae(latent_channels=8)), str(wide))
    cases[wide] = "8 latent channels"
    three = tmp_path / "three-levels.safetensors"
    save_file(ldm_vae_state(tiny_ldm_shaped_vae(levels=3)), str(three))
    cases[three] = "1/4"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 40)
    cases[broken] = "broken.safetensors"
    cut = dict(ldm_vae_state(tiny_ldm_shaped_vae()))
    cut.pop("decoder.conv_out.weight")
    truncated = tmp_path / "missing-key.safetensors"
    save_file(cut, str(truncated))
    cases[truncated] = "missing-key.safetensors"
    cases[tmp_path / "nowhere.safetensors"] = "not found"
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    cases[empty_folder] = "no config.json"
    cases[sd1_diffusers_dir / "unet"] = "is not a VAE folder: its config.json is for UNet2DConditionModel"
    for path, words in cases.items():
        with pytest.raises(LoraTrainError) as info:
            DiffusersBackend.load(sd1_diffusers_dir, vae=path)
        msg = str(info.value)
        assert words in msg and "\n" not in msg, (path, msg)
        assert str(path.name) in msg, (path, msg)

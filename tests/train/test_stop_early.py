"""A stop (Ctrl-C, the tab's Interrupt) honoured during the long stretches without optimizer steps: latent caching
and preview rendering. Tiny real SD1 models; the backend is wrapped only to press "stop" at the chosen moment."""

from __future__ import annotations

import pytest

from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Done, Interrupted, Sample, Saved, StepEnd, TrainControl
from lib_lora.train.loop import call_with_known
from tests.fixtures.handback import model_snapshot, same_model
from tests.fixtures.images import make_dataset
from tests.fixtures.training import run_training

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def components(clip_tokenizer):
    from tests.fixtures.diffusers_models import build_components

    return build_components("sd1", clip_tokenizer, seed=3)


def _stopping_backend(components, control: TrainControl, *, encodes_before_stop=None, samples_before_stop=None):
    """A real DiffusersBackend that presses stop after its n-th VAE encode or n-th preview image."""
    from lib_lora.backends import DiffusersBackend

    class Stopping(DiffusersBackend):
        encodes = samples = 0

        def encode_images(self, pixels, *, sample=True, generator=None):
            out = super().encode_images(pixels, sample=sample, generator=generator)
            Stopping.encodes += 1
            if encodes_before_stop is not None and Stopping.encodes == encodes_before_stop:
                control.stop()
            return out

        def sample(self, *args, **kwargs):
            out = call_with_known(super().sample, **kwargs)
            Stopping.samples += 1
            if samples_before_stop is not None and Stopping.samples == samples_before_stop:
                control.stop()
            return out

    c = components
    return Stopping(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], scheduler=c["scheduler"], device="cpu")


def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(data_dir), output_dir=str(tmp_path / "out"), output_name="tiny", resolution="64",
                network_dim=4, network_alpha=4.0, learning_rate=2e-3, train_batch_size=2, max_train_epochs=2, seed=7,
                save_precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_stop_while_caching_latents_ends_before_training_and_keeps_the_cached_files(tmp_path, components):
    data_dir = make_dataset(tmp_path / "img", {"mychar": 2, "style": 1}, per_concept=3)  # 6 images: 3 VAE batches
    before = {name: model_snapshot(components[name]) for name in ("unet", "vae", "text_encoder")}
    control = TrainControl()
    backend = _stopping_backend(components, control, encodes_before_stop=1)
    events = run_training(_cfg(tmp_path, data_dir, cache_latents_to_disk=True), backend, control)

    assert type(backend).encodes == 1, "caching went on after the stop"
    last = events[-1]
    assert isinstance(last, Interrupted) and last.step == 0 and last.state_path == ""
    assert "caching latents" in last.message and "nothing was trained" in last.message
    assert not [e for e in events if isinstance(e, (StepEnd, Saved))]
    assert not list((tmp_path / "out").glob("*.safetensors"))
    assert len(list(data_dir.rglob("*.latents.npz"))) == 2  # the first batch's latents stay for the next run
    assert all(same_model(before[n], model_snapshot(components[n])) for n in before)

    # the next run reuses those two and encodes only the other four images (2 batches)
    again = _stopping_backend(components, TrainControl())
    events = run_training(_cfg(tmp_path, data_dir, cache_latents_to_disk=True, max_train_epochs=1), again)
    assert isinstance(events[-1], Done) and type(again).encodes == 2


def test_stop_during_previews_ends_after_the_current_image_with_the_epoch_saved(tmp_path, components):
    data_dir = make_dataset(tmp_path / "img", {"mychar": 2, "style": 1}, per_concept=3)
    before = {name: model_snapshot(components[name]) for name in ("unet", "vae", "text_encoder")}
    control = TrainControl()
    backend = _stopping_backend(components, control, samples_before_stop=1)
    cfg = _cfg(tmp_path, data_dir, save_every_n_epochs=1, sample_every_n_epochs=1, cache_latents=True,
               sample_prompts=("mychar --w 64 --h 64 --s 2", "style --w 64 --h 64 --s 2", "mychar --w 64 --h 64 --s 3"))
    events = run_training(cfg, backend, control)

    assert type(backend).samples == 1, "previews went on after the stop"
    samples = [e for e in events if isinstance(e, Sample)]
    assert len(samples) == 1 and len(samples[0].paths) == 1 and samples[0].epoch == 1
    last = events[-1]
    steps_per_epoch = max(e.step for e in events if isinstance(e, StepEnd))
    assert isinstance(last, Interrupted) and last.step == steps_per_epoch
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["tiny-01.safetensors"]
    state = tmp_path / "out" / "tiny-state"
    assert last.state_path == str(state) and state.is_dir()
    assert all(same_model(before[n], model_snapshot(components[n])) for n in before)


def test_stop_during_step_previews_ends_after_the_current_image_at_that_step(tmp_path, components):
    data_dir = make_dataset(tmp_path / "img", {"mychar": 1}, per_concept=2)  # 2 images, batch 2: a step per epoch
    control = TrainControl()
    backend = _stopping_backend(components, control, samples_before_stop=1)
    cfg = _cfg(tmp_path, data_dir, max_train_epochs=3, sample_every_n_steps=1,
               sample_prompts=("mychar --w 64 --h 64 --s 2", "mychar --w 64 --h 64 --s 3"))
    events = run_training(cfg, backend, control)
    assert type(backend).samples == 1
    assert [len(e.paths) for e in events if isinstance(e, Sample)] == [1]
    assert isinstance(events[-1], Interrupted) and events[-1].step == 1 and (tmp_path / "out" / "tiny-state").is_dir()

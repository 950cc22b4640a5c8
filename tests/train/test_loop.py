"""The training loop end to end on tiny real models: it learns, saves, resumes exactly, pauses, validates, fails
cleanly, and always gives the model back bit-exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lib_lora.train.config import TrainConfig
from lib_lora.train.events import (
    Continued, Done, DryRun, EpochEnd, Failed, Interrupted, Note, Paused, Sample, Saved, Started, StepEnd, TrainControl, Validation,
)
from lib_lora.train.loop import train
from lib_lora.train.state import build_dataset
from tests.fixtures.images import make_dataset, pattern_image
from tests.fixtures.training import at_step, run_training

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def components(clip_tokenizer):
    from tests.fixtures.diffusers_models import build_components

    return build_components("sd1", clip_tokenizer, seed=3)


def _backend(components, cls=None):
    from lib_lora.backends import DiffusersBackend

    cls = cls or DiffusersBackend
    c = components
    return cls(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], scheduler=c["scheduler"], device="cpu")


@pytest.fixture()
def backend(components):
    return _backend(components)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "img", {"mychar": 2, "style": 1}, per_concept=3)


def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(data_dir), output_dir=str(tmp_path / "out"), output_name="tiny", resolution="64",
                network_dim=4, network_alpha=4.0, learning_rate=2e-3, train_batch_size=2, max_train_epochs=2, seed=7,
                save_precision="fp32", cache_latents=True)
    base.update(kw)
    return TrainConfig(**base)


def _snapshot(components):
    """Everything restore must give back: tensors, grad flags, train modes, no instance-level forward."""
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        mod = components[name]
        out[name] = (
            {k: v.clone() for k, v in mod.state_dict().items()},
            [p.requires_grad for p in mod.parameters()],
            [m.training for m in mod.modules()],
            sum("forward" in vars(m) for m in mod.modules()),
        )
    return out


def _assert_same(a, b):
    for name in a:
        sa, sb = a[name], b[name]
        assert sa[0].keys() == sb[0].keys()
        assert all(torch.equal(sa[0][k], sb[0][k]) for k in sa[0]), f"{name} weights changed"
        assert sa[1:] == sb[1:], f"{name} grad flags / modes / hooks changed"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_lowers_the_loss_on_a_fixed_eval_set(tmp_path, data_dir, backend, components):
    before = _snapshot(components)
    cfg = _cfg(tmp_path, data_dir, validation_data_dir=str(data_dir), max_train_epochs=8, learning_rate=1e-2,
               network_dim=8, network_alpha=8.0, save_every_n_epochs=8)
    events = run_training(cfg, backend)
    vals = [e for e in events if isinstance(e, Validation)]
    assert [v.epoch for v in vals] == list(range(0, 9)) and vals[0].images == 6
    assert vals[-1].loss <= 0.7 * vals[0].loss, [round(v.loss, 4) for v in vals]
    done = events[-1]
    assert isinstance(done, Done) and done.best_epoch is not None
    _assert_same(before, _snapshot(components))


def test_epoch_files_names_metadata_and_log(tmp_path, data_dir, backend):
    cfg = _cfg(tmp_path, data_dir, max_train_epochs=3, save_every_n_epochs=2, sample_every_n_epochs=3,
               sample_prompts=("mychar --w 64 --h 64 --s 2 --d 5 --n ugly",), training_comment="hello",
               sample_dir=str(tmp_path / "previews"))
    events = run_training(cfg, backend)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-02.safetensors", "tiny-03.safetensors"]
    saved = [e.path for e in events if isinstance(e, Saved)]
    assert [p.rsplit("/", 1)[-1] for p in saved] == ["tiny-02.safetensors", "tiny-03.safetensors"]
    from lib_lora.network import read_metadata

    md = read_metadata(out / "tiny-03.safetensors")
    assert md["ss_output_name"] == "tiny-03" and md["ss_epoch"] == "3" and md["ss_network_dim"] == "4"
    assert md["ss_num_train_images"] == "9" and md["ss_seed"] == "7" and md["ss_training_comment"] == "hello"
    assert json.loads(md["ss_dataset_dirs"])["2_mychar"] == {"n_repeats": 2, "img_count": 3}
    assert "sshs_model_hash" in md and md["ss_base_model_version"] == "sd_v1"
    side = json.loads((out / "tiny-03.json").read_text())
    assert side["sd version"] == "SD1" and side["activation text"] == "mychar, style"
    samples = [e for e in events if isinstance(e, Sample)]
    assert len(samples) == 1 and samples[0].epoch == 3 and all(p.endswith(".png") for p in samples[0].paths)
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["tiny_e000003_00.png"] and not (out / "sample").exists()
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [e.step for e in steps] == list(range(1, 16)) and steps[-1].total_steps == 15
    log = (out / "logs" / "tiny_loss.csv").read_text().splitlines()
    assert len(log) == 1 + 15
    assert [e.epoch for e in events if isinstance(e, EpochEnd)] == [1, 2, 3]


def test_a_failing_preview_is_a_note_and_training_goes_on(tmp_path, data_dir, backend, monkeypatch):
    """A preview that raises (offline download, sampler bug, out of memory) must not cost the epochs after it."""
    def broken_sample(*args, **kwargs):
        raise RuntimeError("sampler exploded\nsecond line")

    monkeypatch.setattr(backend, "sample", broken_sample)
    cfg = _cfg(tmp_path, data_dir, max_train_epochs=2, save_every_n_epochs=1, sample_every_n_epochs=1,
               sample_prompts=("mychar --w 64 --h 64 --s 2",))
    events = run_training(cfg, backend)
    assert isinstance(events[-1], Done)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["tiny-01.safetensors", "tiny-02.safetensors"]
    notes = [e.message for e in events if isinstance(e, Note) and "preview" in e.message]
    assert notes == [f"preview samples of epoch {n} failed and were skipped (RuntimeError: sampler exploded); "
                     "training goes on" for n in (1, 2)]
    assert not [e for e in events if isinstance(e, Sample)]


EXACT = dict(max_train_epochs=3, network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0, flip_aug=True,
             shuffle_caption=True, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2, cache_latents=False)


def test_resume_pause_and_repeated_resume_give_the_uninterrupted_weights(tmp_path, data_dir, backend, components):
    reference = _cfg(tmp_path / "a", data_dir, **EXACT)
    run_training(reference, backend)
    expected = _weights(tmp_path / "a" / "out" / "tiny.safetensors")
    before = _snapshot(components)

    # stop twice, resume twice
    cfg = _cfg(tmp_path / "b", data_dir, **EXACT)
    for stop_at, resume in ((2, ""), (5, "x"), (None, "x")):
        control = TrainControl()
        run_cfg = dataclasses.replace(cfg, resume=str(tmp_path / "b" / "out" / "tiny-state") if resume else "")
        events = run_training(run_cfg, backend, control, at_step(stop_at, control.stop))
        if stop_at:
            assert isinstance(events[-1], Interrupted) and events[-1].step == stop_at
            _assert_same(before, _snapshot(components))
        else:
            assert isinstance(events[-1], Done)
            assert next(e for e in events if isinstance(e, Started)).start_step == 5
    got = _weights(tmp_path / "b" / "out" / "tiny.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    # pause: the model is handed back while paused; continuing gives the same weights
    control = TrainControl()
    seen = []

    def on_event(ev):
        if isinstance(ev, StepEnd) and ev.step == 3:
            control.pause()
        if isinstance(ev, Paused):
            seen.append(_snapshot(components))
            control.unpause()

    events = run_training(_cfg(tmp_path / "c", data_dir, **EXACT), backend, control, on_event)
    assert any(isinstance(e, Paused) for e in events) and any(isinstance(e, Continued) for e in events)
    _assert_same(before, seen[0])
    paused = _weights(tmp_path / "c" / "out" / "tiny.safetensors")
    assert all(torch.equal(paused[k], expected[k]) for k in expected)


def test_model_is_bit_identical_after_a_run_that_raised_mid_step(tmp_path, data_dir, components):
    from lib_lora.backends import DiffusersBackend

    class Breaks(DiffusersBackend):
        calls = 0

        def predict(self, noisy, t, cond):
            Breaks.calls += 1
            out = super().predict(noisy, t, cond)
            if Breaks.calls == 4:
                raise RuntimeError("boom in the middle of a step")
            return out

    before = _snapshot(components)
    backend = _backend(components, Breaks)
    with pytest.raises(RuntimeError, match="boom"):
        run_training(_cfg(tmp_path, data_dir, gradient_checkpointing=True, cache_latents=False), backend)
    _assert_same(before, _snapshot(components))
    assert not backend.is_prepared


def test_nan_loss_stops_names_the_step_and_keeps_finished_epochs(tmp_path, data_dir, components):
    from lib_lora.backends import DiffusersBackend

    class Overcooked(DiffusersBackend):
        calls = 0

        def predict(self, noisy, t, cond):
            Overcooked.calls += 1
            out = super().predict(noisy, t, cond)
            return out * float("nan") if Overcooked.calls > 7 else out

    before = _snapshot(components)
    events = run_training(_cfg(tmp_path, data_dir, max_train_epochs=3, save_every_n_epochs=1), _backend(components, Overcooked))
    failed = events[-1]
    assert isinstance(failed, Failed) and "step 8 (epoch 2)" in failed.message and "lower the learning rate" in failed.message
    assert [p.rsplit("/", 1)[-1] for p in failed.files] == ["tiny-01.safetensors"]
    assert (tmp_path / "out" / "tiny-01.safetensors").exists() and not (tmp_path / "out" / "tiny-02.safetensors").exists()
    _assert_same(before, _snapshot(components))


def _first_validation(cfg, backend) -> float:
    gen = train(cfg, backend, build_dataset(cfg))
    try:
        return next(e for e in gen if isinstance(e, Validation)).loss
    finally:
        gen.close()


def test_validation_uses_held_out_images_only_and_is_deterministic(tmp_path, backend):
    root = make_dataset(tmp_path / "img", {"thing": 1}, per_concept=4)
    cfg = _cfg(tmp_path, root, validation_split=0.25, cache_latents=False)
    ds = build_dataset(cfg)
    held = {ds.images[it.image].entry.path for spec in ds.validation_batches() for it in spec.items}
    trained = {ds.images[it.image].entry.path for spec in ds.epoch_batches(1) for it in spec.items}
    assert len(held) == 1 and not held & trained
    first = _first_validation(cfg, backend)
    assert _first_validation(cfg, backend) == first  # same noise and timesteps every time
    pattern_image(99).save(next(iter(trained)))  # a training image changes: the validation loss does not
    assert _first_validation(cfg, backend) == first
    pattern_image(98).save(next(iter(held)))  # the held-out image changes: it does
    assert _first_validation(cfg, backend) != first


def test_dry_run_writes_nothing_and_estimates(tmp_path, data_dir, backend, components):
    before = _snapshot(components)
    cfg = _cfg(tmp_path, data_dir, dry_run=True, cache_latents_to_disk=True)
    events = run_training(cfg, backend)
    report = next(e for e in events if isinstance(e, DryRun))
    assert report.total_steps == 10 and report.measured_steps == 3 and report.step_time_s > 0 and report.peak_memory_bytes > 0
    assert any("2_mychar" in line for line in report.lines) and any("steps" in line for line in report.lines)
    assert not (tmp_path / "out").exists() and not list(data_dir.rglob("*.npz"))
    _assert_same(before, _snapshot(components))


def test_save_now_and_adafactor_in_the_loop(tmp_path, data_dir, backend):
    control = TrainControl()
    cfg = _cfg(tmp_path, data_dir, optimizer_type="Adafactor", max_train_epochs=1)
    events = run_training(cfg, backend, control, at_step(2, control.save_now))
    assert (tmp_path / "out" / "tiny-step00000002.safetensors").exists() and isinstance(events[-1], Done)
    assert all(e.lr > 0 for e in events if isinstance(e, StepEnd))


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_sd2_v_prediction_and_sdxl_size_conditioning_train(tmp_path, data_dir, clip_tokenizer, arch):
    from lib_lora.backends import DiffusersBackend
    from tests.fixtures.diffusers_models import build_components

    c = build_components(arch, clip_tokenizer, seed=1)
    backend = DiffusersBackend(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c.get("text_encoder_2"),
                               c.get("tokenizer_2"), scheduler=c["scheduler"], device="cpu")
    before = _snapshot(c)
    # SDXL: UNet only, so captions come from the text-output cache with per-batch size conditioning
    events = run_training(_cfg(tmp_path, data_dir, max_train_epochs=1, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
                       bucket_reso_steps=64, network_train_unet_only=arch == "sdxl"), backend)
    assert isinstance(events[-1], Done)
    from lib_lora.network import read_metadata

    md = read_metadata(tmp_path / "out" / "tiny.safetensors")
    assert md["ss_base_model_version"] == {"sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[arch]
    keys = _weights(tmp_path / "out" / "tiny.safetensors").keys()
    prefixes = {"sd2": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet"}}[arch]
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in keys} == prefixes
    _assert_same(before, _snapshot(c))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, data_dir, backend, precision):
    events = run_training(_cfg(tmp_path, data_dir, max_train_epochs=1, mixed_precision=precision, gradient_checkpointing=True), backend)
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert isinstance(events[-1], Done) and steps and all(torch.isfinite(torch.tensor(e.loss)) for e in steps)


def test_fp16_on_the_webuis_torch_without_torch_amp_gradscaler(tmp_path, data_dir, backend, monkeypatch):
    monkeypatch.delattr(torch.amp, "GradScaler")  # torch 2.1, what the webui ships, has only torch.cuda.amp's
    events = run_training(_cfg(tmp_path, data_dir, max_train_epochs=1, mixed_precision="fp16", save_state=True), backend)
    assert isinstance(events[-1], Done) and (tmp_path / "out" / "tiny.safetensors").exists()


def test_cached_latents_come_from_the_runs_seed_not_the_global_rng(tmp_path, data_dir, backend):
    """cache_latents samples the VAE once; that sample must follow `seed` (a resumed run, another process of a
    multi-GPU run or a second run with the same seed caches again and must get the same latents)."""
    got = []
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        run_training(_cfg(tmp_path / str(i), data_dir, max_train_epochs=1), backend)
        got.append(_weights(tmp_path / str(i) / "out" / "tiny.safetensors"))
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


def test_vae_and_frozen_text_encoder_work_once_then_leave(tmp_path, data_dir, components):
    """cache_latents: every image is encoded before the first step and the VAE is offloaded; a frozen text encoder
    with fixed captions encodes each caption once and is offloaded; shuffled captions are encoded every step."""
    from lib_lora.backends import DiffusersBackend

    class Counting(DiffusersBackend):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.log = []

        def encode_images(self, pixels, **kw):
            self.log.append("vae")
            return super().encode_images(pixels, **kw)

        def encode_prompts(self, texts, *a, **kw):
            self.log.append(("text", len(texts)))
            return super().encode_prompts(texts, *a, **kw)

        def predict(self, noisy, t, cond):
            self.log.append("unet")
            return super().predict(noisy, t, cond)

        def offload_vae(self):
            self.log.append("vae off")
            super().offload_vae()

        def offload_text_encoders(self):
            self.log.append("text off")
            super().offload_text_encoders()

    def run(**kw):
        backend = _backend(components, Counting)
        events = run_training(_cfg(tmp_path / str(len(kw)), data_dir, max_train_epochs=2, network_train_unet_only=True, **kw), backend)
        assert isinstance(events[-1], Done)
        first_step = backend.log.index("unet")
        return backend.log[:first_step], backend.log[first_step:]

    before, during = run()
    assert "vae" in before and "vae off" in before and "vae" not in during and "vae off" not in during
    assert ("text", 6) in before and "text off" in before  # 6 distinct captions, encoded in one call
    assert not any(isinstance(x, tuple) for x in during) and during.count("unet") == 10
    before, during = run(shuffle_caption=True)
    texts = [x for x in before + during if isinstance(x, tuple)]
    assert len(texts) == 10 and "text off" not in before + during  # one encode per step, the encoder stays


def test_out_of_memory_is_a_message_with_remedies(tmp_path, data_dir, components):
    from lib_lora.backends import DiffusersBackend

    class Full(DiffusersBackend):
        def predict(self, noisy, t, cond):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    before = _snapshot(components)
    events = run_training(_cfg(tmp_path, data_dir), _backend(components, Full))
    assert isinstance(events[-1], Failed)
    assert "out of memory at step 1" in events[-1].message and "train_batch_size 1" in events[-1].message
    assert "gradient_checkpointing" in events[-1].message and "cache_latents" in events[-1].message
    _assert_same(before, _snapshot(components))

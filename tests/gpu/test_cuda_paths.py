"""CUDA-only paths: fused AdamW, AdamW8bit (bitsandbytes), fp16 mixed precision with the grad scaler on fp16 base
weights, bf16, and the webui's own (ldm) model in fp16 on the GPU. Skipped where there is no CUDA (CI); run them on
a GPU machine: `python -m pytest -q tests/gpu`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# cuBLAS reads this when its handle is made (before any test runs); the pause test turns deterministic kernels on,
# without which two plain runs on a GPU already differ in the last bits.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.fixtures.images import make_dataset

    return make_dataset(tmp_path_factory.mktemp("gpu-data") / "img", {"mychar": 2}, per_concept=4)


def _lora_changed(path) -> float:
    from lib_lora.network import load_lora

    tensors, _ = load_lora(path)
    ups = [t.float() for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    return max(t.abs().max().item() for t in ups)


@pytest.mark.parametrize(
    "optimizer, precision",
    [("AdamW", "fp16"), ("AdamW", "bf16"), ("AdamW8bit", "fp16"), ("Prodigy", "bf16"), ("Lion", "no")],
)
def test_cli_trains_on_cuda(tmp_path, sd1_diffusers_dir, data_dir, capsys, optimizer, precision):
    pytest.importorskip("diffusers")
    if optimizer == "AdamW8bit":
        pytest.importorskip("bitsandbytes")
    from lib_lora.cli import main

    lr = "1.0" if optimizer == "Prodigy" else "1e-3"
    code = main(["train", "--pretrained_model_name_or_path", str(sd1_diffusers_dir), "--train_data_dir", str(data_dir),
                 "--output_dir", str(tmp_path), "--output_name", "gpu", "--resolution", "64", "--network_dim", "4",
                 "--network_alpha", "4", "--train_batch_size", "2", "--max_train_epochs", "2", "--seed", "1",
                 "--optimizer_type", optimizer, "--learning_rate", lr, "--mixed_precision", precision,
                 "--cache_latents", "--gradient_checkpointing", "--save_every_n_epochs", "1"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    files = sorted(p.name for p in tmp_path.glob("gpu-*.safetensors"))
    assert files == ["gpu-01.safetensors", "gpu-02.safetensors"]
    assert _lora_changed(tmp_path / "gpu-02.safetensors") > 0  # the up weights left zero: it trained


def test_fused_adamw_is_used_on_cuda():
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.optim import build_optimizer

    param = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    setup = build_optimizer(TrainConfig(optimizer_type="AdamW"), [{"params": [param], "lr": 1e-3}], total_steps=10)
    assert setup.optimizer.defaults.get("fused") is True


@pytest.mark.skipif(importlib.util.find_spec("ldm") is None, reason="needs the ldm package")
def test_webui_fp16_model_on_cuda_trains_and_is_handed_back(tmp_path, data_dir):
    """What the tab does in a CUDA webui: fp16 ldm weights on the GPU, fp32 LoRA, fp16 autocast + grad scaler."""
    from safetensors.torch import load_file

    from lib_lora.backends import LdmBackend
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.events import Done
    from lib_lora.train.loop import train
    from lib_lora.train.state import build_dataset
    from tests.backends.checkpoints import tiny_config, write_checkpoint
    from tests.backends.webui_models import build_sd_model

    (tmp_path / "ckpt").mkdir()
    path = write_checkpoint("sd1", tmp_path / "ckpt", parameterization="eps")
    model = build_sd_model("sd1", load_file(str(path)), tiny_config("sd1", "eps")).half().cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(train_data_dir=str(data_dir), output_dir=str(tmp_path / "out"), output_name="webui",
                      resolution="64", network_dim=4, network_alpha=4.0, learning_rate=1e-3, train_batch_size=2,
                      max_train_epochs=2, seed=3, mixed_precision="fp16", cache_latents=True, save_every_n_epochs=1)
    events = list(train(cfg, LdmBackend(model, device="cuda"), build_dataset(cfg)))
    assert isinstance(events[-1], Done), events[-1]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert _lora_changed(tmp_path / "out" / "webui-02.safetensors") > 0


def test_pause_frees_the_gpu_and_continuing_gives_the_same_weights(tmp_path, sd1_diffusers_dir, data_dir):
    """Pause hands the model back (VAE and text encoder on the GPU again for generation) and moves the LoRA and
    the optimizer state to the CPU, so the GPU holds what it held before training; the run then continues to the
    same weights as one that never paused. While training, the cached-latent VAE and the frozen text encoder are
    off the GPU."""
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from lib_lora.backends import load_backend
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.events import Done, Paused, StepEnd, TrainControl
    from lib_lora.train.loop import train
    from lib_lora.train.state import build_dataset

    backend = load_backend(str(sd1_diffusers_dir), device=torch.device("cuda"))
    cfg = TrainConfig(train_data_dir=str(data_dir), output_name="pause", resolution="64", network_dim=64,
                      network_alpha=64.0, learning_rate=1e-3, train_batch_size=2, max_train_epochs=2, seed=1,
                      cache_latents=True, network_train_unet_only=True, save_precision="fp32")

    def run(folder, pause_at=None):
        control, seen = TrainControl(), {}
        run_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / folder))
        for ev in train(run_cfg, backend, build_dataset(run_cfg), control):
            if isinstance(ev, StepEnd) and ev.step == pause_at:
                seen["vae"] = next(backend.vae.parameters()).device.type
                seen["text"] = next(backend.text_encoders["te"].parameters()).device.type
                seen["training"] = torch.cuda.memory_allocated()
                control.pause()
            elif isinstance(ev, Paused):
                torch.cuda.synchronize()
                seen["paused"] = torch.cuda.memory_allocated()
                seen["vae paused"] = next(backend.vae.parameters()).device.type
                control.unpause()
        assert isinstance(ev, Done), ev
        return load_file(str(tmp_path / folder / "pause.safetensors")), seen

    torch.use_deterministic_algorithms(True)
    try:
        expected, _ = run("plain")
        torch.cuda.synchronize()
        # the model as the webui holds it after a run; measured after one, so cuBLAS's workspaces (tens of MB on
        # an H100, made at the first matmul and kept) count in both figures
        base = torch.cuda.memory_allocated()
        got, seen = run("paused", pause_at=3)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen["vae"] == "cpu" and seen["text"] == "cpu" and seen["vae paused"] == "cuda"
    assert seen["paused"] <= base + 256 * 1024, (base, seen)  # LoRA + AdamW state (several MB) left the GPU
    assert all(torch.equal(got[k], expected[k]) for k in expected)

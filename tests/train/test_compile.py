"""`torch_compile`: the compiled UNet forward trains like the eager one, survives pause / continue without
compiling again, writes the same files, and hands the webui's model back bit-exactly. One run of a tiny ldm model
(what the tab trains; no diffusers needed, so this runs on the webui stack too). Where torch.compile cannot work
(no compiler, a torch without it) the run must still finish eagerly with a note; the test then skips.

The backend is aot_eager (dynamo + AOTAutograd: the tracing, guards and gradients the run depends on) so the test
takes seconds, not the minutes inductor's C++ code generation takes on a cold cache; set
LIB_LORA_TEST_DYNAMO_BACKEND=inductor to run it with inductor (it passes, about 20 s more with a warm cache)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from lib_lora.train.compiling import CompiledForward, CompileFailed
from lib_lora.train.config import TrainConfig
from lib_lora.train.config_io import dump_toml, loads_toml
from lib_lora.train.events import Continued, Done, Note, Paused, StepEnd, TrainControl
from lib_lora.train.kohya_ss import from_kohya_ss
from lib_lora.train.validate import validate
from tests.fixtures.handback import model_snapshot, same_model
from tests.fixtures.images import make_dataset
from tests.fixtures.training import at_step, run_training

needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="this torch has no torch.compile")


def test_compile_options_in_cli_toml_kohya_ss_and_validation(tmp_path):
    import argparse

    from lib_lora.cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--torch_compile", "--dynamo_backend", "aot_eager", "--dynamo_mode", "reduce-overhead"])
    cfg = config_from_args(args, [])
    assert (cfg.torch_compile, cfg.dynamo_backend, cfg.dynamo_mode) == (True, "aot_eager", "reduce-overhead")
    text = dump_toml(cfg, only_changed=True)
    assert "torch_compile = true" in text and "dynamo_backend = 'aot_eager'" in text
    assert loads_toml(text) == cfg
    with pytest.raises(SystemExit):
        parser.parse_args(["--dynamo_mode", "fastest"])
    # sd-scripts' TOML: dynamo_backend is an option of its own now, not an ignored one; case as accelerate writes it
    notes: list[str] = []
    assert loads_toml("torch_compile = true\ndynamo_backend = 'INDUCTOR'\n", notes).dynamo_backend == "inductor"
    assert not notes
    # kohya_ss GUI: its accelerate dynamo_backend "no" leaves the default; only torch_compile turns compiling on
    gui = {"dynamo_backend": "no", "dynamo_mode": "default", "dynamo_use_fullgraph": False, "dynamo_use_dynamic": False}
    imported = from_kohya_ss(gui, notes)
    assert (imported.torch_compile, imported.dynamo_backend, imported.dynamo_mode) == (False, "inductor", "default")
    assert not notes
    imported = from_kohya_ss({**gui, "dynamo_backend": "aot_eager", "dynamo_mode": "max-autotune", "torch_compile": True})
    assert (imported.torch_compile, imported.dynamo_backend, imported.dynamo_mode) == (True, "aot_eager", "max-autotune")
    problems = {(p.field, p.severity): p.message for p in validate(TrainConfig(torch_compile=True, dynamo_backend="no",
                                                                               dynamo_mode="turbo"), need_model_path=False)}
    assert "turbo" in problems[("dynamo_mode", "error")] and "'no'" in problems[("dynamo_backend", "warning")]
    problems = {(p.field, p.severity) for p in validate(TrainConfig(torch_compile=True, dynamo_backend="tensort"),
                                                        need_model_path=False)}
    assert ("dynamo_backend", "warning") in problems


class _TinyBackend:
    device = "cpu"

    def predict(self, noisy, t, cond):
        return (noisy * 2 + t.view(-1, 1, 1, 1) + cond).float()


@needs_compile
def test_a_failing_compiler_switches_to_eager_and_says_why():
    def no_compiler(gm, example_inputs):  # what inductor meets on Windows without MSVC
        raise RuntimeError("Compiler: cl is not found.")

    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 4, 8, 8)
    fwd = CompiledForward(_TinyBackend(), dynamo_backend=no_compiler)
    assert fwd.enabled
    with pytest.raises(CompileFailed, match="cl is not found"):
        fwd(x, t, c)
    assert not fwd.enabled and "cl is not found" in fwd.failure
    assert torch.equal(fwd(x, t, c), _TinyBackend().predict(x, t, c))  # eager from now on
    unknown = CompiledForward(_TinyBackend(), dynamo_backend="no_such_backend")
    assert not unknown.enabled and "no_such_backend" in unknown.failure


def _webui_sd1(tmp_path_factory):
    from safetensors.torch import load_file

    from tests.backends.checkpoints import tiny_config, write_checkpoint
    from tests.backends.webui_models import build_sd_model

    path = write_checkpoint("sd1", tmp_path_factory.mktemp("compile-ckpt"), parameterization="eps")
    return build_sd_model("sd1", load_file(str(path)), tiny_config("sd1", "eps"))


class _SizeFixingBackend:
    """A model that fixes the latent width in its code (as the webui's ldm UNet does in its einops reshapes), so
    every new size compiles a graph of its own."""

    device = "cpu"

    def predict(self, noisy, t, cond):
        return sum(noisy[..., i] for i in range(noisy.shape[-1]))


@needs_compile
def test_every_bucket_shape_stays_compiled_and_the_process_limit_is_restored():
    from torch._dynamo import config
    from torch._dynamo.utils import counters

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = getattr(config, name)
    fwd = CompiledForward(_SizeFixingBackend(), dynamo_backend="eager", shapes=limit)  # 2 graphs per bucket + 2
    graphs = counters["stats"]["unique_graphs"]
    for width in range(1, limit + 5):
        x = torch.ones(2, 3, width)
        assert torch.equal(fwd(x, None, None), _SizeFixingBackend().predict(x, None, None))
    assert counters["stats"]["unique_graphs"] - graphs == limit + 4  # past torch's limit, still compiled
    assert getattr(config, name) == limit
    fwd.release()


@needs_compile
@pytest.mark.skipif(importlib.util.find_spec("tests.backends.checkpoints") is None, reason="no webui-shaped test models")
def test_compiled_training_matches_eager_and_hands_the_model_back(tmp_path, tmp_path_factory):
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from lib_lora.backends import LdmBackend

    model = _webui_sd1(tmp_path_factory)
    backend = LdmBackend(model, device="cpu")
    data = make_dataset(tmp_path / "img", {"mychar": 2}, per_concept=2)
    before = model_snapshot(model)
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(tmp_path / "eager"), output_name="c", resolution="64",
                      network_dim=4, network_alpha=4.0, learning_rate=5e-3, train_batch_size=2, max_train_epochs=2,
                      save_every_n_epochs=1, seed=5, save_precision="fp32", cache_latents=True,
                      network_train_unet_only=True)
    eager = run_training(cfg, backend)
    assert isinstance(eager[-1], Done)

    graphs = counters["stats"]["unique_graphs"]
    backend_name = os.environ.get("LIB_LORA_TEST_DYNAMO_BACKEND", "aot_eager")
    ccfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "compiled"), torch_compile=True, dynamo_backend=backend_name)
    control = TrainControl()
    pause = at_step(1, control.pause)
    compiled = run_training(ccfg, backend, control, lambda ev: control.unpause() if isinstance(ev, Paused) else pause(ev))
    notes = [e.message for e in compiled if isinstance(e, Note)]
    assert isinstance(compiled[-1], Done), compiled[-1]
    assert same_model(before, model_snapshot(model))
    assert sum("forward" in vars(m) for m in model.modules()) == 0
    assert any(isinstance(e, Paused) for e in compiled) and any(isinstance(e, Continued) for e in compiled)

    losses = [e.loss for e in eager if isinstance(e, StepEnd)]
    got = [e.loss for e in compiled if isinstance(e, StepEnd)]
    assert len(got) == len(losses) == 4
    assert got == pytest.approx(losses, rel=1e-3, abs=1e-5)
    # the same files and keys; weights within a tenth of one AdamW step (lr): compiled kernels sum in another order,
    # and Adam's normalised update magnifies that on near-zero gradients. A forward that missed the LoRA would leave
    # the up weights at zero, a full step or more away.
    for name in ("c-01.safetensors", "c-02.safetensors"):
        a, b = load_file(str(tmp_path / "eager" / name)), load_file(str(tmp_path / "compiled" / name))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=0.1 * cfg.learning_rate) for k in a)
        assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > cfg.learning_rate

    fell_back = [n for n in notes if "eagerly" in n]
    if fell_back:  # no C++ compiler, a torch whose dynamo cannot run here: the run went on eagerly and said why
        pytest.skip(f"torch.compile does not work here: {fell_back[0]}")
    assert any(f"compiling the UNet forward with {backend_name}" in n for n in notes)
    # one graph for the training forward: pause / continue (LoRA detached and attached again) did not recompile
    assert counters["stats"]["unique_graphs"] - graphs == 1

"""The core training run of test_integration.py on tiny SD2 (v-prediction, OpenCLIP) and SDXL (sgm, two text
encoders, size conditioning) checkpoints, one webui start each (the webui loads one model at start), plus a merge
check and SDXL under --medvram-sdxl. Skipped unless WEBUI_DIR is set (docs/webui-dev.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.webui.test_integration import (
    PROBE,
    TXT2IMG,
    WEBUI_DIR,
    check_every_module_learned,
    train_on_the_loaded_model,
    train_one_epoch,
    txt2img,
)
from tests.webui.webui_process import Webui, make_tiny_model, webui_python

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set")]


@pytest.fixture(scope="session")
def arch_ckpt_dir(tmp_path_factory):
    """arch -> a folder holding only tiny-<arch> (so the webui loads that one at start), made on first use."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"ckpt-{arch}")
            make_tiny_model(webui_python(Path(WEBUI_DIR)), Path(WEBUI_DIR), folder, arch)
            made[arch] = folder
        return made[arch]

    return get


def start_with(tmp_path_factory, folder: Path, arch: str, *args) -> Webui:
    ckpt = ["--ckpt", str(folder / f"tiny-{arch}.safetensors")]  # the folder may also hold merged checkpoints
    # The webui's default live preview ("Approx NN") makes every SDXL generation load vaeapprox-sdxl.pt, which it
    # downloads when missing. Offline, the test's own requests turn it off; the webui keeps its defaults, as users
    # have them, for the training previews. Written to config.json so that the webui itself puts the setting back
    # after each request (it restores only settings config.json holds).
    options = {"live_previews_enable": True, "show_progress_type": "Approx NN"} if arch == "sdxl" else None
    webui = Webui(Path(WEBUI_DIR), tmp_path_factory.mktemp("data"), folder, ckpt + list(args), options=options)
    if arch == "sdxl":
        webui.request_settings = {"live_previews_enable": False}
    try:
        webui.wait_ready()
        assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"].startswith(f"tiny-{arch}")
    except Exception:
        webui.stop()
        raise
    return webui


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_training_on_sd2_and_sdxl_models(tmp_path_factory, arch_ckpt_dir, arch):
    """The same run on a tiny SD2 (v-prediction, OpenCLIP) and SDXL (sgm, two text encoders, size conditioning)
    checkpoint, each in its own webui start (the webui loads one model at start). As LoCon, so the ResNet and
    down/upsampler names (diffusers-style for SD2, ldm-style for SDXL) meet the webui's loader too."""
    webui = start_with(tmp_path_factory, arch_ckpt_dir(arch), arch)
    try:
        train_on_the_loaded_model(webui, arch, network_args=["conv_dim=4", "conv_alpha=1"])
        check_merge_equals_the_lora(webui, f"probe-{arch}")
    finally:
        webui.stop()


def check_merge_equals_the_lora(webui, lora: str) -> None:
    """Our merge (SD2/SDXL: q/k/v rows of OpenCLIP's fused in_proj_weight) gives the image the built-in Lora gives
    with `<lora:...:1>`; the strong probe copy of the trained file (x30, fp32) so the comparison means something."""
    import numpy as np

    title = webui.get("/sdapi/v1/options")["sd_model_checkpoint"]
    status, body = webui.post("/lora-train/v1/merge", {"checkpoint": title, "name": f"merged-{lora}",
                                                       "save_precision": "fp32", "loras": [{"name": lora}]})
    assert status == 200, body

    def pixels(**changes):
        return np.frombuffer(txt2img(webui, **changes), dtype=np.uint8).astype(int)

    base = pixels()
    with_lora = pixels(prompt=TXT2IMG["prompt"] + f" <lora:{lora}:1>")
    merged = pixels(override_settings={"sd_model_checkpoint": f"merged-{lora}"},
                    override_settings_restore_afterwards=True)
    assert np.abs(with_lora - base).mean() > 5, "the probe LoRA should change the image a lot"
    assert np.abs(merged - with_lora).max() <= 2 and np.abs(merged - with_lora).mean() < 0.05


@pytest.mark.slow
def test_medvram_sdxl_trains_sdxl_and_puts_everything_back(tmp_path_factory, arch_ckpt_dir):
    """--medvram-sdxl, the usual flag for SDXL on 8-12 GB: its swap hooks come off for the run and go back."""
    webui = start_with(tmp_path_factory, arch_ckpt_dir("sdxl"), "sdxl", "--medvram-sdxl")
    try:
        digest = webui.get(PROBE + "/digest")
        assert digest["hooks"] > 0, "the webui's medvram hooks should be on the SDXL model"
        before = txt2img(webui)
        job = train_one_epoch(webui, "med")
        assert len(job["checks"]) == 1 and job["checks"][0].startswith("ok"), job["checks"]
        check_every_module_learned(Path(job["files"][0]), ("lora_te1_text_model_encoder_layers_1_",))
        assert webui.get(PROBE + "/digest") == digest
        assert txt2img(webui) == before
    finally:
        webui.stop()

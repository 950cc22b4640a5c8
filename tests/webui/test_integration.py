"""Against a real webui checkout (WEBUI_DIR; see docs/webui-dev.md): the tab is there, a training runs through the
API on the loaded model (SD1 here; SD2 and SDXL in test_integration_archs.py with the same checks), the LoRA is
listed and changes txt2img, the model is restored bit for bit, and what training computed equals what the webui
computes at generation (the test-only probe extension in probe_extension/ looks inside the webui for that).

Skipped unless WEBUI_DIR is set. Each webui start takes ~25 s on 2 CPU cores; the tiny model trains in seconds.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import pytest

from tests.webui.webui_process import Webui, make_tiny_model, webui_python

PROBE = "/lora-train-probe"
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}  # what the tool makes by default
PREVIEW_SETTINGS = ("CLIP_stop_at_last_layers", "live_previews_enable", "sd_model_checkpoint")  # training previews set

WEBUI_DIR = os.environ.get("WEBUI_DIR")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set")]

TXT2IMG = {"prompt": "a photo of sks, red", "negative_prompt": "", "seed": 1234, "steps": 6, "width": 64,
           "height": 64, "sampler_name": "Euler", "cfg_scale": 5}
TRAIN = {"resolution": "64", "enable_bucket": False, "max_train_epochs": 2, "train_batch_size": 2,
         "unet_lr": 5e-3, "text_encoder_lr": 1e-3, "network_dim": 4, "network_alpha": 4, "seed": 7,
         "lr_warmup_steps": 0, "cache_latents": True}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    make_tiny_model(webui_python(Path(WEBUI_DIR)), Path(WEBUI_DIR), folder)
    return folder


def start(tmp_path_factory, ckpt_dir, *args) -> Webui:
    webui = Webui(Path(WEBUI_DIR), tmp_path_factory.mktemp("data"), ckpt_dir, list(args))
    try:
        webui.wait_ready()
    except Exception:
        webui.stop()
        raise
    return webui


@pytest.fixture(scope="module")
def webui(tmp_path_factory, ckpt_dir):
    w = start(tmp_path_factory, ckpt_dir)
    yield w
    w.stop()


def image_bytes(response) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(response["images"][0]))).convert("RGB")
    return img.tobytes()


def txt2img(webui, **changes) -> bytes:
    body = dict(TXT2IMG, **changes)
    extra = getattr(webui, "request_settings", None)  # per-request webui settings this test start needs
    if extra:
        body["override_settings"] = {**extra, **body.get("override_settings", {})}
    status, body = webui.post("/sdapi/v1/txt2img", body)
    assert status == 200, body
    return image_bytes(body)


def add_images(webui, project: str, n: int = 4) -> None:
    from tests.ui.conftest import make_images

    folder = webui.data_dir / "lora-train" / project / "dataset" / f"5_{project}"
    make_images(folder, n, captions=["sks, red", "sks, blue"])


def train_one_epoch(webui, project: str) -> dict:
    """A new project with images, one epoch trained through the API; the finished job (asserted done)."""
    webui.post("/lora-train/v1/projects", {"name": project})
    add_images(webui, project)
    status, job = webui.post("/lora-train/v1/jobs", {"project": project, "config": dict(TRAIN, max_train_epochs=1)})
    assert status == 201, job
    job = wait_job(webui, job["id"])
    assert job["status"] == "done", job["message"]
    return job


def wait_job(webui, job_id: str, timeout: float = 900) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = webui.get(f"/lora-train/v1/jobs/{job_id}")
        if job["status"] in ("done", "failed", "interrupted"):
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not finish: {job}")


def test_tab_and_routes_are_present(webui):
    page = webui.get("/")
    assert "LoRA Train" in page and "lora_train_start" in page
    assert webui.get("/lora-train/v1/projects") == []


def test_bad_input_gets_a_4xx_with_the_message_and_starts_nothing(webui):
    status, body = webui.post("/lora-train/v1/projects", {"name": "../evil"})
    assert status == 400 and "project name" in body["detail"]
    status, body = webui.post("/lora-train/v1/projects", {"name": "empty"})
    assert status == 201
    status, body = webui.post("/lora-train/v1/jobs", {"project": "empty", "config": {}})
    assert status == 400 and "no images" in body["detail"]
    add_images(webui, "empty", 2)
    status, body = webui.post("/lora-train/v1/jobs", {"project": "empty", "config": {"network_dim": 0}})
    assert status == 400 and "network_dim" in body["detail"]
    assert webui.get("/lora-train/v1/jobs") == []


def train_on_the_loaded_model(webui, arch: str, network_args: list[str] = ()) -> Path:
    """The end-to-end run every architecture gets: train `sks` through our API on the loaded model, then check the
    files, the webui's view of them, the restored model and train / generation agreement. Returns the last epoch."""
    digest = webui.get(PROBE + "/digest")
    settings = {k: webui.get("/sdapi/v1/options")[k] for k in PREVIEW_SETTINGS}
    before = txt2img(webui)
    assert txt2img(webui) == before  # the webui itself is deterministic for a fixed seed
    status, _ = webui.post("/lora-train/v1/projects", {"name": "sks"})
    assert status == 201
    add_images(webui, "sks")
    # clip skip 2: the previews render with it (an override the webui would not take back by itself, as the
    # setting is in no config.json here); SD2 warns, as the webui ignores it there
    config = dict(TRAIN, sample_every_n_epochs=1, sample_prompts=["sks, red --w 64 --h 64 --s 4 --d 5"],
                  network_args=list(network_args), clip_skip=2)
    status, job = webui.post("/lora-train/v1/jobs", {"project": "sks", "config": config})
    assert status == 201, job
    assert any("ignores clip skip for SD 2.x" in w for w in job["warnings"]) == (arch == "sd2"), job["warnings"]
    job = wait_job(webui, job["id"])
    assert job["status"] == "done", job["message"]
    assert {k: webui.get("/sdapi/v1/options")[k] for k in PREVIEW_SETTINGS} == settings, "previews' settings back"
    # previews rendered by the webui's sampler with the training LoRA, one per epoch
    assert len(job["samples"]) == 2 and all(Path(p).is_file() for p in job["samples"])
    from PIL import Image

    assert Image.open(job["samples"][0]).size == (64, 64)
    lora_dir = webui.data_dir / "models" / "Lora" / "sks"
    assert sorted(p.name for p in lora_dir.glob("*.safetensors")) == ["sks-01.safetensors", "sks-02.safetensors"]
    card = (lora_dir / "sks-02.json").read_text()
    # each epoch's first preview is its card picture (the webui showed "NO PREVIEW" on the cards)
    assert (lora_dir / "sks-01.preview.png").read_bytes() == Path(job["samples"][0]).read_bytes()
    card_html = webui.get("/sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name=sks-01")["html"]
    assert "sks-01.preview.png" in card_html and "class=\"preview\"" in card_html, card_html
    assert '"activation text": "sks"' in card and f'"sd version": "{SD_VERSION[arch]}"' in card
    assert len(job["checks"]) == 2 and all(c.startswith("ok") for c in job["checks"]), job["checks"]
    assert len(job["files"]) == 2
    final = lora_dir / "sks-02.safetensors"
    check_every_module_learned(final, UNUSED_WITH_CLIP_SKIP_2[arch])
    names = {item["name"] for item in webui.get("/sdapi/v1/loras")}
    assert {"sks-01", "sks-02"} <= names
    after = webui.get(PROBE + "/digest")
    assert after == digest, "the model must be restored bit for bit (weights, requires_grad, patches, hooks, modes)"
    assert txt2img(webui) == before, "the model must give the same image after training"
    with_lora = txt2img(webui, prompt=TXT2IMG["prompt"] + " <lora:sks-02:1>")
    assert with_lora != before, "the trained LoRA must change the image"
    assert txt2img(webui) == before, "generation without the LoRA afterwards is unchanged"
    check_training_matches_generation(webui, final, arch)
    assert webui.get(PROBE + "/digest") == digest
    return final


def check_every_module_learned(path: Path, unused: tuple[str, ...] = ()) -> None:
    """lora_up starts at zero, so an all-zero up means that layer never got a gradient (a text encoder run under
    no_grad, a checkpointed block starved of its inputs' grad). Only text-encoder layers behind the layer the model
    reads have none, in sd-scripts as here: `unused` names their prefixes."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    zero = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.float().abs().sum()]
    assert sorted({k.rsplit(".", 2)[0] for k in zero}) == sorted(
        {k.rsplit(".", 2)[0] for k in tensors if k.startswith(unused)}), f"modules that learned nothing: {zero[:5]}"
    assert any(k.startswith("lora_te") for k in tensors) and any(k.startswith("lora_unet") for k in tensors)


# the last layer of each tiny text encoder (tools/make_tiny_checkpoint.py) that the model does not read: SD1/SD2
# with clip skip 2 (SD2's OpenCLIP under lora_te has its 2 read layers; its third is left out of the file), SDXL's
# CLIP-L read at its penultimate hidden state
UNUSED_WITH_CLIP_SKIP_2 = {"sd1": ("lora_te_text_model_encoder_layers_1_",),
                           "sd2": ("lora_te_text_model_encoder_layers_1_",),
                           "sdxl": ("lora_te1_text_model_encoder_layers_1_",)}


def check_training_matches_generation(webui, path: Path, arch: str) -> None:
    """Inside the webui (probe extension): a prompt and a noisy latent through our backend (what training computes)
    and through the webui's own conditioning + apply_model (what generation computes), on the bare model and with the
    LoRA (x30, so no mismatch hides under a small effect) applied by our network and by the built-in Lora loader.
    A 96x64 size with a crop, so SDXL's size conditioning is checked in order. Also the training loss against ldm's
    own p_losses (SD1/SD2, eps or v) or sgm's denoiser (SDXL: its timestep index and scaling), and our VAE encode
    (the latent mean training caches, scaled) and decode against the webui's first stage."""
    for clip_skip in (1, 2) if arch == "sd1" else (1,):  # the webui honours clip skip for SD1 only
        status, report = webui.post(PROBE + "/consistency", {"lora": str(path), "scale_up": 30,
                                                             "name": f"probe-{arch}", "clip_skip": clip_skip})
        assert status == 200, report
        check_consistency_report(report, arch)


def check_consistency_report(report: dict, arch: str) -> None:
    assert (report["arch"], report["prediction"]) == (arch, PREDICTION[arch]), report
    assert report["webui_sd_version"] == SD_VERSION[arch], "the built-in Lora reads the file's metadata as this"
    assert report["webui_loaded"] == [f"probe-{arch}"]
    for stage in ("bare", "with_lora"):
        assert report[stage]["crossattn_diff"] <= 1e-5 and report[stage]["eps_diff"] <= 1e-5, report
        assert report[stage].get("vector_diff", 0) <= 1e-5, report
        assert report[stage].get("loss_diff", 0) <= 1e-5 and report[stage].get("denoised_diff", 0) <= 1e-4, report
    assert report["vae"]["encode_diff"] <= 1e-5 and report["vae"]["decode_diff"] <= 1e-4, report["vae"]
    expected = {"eps", "crossattn"} | ({"vector"} if arch == "sdxl" else set())
    assert set(report["lora_effect"]) == expected
    for key in expected:
        assert report["lora_effect"][key] > 0.1, report  # the LoRA (UNet and text encoders) matters ...
        assert report["ours_vs_webui_with_lora"][key] <= 1e-4, report  # ... and the webui applies the same one
        assert report["after_clear_vs_bare"][key] == 0, report


def test_training_on_the_loaded_model_lists_and_applies_the_lora_and_restores_the_model(webui):
    train_on_the_loaded_model(webui, "sd1")


def test_comparison_grid_through_the_webui_xyz_script(webui):
    if not (webui.data_dir / "models" / "Lora" / "sks" / "sks-02.safetensors").exists():
        pytest.skip("needs the training test's files")
    status, body = webui.post("/lora-train/v1/grid", {"project": "sks", "weights": [0.5, 1], "steps": 4,
                                                      "width": 64, "height": 64, "sampler": "Euler"})
    assert status == 200, body
    from PIL import Image

    grid = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64
    assert 'X Values: "sks-01, sks-02"' in body["infotext"] and "Y Type: Prompt S/R" in body["infotext"]


def test_interrupt_keeps_finished_epochs(webui):
    status, _ = webui.post("/lora-train/v1/projects", {"name": "stopme"})
    add_images(webui, "stopme")
    status, job = webui.post("/lora-train/v1/jobs", {"project": "stopme", "config": dict(TRAIN, max_train_epochs=200)})
    assert status == 201, job
    end = time.time() + 300
    while time.time() < end and not webui.get(f"/lora-train/v1/jobs/{job['id']}")["files"]:
        time.sleep(0.5)
    status, _ = webui.post(f"/lora-train/v1/jobs/{job['id']}/interrupt")
    assert status == 200
    job = wait_job(webui, job["id"])
    assert job["status"] == "interrupted", job["message"]
    assert job["files"] and all(Path(f).exists() for f in job["files"])


@pytest.mark.slow
def test_medvram_trains_and_puts_everything_back(tmp_path_factory, ckpt_dir):
    webui = start(tmp_path_factory, ckpt_dir, "--medvram")
    try:
        before = txt2img(webui)
        train_one_epoch(webui, "med")
        assert txt2img(webui) == before
    finally:
        webui.stop()


@pytest.mark.slow
def test_lowvram_says_why_it_cannot_train(tmp_path_factory, ckpt_dir):
    webui = start(tmp_path_factory, ckpt_dir, "--lowvram")
    try:
        webui.post("/lora-train/v1/projects", {"name": "low"})
        add_images(webui, "low", 2)
        status, body = webui.post("/lora-train/v1/jobs", {"project": "low", "config": {}})
        assert status == 400 and "--lowvram" in body["detail"]
    finally:
        webui.stop()


def test_a_lora_baked_in_by_an_earlier_generation_is_removed_before_training(webui):
    """The built-in Lora adds the last prompt's LoRA into the weights and keeps it there; training must start from
    the clean checkpoint, and generation afterwards must match the clean model again."""
    if not (webui.data_dir / "models" / "Lora" / "sks" / "sks-02.safetensors").exists():
        pytest.skip("needs the training test's files")
    before = txt2img(webui)
    baked = txt2img(webui, prompt=TXT2IMG["prompt"] + " <lora:sks-02:1>")
    assert baked != before
    earlier = (webui.data_dir / "models" / "Lora" / "sks" / "sks-02.safetensors").read_bytes()
    # two epochs again: the merge and browser tests below use sks-02
    status, job = webui.post("/lora-train/v1/jobs", {"project": "sks", "config": dict(TRAIN, max_train_epochs=2)})
    assert status == 201, job
    job = wait_job(webui, job["id"])
    assert job["status"] == "done", job["message"]
    assert txt2img(webui) == before
    # a fresh run of the project: the earlier run's epochs were moved into the project's runs/, not overwritten
    moved = list((webui.data_dir / "lora-train" / "sks" / "runs").glob("*/sks-02.safetensors"))
    assert len(moved) == 1 and moved[0].read_bytes() == earlier, job["earlier_run"]
    assert "2 epoch files" in job["earlier_run"]


def test_pause_frees_the_model_for_generation_then_training_continues(webui):
    before = txt2img(webui)
    webui.post("/lora-train/v1/projects", {"name": "pauser"})
    add_images(webui, "pauser")
    status, job = webui.post("/lora-train/v1/jobs", {"project": "pauser", "config": dict(TRAIN, max_train_epochs=30)})
    assert status == 201, job
    end = time.time() + 300
    while time.time() < end and webui.get(f"/lora-train/v1/jobs/{job['id']}")["step"] < 2:
        time.sleep(0.2)
    assert webui.post(f"/lora-train/v1/jobs/{job['id']}/pause")[0] == 200
    while time.time() < end and webui.get(f"/lora-train/v1/jobs/{job['id']}")["status"] != "paused":
        time.sleep(0.2)
    paused_at = webui.get(f"/lora-train/v1/jobs/{job['id']}")["step"]
    assert txt2img(webui) == before, "while paused the webui generates with the clean model"
    assert webui.get(f"/lora-train/v1/jobs/{job['id']}")["step"] == paused_at
    assert webui.post(f"/lora-train/v1/jobs/{job['id']}/resume")[0] == 200
    job = wait_job(webui, job["id"])
    assert job["status"] == "done", job["message"]
    assert job["step"] == job["total_steps"] > paused_at
    assert txt2img(webui) == before


def test_a_generation_in_progress_refuses_a_new_training(webui):
    import threading

    webui.post("/lora-train/v1/projects", {"name": "busy"})
    add_images(webui, "busy", 2)
    slow = threading.Thread(target=txt2img, kwargs={"webui": webui, "steps": 150, "width": 128, "height": 128})
    slow.start()
    try:
        end = time.time() + 30
        while time.time() < end and not webui.get("/sdapi/v1/progress")["state"]["job"]:
            time.sleep(0.05)
        status, body = webui.post("/lora-train/v1/jobs", {"project": "busy", "config": {}})
        assert status == 409 and "generation is in progress" in body["detail"]
    finally:
        slow.join()


def test_merge_into_a_new_checkpoint_listed_without_restart(webui):
    if not (webui.data_dir / "models" / "Lora" / "sks" / "sks-02.safetensors").exists():
        pytest.skip("needs the training test's files")
    title = next(m["title"] for m in webui.get("/sdapi/v1/sd-models") if m["model_name"] == "tiny-sd1")
    status, body = webui.post("/lora-train/v1/merge", {"checkpoint": title, "name": "tiny-sks",
                                                       "loras": [{"name": "sks-02", "weight": 1.0}]})
    assert status == 200, body
    assert Path(body["path"]).is_file() and Path(body["path"]).with_suffix(".yaml").is_file()
    assert "tiny-sks" in {m["model_name"] for m in webui.get("/sdapi/v1/sd-models")}
    status, body = webui.post("/lora-train/v1/merge", {"checkpoint": title, "name": "tiny-sks",
                                                       "loras": [{"name": "sks-02", "weight": 1.0}]})
    assert status == 409 and "already exists" in body["detail"]


@pytest.mark.browser
def test_tab_in_the_webui_page_runs_the_grid_and_sends_it_to_txt2img(webui):
    """In a real browser: the LoRA Train tab, the Test sub-tab's grid through X/Y/Z, and Send to txt2img."""
    pytest.importorskip("playwright")
    from tests.ui.test_browser import CHROMIUM, FLAGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    if not (webui.data_dir / "models" / "Lora" / "sks" / "sks-02.safetensors").exists():
        pytest.skip("needs the training test's files")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(webui.url)
        page.locator("#tabs > .tab-nav button", has_text="LoRA Train").click(timeout=120000)
        page.click("#lora_train_project_refresh")  # projects made after the page loaded
        time.sleep(2)
        project = page.locator("#lora_train_project input")
        project.click()
        page.locator("#lora_train_project ul li", has_text="sks").first.click()
        page.locator("#lora_train_tabs > .tab-nav button", has_text="Test").click()
        page.wait_for_function("() => document.querySelector('#lora_train_test_prompt textarea').value.includes('<lora:sks-01:')")
        page.locator("#lora_train_test_weights textarea, #lora_train_test_weights input").first.fill("0.5, 1")
        for elem, value in (("width", "64"), ("height", "64"), ("steps", "4")):
            page.locator(f"#lora_train_test_{elem} input").fill(value)
        page.click("#lora_train_test_run")
        page.wait_for_selector("#lora_train_test_grid img", timeout=300000)
        assert "Y Values" in page.locator("#lora_train_test_infotext textarea").input_value()
        page.click("#lora_train_test_send")
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:sks-01:0.5>')")
        assert page.locator("#txt2img_script_container #script_list input").first.input_value() == "X/Y/Z plot"
        x_values = page.locator("#script_txt2img_xyz_plot_x_values textarea, #script_txt2img_xyz_plot_x_values input")
        assert x_values.first.input_value() == "sks-01, sks-02"
        browser.close()


@pytest.mark.slow
def test_no_model_loaded_says_so(tmp_path_factory, ckpt_dir):
    webui = Webui(Path(WEBUI_DIR), tmp_path_factory.mktemp("data"), ckpt_dir, ["--skip-load-model-at-start"])
    try:
        end = time.time() + 240
        while "Startup time:" not in webui.log_path.read_text(errors="replace"):
            assert time.time() < end and webui.proc.poll() is None, webui.log_path.read_text()[-2000:]
            time.sleep(1)
        webui.post("/lora-train/v1/projects", {"name": "nomodel"})
        add_images(webui, "nomodel", 2)
        status, body = webui.post("/lora-train/v1/jobs", {"project": "nomodel", "config": {}})
        assert status == 400 and "no model is loaded" in body["detail"]
        assert webui.get("/lora-train/v1/jobs") == []
    finally:
        webui.stop()

"""The training previews' settings go back exactly (lib_lora.webui.preview.settings_restored), also where the webui's
own override restore does not: it remembers only settings already in `opts.data`, i.e. in config.json."""

from __future__ import annotations

import pytest

from lib_lora.webui.preview import settings_restored


class Options:
    """The part of the webui's `shared.opts` involved: `.data` holds what config.json held (never-saved settings are
    absent and read as their defaults)."""

    def __init__(self, data: dict) -> None:
        self.data = dict(data)


def webui_override(opts: Options, overrides: dict) -> None:
    """modules/processing.py::process_images (1.10.1) with override_settings_restore_afterwards: it stores only the
    keys present in opts.data, sets every override, then restores the stored ones."""
    stored = {k: opts.data[k] for k in overrides if k in opts.data}
    for key, value in overrides.items():
        opts.data[key] = value
    for key, value in stored.items():
        opts.data[key] = value


OVERRIDES = {"sd_model_checkpoint": "tiny-sdxl", "CLIP_stop_at_last_layers": 2, "live_previews_enable": False}


def test_the_webui_alone_keeps_overrides_of_never_saved_settings():
    opts = Options({"sd_model_checkpoint": "tiny-sdxl [abc]"})
    webui_override(opts, OVERRIDES)
    assert opts.data["CLIP_stop_at_last_layers"] == 2 and opts.data["live_previews_enable"] is False  # leaked


@pytest.mark.parametrize("saved", [{}, {"CLIP_stop_at_last_layers": 1, "live_previews_enable": True,
                                        "sd_model_checkpoint": "tiny-sdxl [abc]", "other": 3}])
def test_settings_restored_puts_back_present_and_absent_settings(saved):
    opts = Options(saved)
    with settings_restored(opts, OVERRIDES):
        webui_override(opts, OVERRIDES)
    assert opts.data == saved


def test_settings_restored_on_error():
    opts = Options({"live_previews_enable": True})
    with pytest.raises(RuntimeError):
        with settings_restored(opts, OVERRIDES):
            opts.data.update(OVERRIDES)
            raise RuntimeError("preview failed")
    assert opts.data == {"live_previews_enable": True}

"""The comparison's Prompt S/R values and the infotext that "Send to txt2img" pastes."""

from __future__ import annotations

from lib_lora.ui.host import GridRequest
from lib_lora.webui import xyz


def test_prompt_gets_the_first_stem_and_weight_so_prompt_sr_finds_them():
    r = GridRequest(("me-01", "me-02", "me-10"), (0.5, 1.0), prompt="<lora:me-01:0.7>, me, red hair")
    assert xyz.grid_prompt(r) == "<lora:me-01:0.5>, me, red hair"
    x, y = xyz.axes(r)
    assert x == "me-01, me-02, me-10" and y == ":0.5>, :1>"
    assert x.split(", ")[0] in xyz.grid_prompt(r) and y.split(", ")[0] in xyz.grid_prompt(r)


def test_a_prompt_without_lora_tag_gets_one_and_one_weight_means_no_y_axis():
    r = GridRequest(("me-01", "me-02"), (0.8,), prompt="me, smiling")
    assert xyz.grid_prompt(r) == "<lora:me-01:0.8>, me, smiling"
    assert xyz.axes(r)[1] == ""
    r = GridRequest(("me-01",), (), prompt="<lora:old-03:0.6> me")
    assert xyz.grid_prompt(r) == "<lora:me-01:0.6> me"


def test_infotext_is_what_the_webui_parses():
    r = GridRequest(("me-01", "me-02"), (0.5, 1.0), prompt="me", negative_prompt="blurry", seed=7, steps=12,
                    width=64, height=64)
    text = xyz.infotext(r)
    lines = text.splitlines()
    assert lines[0] == "<lora:me-01:0.5>, me" and lines[1] == "Negative prompt: blurry"
    params = lines[2]
    for part in ('Steps: 12', 'Seed: 7', 'Size: 64x64', 'Script: X/Y/Z plot', 'X Type: Prompt S/R',
                 'X Values: "me-01, me-02"', 'Y Type: Prompt S/R', 'Y Values: ":0.5>, :1>"'):
        assert part in params

"""Presets and imported settings land in the tab's fields by name."""

from __future__ import annotations

import json

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import fields
from lib_lora.ui.tab_train import DEFAULTS_PRESET, import_settings, preset_names


def test_kohya_ss_json_and_sd_scripts_toml_fill_the_fields(tmp_path):
    preset = tmp_path / "kohya.json"
    preset.write_text(json.dumps({"network_dim": 32, "network_alpha": 16, "unet_lr": 0.0002, "text_encoder_lr": 5e-05,
                                  "lr_scheduler": "cosine", "epoch": 6, "train_batch_size": 2, "LoRA_type": "Standard"}))
    cfg, notes = import_settings(str(preset))
    values = fields.from_config(cfg)
    assert (values["network_dim"], values["network_alpha"], values["max_train_epochs"]) == (32, 16.0, 6)
    assert (values["unet_lr"], values["lr_scheduler"], values["train_batch_size"]) == (0.0002, "cosine", 2)
    toml = tmp_path / "run.toml"
    toml.write_text('[network]\nnetwork_dim = 8\nnetwork_args = ["conv_dim=4", "conv_alpha=2"]\n'
                    '[training]\nmax_train_epochs = 3\n')
    cfg, _ = import_settings(str(toml))
    values = fields.from_config(cfg)
    assert (values["network_dim"], values["conv_dim"], values["conv_alpha"], values["max_train_epochs"]) == (8, 4, 2.0, 3)
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(BadInput, match="kohya_ss .json or an sd-scripts .toml"):
        import_settings(str(tmp_path / "x.yaml"))


def test_a_saved_preset_loads_back_with_the_same_values(tmp_path):
    from lib_lora.fsutil import atomic_write_text
    from lib_lora.train.config_io import dump_toml, load_toml

    values = dict(fields.defaults(), network_dim=24, conv_dim=2, unet_lr=3e-4, shuffle_caption=False)
    atomic_write_text(tmp_path / "mine.toml", dump_toml(fields.build_config(values, {}), only_changed=True))
    assert preset_names(tmp_path) == [DEFAULTS_PRESET, "mine"]
    back = fields.from_config(load_toml(tmp_path / "mine.toml"))
    assert {k: back[k] for k in values if k != "sample_prompts"} == {k: v for k, v in values.items() if k != "sample_prompts"}

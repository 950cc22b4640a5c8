from __future__ import annotations

import dataclasses

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import fields


def test_first_lora_defaults_are_the_documented_ones():
    cfg = fields.build_config(fields.defaults(), {})
    assert (cfg.network_dim, cfg.network_alpha) == (16, 8.0)
    assert (cfg.unet_lr, cfg.text_encoder_lr) == (5e-4, 1e-4)
    assert (cfg.lr_scheduler, cfg.lr_scheduler_num_cycles, cfg.lr_warmup_steps) == ("cosine_with_restarts", 3, 0.05)
    assert (cfg.max_train_epochs, cfg.save_every_n_epochs, cfg.min_snr_gamma) == (10, 1, 5.0)
    assert cfg.network_args == () and cfg.noise_offset is None


def test_every_field_is_a_config_field_or_a_known_tab_field():
    from lib_lora.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.name for f in fields.FIELDS} - names == set(fields.PSEUDO)
    assert len({f.name for f in fields.FIELDS}) == len(fields.FIELDS)
    for f in fields.FIELDS:
        assert f.group in fields.GROUPS
        if f.widget == "dropdown":
            assert f.default in fields.choices(f), f.name


def test_values_round_trip_through_a_config():
    values = dict(fields.defaults(), network_dim=32, conv_dim=4, conv_alpha=2.0, text_encoder_lr=0.0,
                  optimizer_args="weight_decay=0.1 betas=0.9,0.99", sample_prompts="a cat\n\nA dog", seed=-1)
    cfg = fields.build_config(values, {})
    assert cfg.network_args == ("conv_dim=4", "conv_alpha=2")  # as typed in sd-scripts' ss_network_args, not "2.0"
    assert fields.build_config(dict(values, conv_alpha=0.5), {}).network_args == ("conv_dim=4", "conv_alpha=0.5")
    assert cfg.network_train_unet_only and cfg.seed is None
    assert cfg.optimizer_args == ("weight_decay=0.1", "betas=0.9,0.99")
    assert cfg.sample_prompts == ("a cat", "A dog")
    back = fields.from_config(cfg)
    assert back.pop("sample_prompts") == "a cat\nA dog"  # blank lines are dropped
    values.pop("sample_prompts")
    assert {k: back[k] for k in values} == values


@pytest.mark.parametrize("name,value,needle", [
    ("network_dim", 0, "between 1 and 1024"),
    ("network_dim", 2.5, "whole number"),
    ("unet_lr", "abc", "not a number"),
    ("max_train_epochs", 100000, "between"),
    ("caption_dropout_rate", 2, "between 0 and 1"),
])
def test_out_of_range_settings_name_the_field(name, value, needle):
    values = dict(fields.defaults(), **{name: value})
    with pytest.raises(BadInput, match=needle) as info:
        fields.build_config(values, {})
    assert fields.BY_NAME[name].label in str(info.value)


def test_unknown_names_are_refused():
    with pytest.raises(BadInput, match="unknown setting"):
        fields.to_config_values({"network_dimm": 3})

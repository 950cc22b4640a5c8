"""NetworkConfig: sd-scripts' options carry over; bad values are refused with a message naming them."""

import subprocess
import sys
from pathlib import Path

import pytest

from lib_lora.errors import BadInput
from lib_lora.network.config import NetworkConfig


def test_from_args_reads_kohya_network_args():
    cfg = NetworkConfig.from_args(16, 8, ["conv_dim=8", "rank_dropout=0.1", "module_dropout=0.2"], dropout=0.1)
    assert (cfg.dim, cfg.alpha, cfg.conv_dim, cfg.conv_alpha) == (16, 8, 8, 1.0)  # conv_alpha defaults to 1
    assert (cfg.dropout, cfg.rank_dropout, cfg.module_dropout) == (0.1, 0.1, 0.2)
    assert cfg.is_locon
    # the args as the user gave them (sd-scripts stores its raw strings; conv_alpha's default is not an arg)
    assert cfg.network_args() == {"conv_dim": "8", "rank_dropout": "0.1", "module_dropout": "0.2"}
    assert NetworkConfig.from_args(4, 1, {"conv_dim": "4", "conv_alpha": "2"}).effective_conv_alpha == 2.0


def test_network_args_keep_the_strings_the_user_gave():
    assert NetworkConfig.from_args(16, 8, ["conv_dim=8", "conv_alpha=4"]).network_args() == {"conv_dim": "8", "conv_alpha": "4"}
    assert NetworkConfig.from_args(16, 8, {"conv_dim": 8, "conv_alpha": 0.5}).network_args() == {"conv_dim": "8", "conv_alpha": "0.5"}
    assert NetworkConfig.from_args(16, 8, []).network_args() == {}
    assert NetworkConfig.from_args(16, 8, [], dropout=0.1).network_args() == {}
    # built directly (no command line): the args a kohya user would type for it
    assert NetworkConfig(dim=4, conv_dim=8, conv_alpha=4).network_args() == {"conv_dim": "8", "conv_alpha": "4"}
    assert NetworkConfig(dim=4, conv_dim=8, conv_alpha=0.5).network_args() == {"conv_dim": "8", "conv_alpha": "0.5"}
    assert NetworkConfig(dim=4).network_args() == {}
    # equal configs stay equal however they were spelled (resume compares configs)
    assert NetworkConfig.from_args(4, 1, ["conv_dim=8", "conv_alpha=4"]) == NetworkConfig.from_args(4, 1, ["conv_dim=8", "conv_alpha=4.0"])


def test_alpha_none_or_zero_means_rank():
    assert NetworkConfig(dim=8, alpha=None).effective_alpha == 8.0
    assert NetworkConfig(dim=8, alpha=0).effective_alpha == 8.0
    assert NetworkConfig(dim=8, conv_dim=4).effective_conv_alpha == 4.0


@pytest.mark.parametrize("kwargs,args,message", [
    (dict(dim=0), [], "network_dim"),
    (dict(dim=4.5), [], "network_dim"),
    (dict(alpha=-1), [], "alpha"),
    (dict(dropout=1.0), [], "dropout"),
    (dict(), ["conv_dim=0"], "conv_dim"),
    (dict(), ["conv_dim=3.5"], "whole number"),
    (dict(), ["conv_dim=abc"], "must be a number"),
    (dict(), ["conv_alpha=1"], "without conv_dim"),
    (dict(), ["use_tucker=True"], "unknown network arg 'use_tucker'"),
    (dict(), ["conv_dim"], "not key=value"),
    (dict(train_unet=False, train_text_encoder=False), [], "nothing to train"),
])
def test_bad_values(kwargs, args, message):
    with pytest.raises(BadInput, match=message):
        NetworkConfig.from_args(network_args=args, **kwargs)


def test_config_and_names_import_without_torch():
    code = "import sys, lib_lora.network, lib_lora.network.config, lib_lora.network.unet_names; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "False"

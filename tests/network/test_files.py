"""LoRA files: round trip, metadata the webui reads, hashes, sidecar, loading other files, bad files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct

import pytest
import torch

from lib_lora.errors import BadInput, IncompatibleFile
from lib_lora.network import (
    KEY_GRAMMAR, LoraNetwork, NetworkConfig, build_metadata, file_model_hash, find_targets, load_lora, lora_path, save_lora,
    write_sidecar,
)
from tests.network.helpers import clip_forward, ldm_unet_forward

LOCON = NetworkConfig.from_args(4, 2.0, ["conv_dim=2", "conv_alpha=1"])


@pytest.fixture(scope="module")
def sd1_models():
    from tests.fixtures.ldm_models import clip_embedder, ldm_unet

    return ldm_unet("sd1"), clip_embedder()


@pytest.fixture(scope="module")
def trained(sd1_models):
    """An SD1 LoCon network with non-zero up weights (as after training)."""
    unet, te = sd1_models
    net = LoraNetwork(find_targets(unet, {"lora_te": te}, "sd1", LOCON), LOCON).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    return net


def sd1_metadata(name="mylora", **kw):
    return build_metadata(
        arch="sd1", output_name=name, network=LOCON, resolution=(512, 512), clip_skip=2, base_model="v1-5.safetensors",
        tag_frequency={"10_mychar": {"mychar": 12, "smile": 3}}, dataset_dirs={"10_mychar": {"n_repeats": 10, "img_count": 12}},
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 120}}, "mean_img_ar_error": 0.0},
        training={"learning_rate": 1e-4, "num_epochs": 10, "optimizer": "AdamW", "cache_latents": True},
        epoch=3, steps=360, **kw,
    )


def header_of(path) -> tuple[bytes, dict]:
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], json.loads(data[8:8 + n])


# ----------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_load_round_trip(tmp_path, trained, precision, dtype):
    path = save_lora(tmp_path / "mylora-03.safetensors", trained, sd1_metadata(), precision)
    tensors, metadata = load_lora(path)
    expected = trained.state_dict()
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == dtype and torch.equal(tensors[key], value.to(dtype)), key
        assert KEY_GRAMMAR.match(key)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].shape == ()
    assert os.listdir(tmp_path) == ["mylora-03.safetensors"]  # no temp file left behind


def test_loaded_file_reproduces_the_network(tmp_path, trained, sd1_models):
    unet, te = sd1_models
    path = save_lora(tmp_path / "a.safetensors", trained, None, "fp32")
    tensors, _ = load_lora(path)
    loaded = LoraNetwork.from_kohya(find_targets(unet, {"lora_te": te}, "sd1", LOCON), tensors)
    with torch.no_grad():
        with trained.inject():
            want = (ldm_unet_forward(unet, "sd1"), clip_forward(te))
        with loaded.inject():
            got = (ldm_unet_forward(unet, "sd1"), clip_forward(te))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_header_and_metadata_as_the_webui_reads_them(tmp_path, trained):
    path = save_lora(tmp_path / "mylora-03.safetensors", trained, sd1_metadata("mylora"), "fp16")
    raw, header = header_of(path)
    assert raw[:2] == b'{"'
    meta = header["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_output_name"] == "mylora-03" == meta["modelspec.title"]  # the epoch file's own stem
    assert json.loads(meta["ss_tag_frequency"]) == {"10_mychar": {"mychar": 12, "smile": 3}}
    assert json.loads(meta["ss_dataset_dirs"])["10_mychar"]["img_count"] == 12
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["resolution"] == [512, 512]
    # sd-scripts: the --network_args strings as given, plus the network dropout it injects (None -> null)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1", "dropout": None}
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("False", "sd_v1")
    assert (meta["ss_resolution"], meta["ss_clip_skip"], meta["ss_epoch"], meta["ss_steps"]) == ("(512, 512)", "2", "3", "360")
    assert (meta["ss_learning_rate"], meta["ss_num_epochs"], meta["ss_cache_latents"]) == ("0.0001", "10", "True")
    assert float(meta["ss_training_started_at"]) > 0
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert (meta["modelspec.resolution"], meta["modelspec.prediction_type"], meta["modelspec.encoder_layer"]) == ("512x512", "epsilon", "2")


def test_network_args_key_only_when_args_were_given(tmp_path):
    def meta_for(cfg):
        return build_metadata(arch="sd1", output_name="x", network=cfg)

    plain = meta_for(NetworkConfig.from_args(4, 1, [], dropout=0.1))
    assert "ss_network_args" not in plain and plain["ss_network_dropout"] == "0.1"  # sd-scripts omits the key
    assert "ss_network_args" not in meta_for(NetworkConfig(dim=4))
    with_dropout = meta_for(NetworkConfig.from_args(4, 1, ["conv_dim=8", "conv_alpha=4"], dropout=0.1))
    assert with_dropout["ss_network_args"] == '{"conv_dim": "8", "conv_alpha": "4", "dropout": 0.1}'
    # a file without the key reads back and inspects like any other
    from lib_lora.network.inspect import describe

    path = save_lora(tmp_path / "plain.safetensors", {"lora_unet_a_b.lora_down.weight": torch.zeros(1, 2),
                                                      "lora_unet_a_b.lora_up.weight": torch.zeros(2, 1)}, plain, "fp32")
    assert "ss_network_args" not in load_lora(path)[1]
    info = describe(path)
    assert info["network_type"] == "LoRA" and "network args" not in info["metadata"]
    assert info["metadata"]["network dropout"] == "0.1"  # without args the dropout is only in ss_network_dropout


def webui_sd_version(meta: dict) -> str:
    """The webui's NetworkOnDisk.detect_version (webui-api.md 4.11)."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if meta.get("ss_v2") == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize("arch,vpred,version,spec,impl,reso", [
    ("sd1", False, "sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", True, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sd2", False, "sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sdxl", False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models", "1024x1024"),
])
def test_family_keys(arch, vpred, version, spec, impl, reso):
    meta = build_metadata(arch=arch, output_name="x", network=NetworkConfig(), v_prediction=vpred)
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == spec
    assert meta["modelspec.implementation"] == impl and meta["modelspec.resolution"] == reso
    assert meta["modelspec.prediction_type"] == ("v" if vpred else "epsilon")
    assert webui_sd_version(meta) == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[arch]
    assert all(isinstance(v, str) for v in meta.values())


# --------------------------------------------------------------------------------------------------- hashes
def test_model_hash_is_sha256_of_the_data_section(tmp_path, trained):
    path = save_lora(tmp_path / "h.safetensors", trained, sd1_metadata(), "fp16")
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    independent = hashlib.sha256(data[8 + n:]).hexdigest()
    _, meta = load_lora(path)
    assert meta["sshs_model_hash"] == independent == file_model_hash(path)


@pytest.mark.parametrize("with_ss_metadata", [True, False])
def test_legacy_hash_as_sd_scripts_computes_it(tmp_path, with_ss_metadata):
    """0x10000 bytes at 0x100000 of a serialisation with only the ss_* metadata (needs a file > 1 MiB). Without
    any ss_* key sd-scripts still passes a dict (`{}`), so its header holds an empty `__metadata__`."""
    from safetensors.torch import save as serialise

    gen = torch.Generator().manual_seed(0)
    state = {
        "lora_unet_x_to_q.lora_down.weight": torch.randn(256, 1024, generator=gen),
        "lora_unet_x_to_q.lora_up.weight": torch.randn(1024, 256, generator=gen),
        "lora_unet_x_to_q.alpha": torch.tensor(8.0),
    }
    metadata = sd1_metadata() if with_ss_metadata else {"modelspec.title": "big"}
    path = save_lora(tmp_path / "big.safetensors", state, metadata, "fp32")
    tensors, meta = load_lora(path)
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    buffer = serialise(tensors, metadata=ss_only)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


# -------------------------------------------------------------------------------------------------- sidecar
def test_lora_path_names_epoch_files(tmp_path):
    assert lora_path(tmp_path, "mylora", 3) == tmp_path / "mylora-03.safetensors"
    assert lora_path(tmp_path, " mylora ") == tmp_path / "mylora.safetensors"


def test_sidecar_has_exactly_the_webui_keys(tmp_path):
    path = write_sidecar(tmp_path / "mylora-03.safetensors", "mychar, smile", 0.8, "sdxl", "trained on 12 images")
    assert path.name == "mylora-03.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"activation text": "mychar, smile", "preferred weight": 0.8, "sd version": "SDXL",
                    "description": "trained on 12 images"}
    with pytest.raises(BadInput, match="sd version"):
        write_sidecar(tmp_path / "b.safetensors", "", 1.0, "SD3")
    assert sorted(os.listdir(tmp_path)) == ["mylora-03.json"]


def test_sidecar_keeps_what_the_user_added_in_the_webui(tmp_path):
    """A re-run saves `mylora-03.json` again; the notes and negative text typed into the webui's card for it stay
    (our four keys are written afresh). A card that is not a JSON object is simply replaced."""
    card = tmp_path / "mylora-03.json"
    card.write_text(json.dumps({"description": "old", "activation text": "old", "notes": "best at 0.7, CFG 5",
                                "negative text": "blurry", "preferred weight": 0.7, "sd version": "SD1"}), "utf-8")
    write_sidecar(tmp_path / "mylora-03.safetensors", "mychar", 0.0, "sd1")
    data = json.loads(card.read_text(encoding="utf-8"))
    assert data == {"activation text": "mychar", "preferred weight": 0.0, "sd version": "SD1", "description": "",
                    "notes": "best at 0.7, CFG 5", "negative text": "blurry"}
    card.write_text("[1, 2", "utf-8")
    write_sidecar(tmp_path / "mylora-03.safetensors", "mychar", 0.0, "sd1")
    assert json.loads(card.read_text(encoding="utf-8"))["activation text"] == "mychar"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "x..y", ".."])
def test_unsafe_output_names_are_refused_and_nothing_is_written(tmp_path, trained, name):
    with pytest.raises(BadInput) as err:
        build_metadata(arch="sd1", output_name=name, network=LOCON)
    assert "\n" not in str(err.value) and "output name" in str(err.value)
    (tmp_path / "out").mkdir()
    with pytest.raises(BadInput):
        lora_path(tmp_path / "out", name, epoch=3)
    if ".." in name or "\\" in name:  # what a joined path can still show; separators are lora_path's job
        with pytest.raises(BadInput):
            save_lora(tmp_path / "out" / f"{name}.safetensors", trained, None)
        with pytest.raises(BadInput):
            write_sidecar(tmp_path / "out" / f"{name}.safetensors", "x", 1.0, "SD1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]


def test_bad_metadata_or_precision_writes_nothing(tmp_path, trained):
    with pytest.raises(BadInput, match="must be a string"):
        save_lora(tmp_path / "a.safetensors", trained, {"ss_epoch": 3})
    with pytest.raises(BadInput, match="precision"):
        save_lora(tmp_path / "a.safetensors", trained, None, "int8")
    with pytest.raises(BadInput, match=r"\.safetensors"):
        save_lora(tmp_path / "a.ckpt", trained, None)
    assert os.listdir(tmp_path) == []


def test_full_disk_keeps_the_previous_file(tmp_path, trained, monkeypatch):
    path = save_lora(tmp_path / "a.safetensors", trained, sd1_metadata(), "fp16")
    before = path.read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    sidecar = write_sidecar(path, "mychar", 0.8, "sd1")
    card = sidecar.read_bytes()
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BadInput, match=r"could not write a\.safetensors: disk full") as err:  # not a raw OSError
        save_lora(path, trained, sd1_metadata(), "fp32")
    assert "\n" not in str(err.value)
    with pytest.raises(BadInput, match=r"could not write a\.json: disk full"):
        write_sidecar(path, "other", 1.0, "sd1")
    assert path.read_bytes() == before and sidecar.read_bytes() == card
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]


def _one_line(exc: Exception) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def test_unreadable_files_give_one_line_errors(tmp_path, trained):
    good = save_lora(tmp_path / "good.safetensors", trained, sd1_metadata(), "fp16")
    data = good.read_bytes()
    cases = {
        "missing.safetensors": (None, "no such file"),
        "empty.safetensors": (b"", "empty or truncated"),
        "garbage.safetensors": (os.urandom(4096), "not a safetensors file"),
        "truncated.safetensors": (data[:-100], "truncated"),
        "headless.safetensors": (data[:200], "truncated"),
        "notjson.safetensors": (struct.pack("<Q", 4) + b"abcd", "not JSON"),
        "model.ckpt": (b"PK\x03\x04" + os.urandom(100), "only .safetensors"),
    }
    for name, (content, reason) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(IncompatibleFile) as err:
            load_lora(tmp_path / name)
        assert reason in _one_line(err.value) and name in str(err.value), name


def test_a_file_for_another_architecture_names_the_unmatched_keys(tmp_path, sd1_models):
    from tests.fixtures.ldm_models import ldm_unet

    sdxl_net = LoraNetwork(find_targets(ldm_unet("sdxl"), None, "sdxl", LOCON), LOCON)
    path = save_lora(tmp_path / "xl.safetensors", sdxl_net, None)
    tensors, _ = load_lora(path)
    unet, te = sd1_models
    with pytest.raises(IncompatibleFile) as err:
        LoraNetwork.from_kohya(find_targets(unet, {"lora_te": te}, "sd1", LOCON), tensors)
    message = _one_line(err.value)
    assert "another architecture" in message and "lora_unet_input_blocks_" in message
    with pytest.raises(IncompatibleFile, match="match no layer"):
        LoraNetwork(find_targets(unet, None, "sd1", LOCON), LOCON).load_kohya(tensors)


def test_locon_file_into_plain_lora_targets_lists_the_conv_modules(trained, sd1_models):
    unet, te = sd1_models
    plain = NetworkConfig(dim=4)
    with pytest.raises(IncompatibleFile, match="resnets_0_conv1"):
        LoraNetwork.from_kohya(find_targets(unet, {"lora_te": te}, "sd1", plain), trained.state_dict())


def test_foreign_spellings_are_normalised_at_load(sd1_models, trained):
    """PEFT lora_A/lora_B spellings load as down/up; a missing alpha means alpha = rank (scale 1)."""
    unet, te = sd1_models
    foreign = {}
    for key, value in trained.state_dict().items():
        if key.endswith(".alpha"):
            continue
        foreign[key.replace("lora_down.weight", "lora_A.weight").replace("lora_up.weight", "lora_B.weight")] = value
    loaded = LoraNetwork.from_kohya(find_targets(unet, {"lora_te": te}, "sd1", LOCON), foreign)
    lora = loaded.lora_te_text_model_encoder_layers_0_mlp_fc1
    assert float(lora.alpha) == lora.rank == 4 and lora.scale == 1.0
    assert torch.equal(lora.lora_down.weight, trained.lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unet_names_in_the_other_spelling_load(arch):
    """diffusers' SDXL scripts write `lora_unet_down_blocks_...` (sd-scripts: `lora_unet_input_blocks_...`); some SD1
    files carry ldm names. The webui and our merge read both spellings, so the network loads them too."""
    from lib_lora.network import unet_layout, unet_targets
    from lib_lora.network.unet_names import ldm_to_diffusers
    from tests.fixtures.ldm_models import ldm_unet

    unet = ldm_unet(arch)
    targets = unet_targets(unet, arch, LOCON)
    trained = LoraNetwork(targets, LOCON).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in trained.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    ldm_path = {id(module): path for path, module in unet.named_modules()}
    other = {}
    for name, module in targets:  # sdxl: the diffusers path of the layer; sd1: its ldm path
        path = ldm_to_diffusers(ldm_path[id(module)], unet_layout(unet)) if arch == "sdxl" else ldm_path[id(module)]
        other[name] = "lora_unet_" + path.replace(".", "_")
        assert other[name] != name
    foreign = {f"{other[m]}.{p}": v for m, p, v in ((*k.split(".", 1), v) for k, v in trained.state_dict().items())}

    loaded = LoraNetwork.from_kohya(targets, foreign)
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        with trained.inject():
            want = ldm_unet_forward(unet, arch)
        with loaded.inject():
            got = ldm_unet_forward(unet, arch)
    assert torch.equal(want, got)
    fresh = LoraNetwork(targets, LOCON)
    fresh.load_kohya(foreign)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
    doubled = {**trained.state_dict(), **foreign}  # one layer under both names: ambiguous, refused
    with pytest.raises(IncompatibleFile, match="in the file twice"):
        LoraNetwork.from_kohya(targets, doubled)


def test_alpha_without_weights_is_ignored_but_a_lone_down_is_refused(sd1_models, trained):
    """sd-scripts builds networks from the `lora_down` keys and ignores an `.alpha` that has no weights beside it;
    such a module changes nothing, so it is no reason to refuse the file. Half a module (down without up) is."""
    unet, te = sd1_models
    targets = find_targets(unet, {"lora_te": te}, "sd1", LOCON)
    state = {**trained.state_dict(), "lora_unet_conv_in.alpha": torch.tensor(4.0),
             "lora_te_text_model_encoder_layers_9_mlp_fc1.alpha": torch.tensor(4.0)}
    loaded = LoraNetwork.from_kohya(targets, state)
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    del state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    with pytest.raises(IncompatibleFile, match="lora_te_text_model_encoder_layers_0_mlp_fc1 has no lora_up.weight"):
        LoraNetwork.from_kohya(targets, state)


def test_other_network_types_are_refused(sd1_models):
    unet, te = sd1_models
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 32)}
    with pytest.raises(IncompatibleFile, match="LoHa"):
        LoraNetwork.from_kohya(find_targets(unet, None, "sd1", LOCON), loha)
    peft_named = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(IncompatibleFile, match="not kohya"):
        LoraNetwork.from_kohya(find_targets(unet, None, "sd1", LOCON), peft_named)


@pytest.mark.parametrize("part,value", [("alpha", float("nan")), ("lora_up.weight", float("inf"))])
def test_non_finite_values_are_refused_naming_the_module(sd1_models, trained, part, value):
    """A diverged or damaged file would turn every image black; the merge refuses it too."""
    unet, te = sd1_models
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    key = f"lora_te_text_model_encoder_layers_0_mlp_fc1.{part}"
    state[key] = torch.full_like(state[key], value) if part == "alpha" else state[key].index_fill(0, torch.tensor([0]), value)
    with pytest.raises(IncompatibleFile, match="lora_te_text_model_encoder_layers_0_mlp_fc1.*NaN or infinite") as err:
        LoraNetwork.from_kohya(find_targets(unet, {"lora_te": te}, "sd1", LOCON), state)
    assert "\n" not in str(err.value)
    with pytest.raises(IncompatibleFile, match="NaN or infinite"):
        LoraNetwork(find_targets(unet, {"lora_te": te}, "sd1", LOCON), LOCON).load_kohya(state)


def test_conv_1x1_projection_lora_loads_into_linear_projection():
    """sd-scripts' own SD2 single-file training writes 4-D proj_in LoRA; a Linear projection takes it reshaped."""
    proj = torch.nn.Linear(32, 32)
    net = LoraNetwork([("lora_unet_down_blocks_0_attentions_0_proj_in", proj)], NetworkConfig(dim=4))
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    net.load_kohya(state)
    assert torch.equal(net.lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight,
                       state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].reshape(4, 32))
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.randn(8, 32)
    with pytest.raises(IncompatibleFile, match="does not fit|!="):
        net.load_kohya(state)


# ------------------------------------------------------------------------------------------------ diffusers
def test_diffusers_loads_our_sd1_file_exactly(tmp_path, clip_tokenizer, caplog):
    """diffusers' kohya converter + PEFT take every key (no unexpected / missing keys warning) and compute the
    same UNet and text-encoder outputs as our injected network."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import logging

    from diffusers.utils import logging as diffusers_logging

    from tests.fixtures.diffusers_models import build_components, build_pipeline

    pipe = build_pipeline("sd1", clip_tokenizer, seed=7)
    ref = build_components("sd1", clip_tokenizer, seed=7)
    cfg = NetworkConfig.from_args(4, 2.0, ["conv_dim=2", "conv_alpha=1"])
    net = LoraNetwork(find_targets(ref["unet"], {"lora_te": ref["text_encoder"]}, "sd1", cfg), cfg).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    save_lora(tmp_path / "mylora.safetensors", net, sd1_metadata("mylora"), "fp32")

    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([10])
    ids = clip_tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before_te = pipe.text_encoder(ids)[0]
        before = pipe.unet(x, t, encoder_hidden_states=before_te).sample
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(str(tmp_path), weight_name="mylora.safetensors")
    finally:
        diffusers_logging.disable_propagation()
    complaints = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage().lower()
                  or "missing" in r.getMessage().lower() or "not correctly" in r.getMessage().lower() or "no lora keys" in r.getMessage().lower()]
    assert complaints == []
    with torch.no_grad():
        after_te = pipe.text_encoder(ids)[0]
        after = pipe.unet(x, t, encoder_hidden_states=after_te).sample
        with net.inject():
            ours_te = ref["text_encoder"](ids)[0]
            ours = ref["unet"](x, t, encoder_hidden_states=ours_te).sample
    assert not torch.allclose(after, before) and not torch.allclose(after_te, before_te)
    torch.testing.assert_close(after_te, ours_te, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-4)

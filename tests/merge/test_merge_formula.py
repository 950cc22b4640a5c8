"""Every touched tensor equals W + m * (alpha/dim) * up @ down; every other tensor is byte-identical."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_lora.merge import merge_loras
from tests.merge.lora_files import (
    SD1_TE, SD2_TE, U, XL_TE1, XL_TE2, expected_checkpoint, make_lora, qkv_rows, raw_tensors, save_checkpoint,
    write_lora,
)

# (kohya name, checkpoint key, rows of a fused in_proj or None), written by hand for the tiny 1-resnet layouts
SD_UNET = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", U + "input_blocks.1.1.proj_in.weight", None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     U + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", None),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
     U + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", None),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
     U + "middle_block.1.transformer_blocks.0.ff.net.2.weight", None),
    ("lora_unet_mid_block_attentions_0_proj_out", U + "middle_block.1.proj_out.weight", None),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v",
     U + "output_blocks.2.1.transformer_blocks.0.attn2.to_v.weight", None),
    ("lora_unet_up_blocks_1_attentions_1_proj_out", U + "output_blocks.3.1.proj_out.weight", None),
    # LoCon: 3x3 convs, 1x1 shortcut, time embedding Linear, down/upsamplers
    ("lora_unet_down_blocks_0_resnets_0_conv1", U + "input_blocks.1.0.in_layers.2.weight", None),
    ("lora_unet_mid_block_resnets_1_conv2", U + "middle_block.2.out_layers.3.weight", None),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", U + "input_blocks.3.0.skip_connection.weight", None),
    ("lora_unet_up_blocks_1_resnets_1_time_emb_proj", U + "output_blocks.3.0.emb_layers.1.weight", None),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", U + "input_blocks.2.0.op.weight", None),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", U + "output_blocks.1.1.conv.weight", None),
]
SD1_TEXT = [
    (f"lora_te_text_model_encoder_layers_{n}_{part}", f"{SD1_TE}encoder.layers.{n}.{path}.weight", None)
    for n in (0, 1)
    for part, path in [("self_attn_q_proj", "self_attn.q_proj"), ("self_attn_k_proj", "self_attn.k_proj"),
                       ("self_attn_v_proj", "self_attn.v_proj"), ("self_attn_out_proj", "self_attn.out_proj"),
                       ("mlp_fc1", "mlp.fc1"), ("mlp_fc2", "mlp.fc2")]
]


def openclip_text(lora_prefix: str, ckpt_prefix: str, d: int = 32):
    out = []
    for n in (0, 1):
        base = f"{lora_prefix}_text_model_encoder_layers_{n}_"
        for which in "qkv":
            out.append((f"{base}self_attn_{which}_proj", f"{ckpt_prefix}{n}.attn.in_proj_weight", qkv_rows(which, d)))
        out += [(f"{base}self_attn_out_proj", f"{ckpt_prefix}{n}.attn.out_proj.weight", None),
                (f"{base}mlp_fc1", f"{ckpt_prefix}{n}.mlp.c_fc.weight", None),
                (f"{base}mlp_fc2", f"{ckpt_prefix}{n}.mlp.c_proj.weight", None)]
    return out


SD2_TEXT = openclip_text("lora_te", SD2_TE)
SDXL_UNET = [  # SAI / ldm names, as sd-scripts writes SDXL
    ("lora_unet_input_blocks_3_1_proj_in", U + "input_blocks.3.1.proj_in.weight", None),
    ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",
     U + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight", None),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
     U + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", None),
    ("lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_out_0",
     U + "output_blocks.0.1.transformer_blocks.1.attn1.to_out.0.weight", None),
    ("lora_unet_output_blocks_1_1_proj_out", U + "output_blocks.1.1.proj_out.weight", None),
    ("lora_unet_input_blocks_1_0_in_layers_2", U + "input_blocks.1.0.in_layers.2.weight", None),
    ("lora_unet_input_blocks_3_0_skip_connection", U + "input_blocks.3.0.skip_connection.weight", None),
    ("lora_unet_input_blocks_2_0_op", U + "input_blocks.2.0.op.weight", None),
    ("lora_unet_output_blocks_1_2_conv", U + "output_blocks.1.2.conv.weight", None),
    ("lora_unet_output_blocks_0_0_emb_layers_1", U + "output_blocks.0.0.emb_layers.1.weight", None),
]
SDXL_TEXT = [
    (f"lora_te1_text_model_encoder_layers_{n}_{part}", f"{XL_TE1}encoder.layers.{n}.{path}.weight", None)
    for n in (0, 1)
    for part, path in [("self_attn_q_proj", "self_attn.q_proj"), ("self_attn_v_proj", "self_attn.v_proj"),
                       ("mlp_fc2", "mlp.fc2")]
] + openclip_text("lora_te2", XL_TE2)


def run_merge(tmp_path, ckpt_path, specs, name="out.safetensors", **kwargs):
    out = tmp_path / name
    report = merge_loras(ckpt_path, specs, out, **kwargs)
    return out, report


def assert_merged(out, ckpt: dict, expected: dict[str, torch.Tensor], atol=1e-5, rtol=0.0):
    """Touched tensors: values within atol of the formula. All others: same dtype, same bytes as the input."""
    _, got = raw_tensors(out)
    assert set(got) == set(ckpt)
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    for key, value in expected.items():
        assert loaded[key].dtype == ckpt[key].dtype, key
        torch.testing.assert_close(loaded[key].float(), value, atol=atol, rtol=rtol, msg=key)
        assert not torch.equal(loaded[key].float(), ckpt[key].float()), f"{key} did not change"
    for key, tensor in ckpt.items():
        if key in expected:
            continue
        dtype, shape, data = got[key]
        assert list(shape) == list(tensor.shape), key
        assert data == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), f"{key} changed"


def test_sd1_every_kind_of_target(tmp_path, ckpts):
    path, sd = ckpts["sd1"]
    targets = SD_UNET + SD1_TEXT
    modules = make_lora(targets, sd, rank=4, alpha=2.0)
    lora = write_lora(tmp_path / "sd1.safetensors", modules)
    out, report = run_merge(tmp_path, path, [(lora, 0.8)])
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 0.8)]))
    assert report.arch == "sd1"
    assert report.modules_merged == {"unet": len(SD_UNET), "te": len(SD1_TEXT)}
    assert report.tensors_changed == len(targets) and report.not_found == []
    assert sd[SD_UNET[0][1]].ndim == 4  # SD1 proj_in is a 1x1 conv: the 4-D case is really exercised


def test_sd1_linear_spelled_proj_lora_into_conv_proj(tmp_path, ckpts):
    """A 2-D LoRA (diffusers-trained SD1) on the 4-D 1x1 proj_in of an ldm SD1 checkpoint is reshaped."""
    path, sd = ckpts["sd1"]
    targets = SD_UNET[:1]
    modules = make_lora(targets, sd, conv_shape="linear")
    assert modules[targets[0][0]][0].ndim == 2
    out, _ = run_merge(tmp_path, path, [(write_lora(tmp_path / "l.safetensors", modules), 1.0)])
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 1.0)]))


def test_locon_3x3_delta_equals_composed_convolutions(tmp_path, ckpts):
    """The 3x3 update is what running down (3x3) then up (1x1) does: conv(x, W') = conv(x, W) + s * up(down(x))."""
    path, sd = ckpts["sd1"]
    name, key, _ = SD_UNET[9]
    modules = make_lora([(name, key, None)], sd, rank=3, alpha=1.5)
    out, _ = run_merge(tmp_path, path, [(write_lora(tmp_path / "l.safetensors", modules), 0.7)])
    from safetensors.torch import load_file

    merged = load_file(str(out))[key]
    down, up, alpha = modules[name]
    x = torch.randn(2, sd[key].shape[1], 8, 8)
    want = F.conv2d(x, sd[key], padding=1) + 0.7 * 1.5 / 3 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, merged, padding=1), want, atol=1e-4, rtol=0)


def test_sd2_fused_qkv_slices_and_linear_proj(tmp_path, ckpts):
    path, sd = ckpts["sd2"]
    targets = SD_UNET + SD2_TEXT
    modules = make_lora(targets, sd, rank=4, alpha=3.0)
    out, report = run_merge(tmp_path, path, [(write_lora(tmp_path / "sd2.safetensors", modules), 0.6)])
    assert sd[SD_UNET[0][1]].ndim == 2  # SD2 proj_in is Linear
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 0.6)]))
    assert report.modules_merged == {"unet": len(SD_UNET), "te": len(SD2_TEXT)}
    assert report.arch == "sd2"


def test_sd2_only_q_leaves_k_and_v_rows_unchanged(tmp_path, ckpts):
    path, sd = ckpts["sd2"]
    key = f"{SD2_TE}1.attn.in_proj_weight"
    targets = [("lora_te_text_model_encoder_layers_1_self_attn_q_proj", key, (0, 32))]
    modules = make_lora(targets, sd)
    out, _ = run_merge(tmp_path, path, [(write_lora(tmp_path / "q.safetensors", modules), 1.0)])
    from safetensors.torch import load_file

    merged = load_file(str(out))[key]
    assert torch.equal(merged[32:], sd[key][32:])
    assert not torch.equal(merged[:32], sd[key][:32])
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 1.0)]))


def test_sd2_conv_spelled_proj_lora_into_linear_proj(tmp_path, ckpts):
    """sd-scripts' own SD2 files carry 4-D (r, C, 1, 1) proj LoRA; the webui's SD2 proj is Linear."""
    path, sd = ckpts["sd2"]
    targets = [SD_UNET[0], SD_UNET[6]]
    modules = make_lora(targets, sd, conv_shape="conv1x1")
    assert modules[targets[0][0]][0].ndim == 4
    out, _ = run_merge(tmp_path, path, [(write_lora(tmp_path / "l.safetensors", modules), 1.0)])
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 1.0)]))


def test_sdxl_sai_unet_te1_and_fused_te2(tmp_path, ckpts):
    path, sd = ckpts["sdxl"]
    targets = SDXL_UNET + SDXL_TEXT
    modules = make_lora(targets, sd, rank=4, alpha=4.0)
    out, report = run_merge(tmp_path, path, [(write_lora(tmp_path / "xl.safetensors", modules), 1.2)])
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 1.2)]))
    assert report.arch == "sdxl"
    assert report.modules_merged == {"unet": len(SDXL_UNET), "te1": 6, "te2": 12}


def test_sdxl_accepts_diffusers_names_and_sd1_accepts_sai_names(tmp_path, ckpts):
    xl_path, xl = ckpts["sdxl"]
    xl_targets = [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
         U + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", None),
        ("lora_unet_up_blocks_0_attentions_1_proj_in", U + "output_blocks.1.1.proj_in.weight", None),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", U + "output_blocks.1.2.conv.weight", None),
    ]
    modules = make_lora(xl_targets, xl)
    out, _ = run_merge(tmp_path, xl_path, [(write_lora(tmp_path / "a.safetensors", modules), 1.0)], name="xl.safetensors")
    assert_merged(out, xl, expected_checkpoint(xl, [(modules, xl_targets, 1.0)]))

    sd1_path, sd1 = ckpts["sd1"]
    sd1_targets = [
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k",
         U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", None),
        ("lora_unet_output_blocks_3_1_proj_in", U + "output_blocks.3.1.proj_in.weight", None),
    ]
    modules = make_lora(sd1_targets, sd1)
    out, _ = run_merge(tmp_path, sd1_path, [(write_lora(tmp_path / "b.safetensors", modules), 1.0)], name="sd1.safetensors")
    assert_merged(out, sd1, expected_checkpoint(sd1, [(modules, sd1_targets, 1.0)]))


def test_two_loras_with_different_multipliers_add(tmp_path, ckpts):
    path, sd = ckpts["sd2"]
    targets_a = SD_UNET[:6] + SD2_TEXT[:6]
    targets_b = SD_UNET[3:9] + SD2_TEXT[3:9]  # overlaps A on UNet and on the fused in_proj of layer 0/1
    a = make_lora(targets_a, sd, seed=1, alpha=1.0)
    b = make_lora(targets_b, sd, seed=2, rank=8, alpha=4.0)
    out, report = run_merge(
        tmp_path, path,
        [(write_lora(tmp_path / "a.safetensors", a), 0.8), (write_lora(tmp_path / "b.safetensors", b), -0.5)],
    )
    assert_merged(out, sd, expected_checkpoint(sd, [(a, targets_a, 0.8), (b, targets_b, -0.5)]))
    assert [r.multiplier for r in report.loras] == [0.8, -0.5]
    assert report.tensors_changed == len({k for _, k, _ in targets_a + targets_b})


def test_missing_alpha_means_rank_and_peft_spelling(tmp_path, ckpts):
    """No `.alpha` -> scale 1; `lora_A`/`lora_B` keys read as down/up; fp16 LoRA tensors."""
    path, sd = ckpts["sd1"]
    targets = SD_UNET[:4] + SD1_TEXT[:3]
    modules = make_lora(targets, sd, alpha=None)
    lora = write_lora(tmp_path / "peft.safetensors", modules, spelling="peft", dtype=torch.float16)
    out, _ = run_merge(tmp_path, path, [(lora, 0.9)])
    half = {n: (d.half(), u.half(), a) for n, (d, u, a) in modules.items()}
    assert_merged(out, sd, expected_checkpoint(sd, [(half, targets, 0.9)]))


def test_diffusers_peft_module_names(tmp_path, ckpts):
    """`unet.<diffusers path>` / `text_encoder.<HF path>` keys (diffusers' PEFT format) map to the same weights."""
    path, sd = ckpts["sdxl"]
    gen = torch.Generator().manual_seed(3)
    key_unet = U + "input_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight"
    key_te1 = f"{XL_TE1}encoder.layers.1.mlp.fc1.weight"
    key_te2 = f"{XL_TE2}0.attn.in_proj_weight"
    tensors = {}
    for prefix, key, rows in [("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", key_unet, None),
                              ("text_encoder.text_model.encoder.layers.1.mlp.fc1", key_te1, None),
                              ("text_encoder_2.encoder.layers.0.self_attn.k_proj", key_te2, (32, 64))]:
        out_dim = sd[key].shape[0] if rows is None else 32
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, sd[key].shape[1], generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, 4, generator=gen)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "peft.safetensors"))
    out, report = run_merge(tmp_path, path, [(tmp_path / "peft.safetensors", 1.0)])
    assert report.modules_merged == {"unet": 1, "te1": 1, "te2": 1}
    from safetensors.torch import load_file

    merged = load_file(str(out))
    a, b = tensors["text_encoder_2.encoder.layers.0.self_attn.k_proj.lora_A.weight"], \
        tensors["text_encoder_2.encoder.layers.0.self_attn.k_proj.lora_B.weight"]
    torch.testing.assert_close(merged[key_te2][32:64], sd[key_te2][32:64] + b @ a, atol=1e-5, rtol=0)
    assert torch.equal(merged[key_te2][:32], sd[key_te2][:32])


def test_tucker_mid_locon(tmp_path, ckpts):
    """LyCORIS LoCon with `lora_mid` (Tucker): W' = W + s * contract(up, mid, down)."""
    path, sd = ckpts["sd1"]
    key = U + "input_blocks.1.0.in_layers.2.weight"
    gen = torch.Generator().manual_seed(4)
    out_c, in_c = sd[key].shape[:2]
    down = torch.randn(3, in_c, 1, 1, generator=gen)
    mid = torch.randn(3, 3, 3, 3, generator=gen)
    up = torch.randn(out_c, 3, 1, 1, generator=gen)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    from safetensors.torch import load_file, save_file

    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(1.5)}, str(tmp_path / "tucker.safetensors"))
    out, _ = run_merge(tmp_path, path, [(tmp_path / "tucker.safetensors", 1.0)])
    x = torch.randn(1, in_c, 8, 8)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    got = F.conv2d(x, load_file(str(out))[key], padding=1)
    torch.testing.assert_close(got, F.conv2d(x, sd[key], padding=1) + 0.5 * composed, atol=1e-4, rtol=0)


def test_fp16_checkpoint_keeps_fp16_and_adds_in_fp32(tmp_path, ckpts):
    _, sd32 = ckpts["sd1"]
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd32.items()}
    path = save_checkpoint(tmp_path / "half.safetensors", sd)
    targets = SD_UNET[:5] + SD1_TEXT[:2]
    modules = make_lora(targets, sd)
    out, _ = run_merge(tmp_path, path, [(write_lora(tmp_path / "l.safetensors", modules), 0.05)])
    expected = {k: v.half().float() for k, v in expected_checkpoint(sd, [(modules, targets, 0.05)]).items()}
    assert_merged(out, sd, expected, atol=1e-5, rtol=1e-3)  # within one fp16 rounding of the fp32 sum


def test_old_sd1_text_keys_without_text_model_and_ckpt_input(tmp_path, ckpts):
    """A pickled .ckpt ({"state_dict": ...}) whose text keys lack `text_model.` (early SD1 files)."""
    _, sd = ckpts["sd1"]
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd.items()}
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": old, "epoch": 3, "global_step": 1000}, ckpt)
    targets = [(n, k.replace("transformer.text_model.", "transformer."), r) for n, k, r in SD1_TEXT[:6]] + SD_UNET[:2]
    modules = make_lora(targets, old)
    out, report = run_merge(tmp_path, ckpt, [(write_lora(tmp_path / "l.safetensors", modules), 1.0)])
    assert report.modules_merged == {"te": 6, "unet": 2}
    assert_merged(out, old, expected_checkpoint(old, [(modules, targets, 1.0)]))


def test_raw_peft_module_names(tmp_path, ckpts):
    """A raw PEFT state dict (`base_model.model.<diffusers UNet path>` / `base_model.model.text_model...`) merges
    into the same weights as its kohya twin (inspect describes the same file)."""
    path, sd = ckpts["sd1"]
    targets = [SD_UNET[1], SD1_TEXT[0]]
    modules = make_lora(targets, sd, alpha=None)
    peft_names = {SD_UNET[1][0]: "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  SD1_TEXT[0][0]: "base_model.model.text_model.encoder.layers.0.self_attn.q_proj"}
    tensors = {}
    for name, (down, up, _) in modules.items():
        peft = peft_names[name]
        tensors[f"{peft}.lora_A.weight"] = down.contiguous()
        tensors[f"{peft}.lora_B.weight"] = up.contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    out, report = run_merge(tmp_path, path, [(tmp_path / "adapter_model.safetensors", 1.0)])
    assert report.modules_merged == {"unet": 1, "te": 1}
    assert_merged(out, sd, expected_checkpoint(sd, [(modules, targets, 1.0)]))

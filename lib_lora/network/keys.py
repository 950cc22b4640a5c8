"""Kohya tensor keys: grammar, foreign spellings normalised once at load, network type by the keys present.

A kohya LoRA key is `<module>.<part>`; the module name never contains a dot, so the key splits at the first one.
Our files hold only `lora_down.weight`, `lora_up.weight` and `alpha` per module. Files from elsewhere may spell
down/up as PEFT's `lora_A` / `lora_B` or omit alpha (= rank, scale 1); those are normalised here and nowhere else.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Mapping

from ..errors import IncompatibleFile

if TYPE_CHECKING:
    import torch

KEY_GRAMMAR = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_RENAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
            "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}

# part names that identify a network type other than plain LoRA / LoCon (first match wins, as the webui does)
FOREIGN_TYPES = (
    ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    ("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
    ("IA3", ("on_input",)),
    ("OFT", ("oft_blocks", "oft_diag")),
    ("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    ("full diff", ("diff", "diff_b")),
    ("norm", ("w_norm", "b_norm")),
)
VARIANT_PARTS = {"lora_mid.weight": "Tucker/CP (lora_mid)", "dora_scale": "DoRA (dora_scale)"}

# diffusers / PEFT module paths (`unet.down_blocks.0...`, `text_encoder.text_model...`, `text_encoder_2...`) and a
# raw PEFT state dict's `base_model.model.` root; the merge and inspect read them under kohya names
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "te", "text_encoder_2.": "te2"}
PEFT_ROOT = "base_model.model."
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")
# part suffixes of a dotted (diffusers / PEFT) key, longest first so `.lora.down.weight` is not read as `.weight`
DOTTED_PARTS = (
    (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
    (".lora_down.weight", "lora_down.weight"), (".lora_up.weight", "lora_up.weight"),
    (".lora_mid.weight", "lora_mid.weight"),
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"), (".alpha", "alpha"),
)


def kohya_module_name(path: str, arch: str | None = None) -> str | None:
    """The kohya module name of a kohya, diffusers (`unet.` / `text_encoder.` / `text_encoder_2.`) or raw PEFT
    (`base_model.model.<UNet or CLIP path>`) module path; None when it is none of those. `arch` 'sdxl' puts a
    first text encoder under `lora_te1`; a raw PEFT text-encoder path counts as the first encoder."""
    if path.startswith("lora_"):
        return path
    if path.startswith(PEFT_ROOT):
        rest = path[len(PEFT_ROOT):]
        if (rest + ".").startswith(_UNET_ROOTS):
            path = "unet." + rest
        elif rest.startswith(("text_model.", "encoder.layers.")):
            path = "text_encoder." + rest
        else:
            return None
    for prefix, part in DIFFUSERS_PREFIXES.items():
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if part != "unet":
                if arch == "sdxl" and part == "te":
                    part = "te1"
                if not rest.startswith("text_model."):
                    rest = "text_model." + rest  # transformers 5 drops `text_model.` from CLIPTextModel
            return f"lora_{part}_" + rest.replace(".", "_")
    return None


def foreign_type(part: str) -> str | None:
    """The network type a part name belongs to when it is not plain LoRA / LoCon ('LoHa', 'IA3', ...), else None."""
    for name, identifying in FOREIGN_TYPES:
        if part in identifying:
            return name
    return None


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    module, _, part = key.partition(".")
    return module, part


def module_names(keys: Iterable[str]) -> list[str]:
    """Sorted module names of the keys (each module once)."""
    return sorted({split_key(k)[0] for k in keys})


def network_type(parts_by_module: Mapping[str, Iterable[str]], down_shapes: Mapping[str, tuple[int, ...]] = {}) -> str:
    """'LoRA', 'LoCon' (some down weight is a kxk conv), 'LoHa', 'LoKr', ... from the part names present.

    Variants are appended: 'LoCon + DoRA (dora_scale)'."""
    all_parts = {part for parts in parts_by_module.values() for part in parts}
    for name, identifying in FOREIGN_TYPES:  # first match wins, as the webui does
        if all_parts & set(identifying):
            return name
    if not all_parts & {"lora_down.weight", "lora_A.weight", "lora.down.weight"}:
        return "unknown"
    kind = "LoRA"
    if any(len(shape) == 4 and tuple(shape[2:]) != (1, 1) for shape in down_shapes.values()):
        kind = "LoCon"
    variants = [label for part, label in VARIANT_PARTS.items() if part in all_parts]
    return " + ".join([kind, *variants])


def normalise_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya LoRA/LoCon tensors in our spelling: `lora_down.weight`, `lora_up.weight`, `alpha` (missing = rank).

    Raises IncompatibleFile for keys that are not kohya-named, for other network types (LoHa, LoKr, ...), for
    variants we cannot represent (DoRA, Tucker), for modules lacking down or up and for NaN / infinite values."""
    parts_by_module: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in state_dict.items():
        if key.startswith("bundle_emb."):  # webui: textual-inversion embeddings bundled in a LoRA; not ours to load
            continue
        module, part = split_key(key)
        if not module.startswith(KOHYA_PREFIXES):
            foreign.append(key)
            continue
        parts_by_module.setdefault(module, {})[_RENAMES.get(part, part)] = value
    if foreign:
        raise IncompatibleFile(
            f"{len(foreign)} keys are not kohya LoRA keys (lora_unet_ / lora_te*_ names), e.g. {foreign[0]!r}"
        )
    if not parts_by_module:
        raise IncompatibleFile("the file holds no LoRA tensors")
    shapes = {m: tuple(p["lora_down.weight"].shape) for m, p in parts_by_module.items() if "lora_down.weight" in p}
    kind = network_type({m: list(p) for m, p in parts_by_module.items()}, shapes)
    if kind not in ("LoRA", "LoCon"):
        raise IncompatibleFile(f"this is a {kind} file; only LoRA / LoCon (networks.lora) files can be loaded")
    import torch

    out: dict[str, torch.Tensor] = {}
    for module, parts in parts_by_module.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None and up is None and set(parts) <= {"alpha", "scale"}:
            continue  # an alpha without weights changes nothing; sd-scripts ignores it too
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise IncompatibleFile(f"module {module} has no {missing}")
        unknown = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha", "scale"})
        if unknown:
            raise IncompatibleFile(f"module {module} has parts this loader does not know: {', '.join(unknown)}")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise IncompatibleFile(f"module {module}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
        alpha = parts.get("alpha")
        if alpha is None:
            scale = parts.get("scale")  # webui convention: an explicit scale instead of alpha
            alpha = torch.tensor(float(scale) * rank if scale is not None else float(rank))
        if not all(bool(torch.isfinite(t).all()) for t in (down, up, alpha)):  # a diverged run: black images
            raise IncompatibleFile(f"module {module} holds NaN or infinite values (a diverged or damaged LoRA)")
        out[f"{module}.lora_down.weight"] = down
        out[f"{module}.lora_up.weight"] = up
        out[f"{module}.alpha"] = alpha.reshape(())
    return out

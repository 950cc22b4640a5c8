"""`python -m lib_lora inspect FILE.safetensors [--json]`: what a LoRA file holds, for people and for scripts."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a LoRA / LoCon .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..network.inspect import describe

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(format_text(info))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _number(value) -> str:
    return value if isinstance(value, str) else f"{value:g}"  # str: a broken alpha ('nan', 'inf')


def _dim_alpha(summary: dict) -> str:
    def show(value):
        if isinstance(value, list):
            return "varies (" + ", ".join("none" if v is None else _number(v) for v in value) + ")"
        return "none (= dim)" if value is None else _number(value)

    def scale(value: dict) -> str:
        """alpha / dim, the factor the LoRA's update is multiplied by (kohya users reason in it)."""
        dim, alpha = value["dim"], value["alpha"]
        if isinstance(dim, int) and dim > 0 and isinstance(alpha, (int, float)):
            return f" (scale {alpha / dim:g})"
        return ""

    return ", ".join(f"{kind} {show(v['dim'])} / {show(v['alpha'])}{scale(v)}" for kind, v in summary.items())


def format_text(info: dict) -> str:
    dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
    counts = ", ".join(f"{'UNet' if k == 'unet' else k.upper()} {v}" for k, v in info["modules"].items())
    lines = [
        ("file", f"{info['file']} ({_size(info['size_bytes'])}, {info['tensors']} tensors: {dtypes})"),
        ("architecture", f"{info['architecture']}  [{info['architecture_source']}]"),
        ("network", info["network_type"] + (f"  [{info['network_module']}]" if info["network_module"] else "")),
        *([("naming", info["naming"])] if info.get("naming", "kohya") != "kohya" else []),
        ("dim / alpha", _dim_alpha(info["dim_alpha"])),
        ("modules", counts),
    ]
    lines += list(info["metadata"].items())
    if info["top_tags"]:
        lines.append(("top tags", ", ".join(f"{tag} ({count})" for tag, count in info["top_tags"])))
    hashes = info["hashes"]
    stored = hashes["stored_matches"]
    note = "not stored in the file" if stored is None else ("= sshs_model_hash" if stored else
                                                            f"MISMATCH: file says {hashes['stored_model_hash']}")
    lines.append(("model hash", f"{hashes['model_hash']} (short {hashes['short_hash']}; {note})"))
    if hashes["legacy_hash"]:
        lines.append(("legacy hash", hashes["legacy_hash"]))
    if not info["metadata_keys"]:
        lines.append(("metadata", "none (the webui will list it as 'Unknown' SD version)"))
    for problem in info.get("problems") or ():
        lines.append(("problems", problem))
    width = max(len(label) for label, _ in lines) + 2
    text = "\n".join(f"{label + ':':<{width}}{value}" for label, value in lines)
    if info["per_module"]:
        rows = []
        for name, value in sorted(info["per_module"].items()):
            alpha = "none" if value["alpha"] is None else _number(value["alpha"])
            rows.append(f"  {name}  dim {value['dim']}  alpha {alpha}")
        text += "\nper module:\n" + "\n".join(rows)
    return text

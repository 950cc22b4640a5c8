"""Peak-memory probe for the merge (run as a script in a fresh process; also used by docs/merge.md figures).

`python -m tests.merge.memory_probe FOLDER SIZE_MB [--precision fp16]` writes a synthetic SD1-keyed checkpoint of
about SIZE_MB (fp16 UNet attention weights of 1280x1280 plus a text encoder), a rank-32 LoRA touching half of the
UNet weights and every text-encoder weight, merges it, and prints one JSON line: file size, baseline RSS after
imports, peak RSS (VmHWM) and seconds.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak of this process image; unlike ru_maxrss it does not inherit the peak of the
    process that forked us before exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(folder: Path, size_mb: int) -> tuple[Path, Path]:
    """Write the checkpoint tensor by tensor-group so building it does not inflate the merge's own peak."""
    import torch
    from safetensors.torch import save_file

    width = 1280
    per = width * width * 2
    count = max(4, size_mb * 2**20 // per)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(count):
        block, layer = divmod(i, 10)
        name = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                "ff.net.2", "proj_in", "proj_out", "attn2.to_v"][layer]
        prefix = f"model.diffusion_model.input_blocks.{block}.1."
        key = prefix + (name if name.startswith("proj") else f"transformer_blocks.0.{name}") + ".weight"
        sd[key] = (torch.randn(width, width, generator=gen) * 0.02).half()
    for n in range(2):
        sd[f"cond_stage_model.transformer.text_model.encoder.layers.{n}.self_attn.q_proj.weight"] = torch.randn(768, 768).half()
    ckpt = folder / "big.safetensors"
    save_file(sd, str(ckpt))
    lora = {}
    for i, key in enumerate(sorted(sd)):
        if key.startswith("model.") and i % 2:
            continue
        path = key[len("model.diffusion_model."):-len(".weight")] if key.startswith("model.") else \
            key[len("cond_stage_model.transformer."):-len(".weight")]
        prefix = "lora_unet_" if key.startswith("model.") else "lora_te_"
        name = prefix + path.replace(".", "_")
        out, inp = sd[key].shape
        lora[f"{name}.lora_down.weight"] = (torch.randn(32, inp, generator=gen) * 0.01).half()
        lora[f"{name}.lora_up.weight"] = (torch.randn(out, 32, generator=gen) * 0.01).half()
        lora[f"{name}.alpha"] = torch.tensor(16.0).half()
    lora_path = folder / "lora.safetensors"
    save_file(lora, str(lora_path))
    return ckpt, lora_path


def main(argv: list[str]) -> None:
    folder, size_mb = Path(argv[0]), int(argv[1])
    precision = argv[3] if len(argv) > 3 and argv[2] == "--precision" else None
    if argv[-1] == "--build-only" or not (folder / "big.safetensors").exists():
        build(folder, size_mb)
        if argv[-1] == "--build-only":
            return
    import torch  # noqa: F401  (baseline includes torch and the merge code, as in the webui)

    from lib_lora.merge import merger  # noqa: F401

    baseline = _status_mb("VmRSS")
    start = time.monotonic()
    report = merger.merge_loras(folder / "big.safetensors", [(folder / "lora.safetensors", 0.8)],
                                folder / "merged.safetensors", precision=precision, overwrite=True)
    peak = _status_mb("VmHWM")
    print(json.dumps({
        "file_mb": round((folder / "big.safetensors").stat().st_size / 2**20, 1),
        "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
        "seconds": round(time.monotonic() - start, 2), "tensors_changed": report.tensors_changed,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])

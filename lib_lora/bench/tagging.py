"""`python -m lib_lora bench tag`: tagging throughput, one image at a time vs batched with decode threads.

Not a test: it prints images/s for each way of running the same tagger over the same images, plus the two bounds
(decode alone on one thread, the model alone on pre-decoded batches) that say which side limits the speed.
Without `--model_dir` it uses the tests' tiny WD14 model (`--synthetic conv` for one with real convolutions at
448 px); without `--images` it writes synthetic JPEG photos of `--image_size` to a temp folder. Nothing is tagged
on disk: the run iterates the runner's pipeline and throws the tags away.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BadInput
from ..imagefiles import iter_image_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tagger", choices=("wd14", "blip"), default="wd14")
    parser.add_argument("--model_dir", default=None, help="a real tagger folder (default: the tests' tiny WD14 model)")
    parser.add_argument("--synthetic", choices=("tiny", "conv"), default="tiny",
                        help="without --model_dir: tiny (colour means, 32 px) or conv (3 strided convs, 448 px)")
    parser.add_argument("--images", default=None, help="folder of images (default: synthetic JPEG photos)")
    parser.add_argument("--count", type=int, default=64, help="synthetic images to make")
    parser.add_argument("--image_size", default="1536x1024", help="synthetic image size WxH")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: CPU count, at most 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--simulate_gpu", default=None, metavar="CALL_MS,IMAGE_MS",
                        help="add a model wait of CALL_MS per batch + IMAGE_MS per image that leaves the CPU free, "
                             "as a GPU does (e.g. 5,3), to see the pipeline on a machine without one")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _tiny_model(folder: Path, kind: str) -> Path:
    """The tests' WD14-contract model (tests/fixtures/tiny_wd14.py ships with the repository)."""
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from tests.fixtures.tiny_wd14 import build_tiny_wd14
    except ImportError as exc:
        raise BadInput("this install has no tests/fixtures/tiny_wd14.py; pass --model_dir with a real tagger") from exc
    return build_tiny_wd14(folder, heavy=(kind == "conv"), size=448 if kind == "conv" else 32)


def _synthetic_images(folder: Path, count: int, size: str) -> list[Path]:
    """JPEG 'photos' with detail everywhere (noise over gradients), so decode costs what a real photo costs."""
    import numpy as np
    from PIL import Image

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError as exc:
        raise BadInput(f"--image_size must look like 1536x1024, got {size!r}") from exc
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    paths = []
    for i in range(count):
        noise = rng.normal(0, 12, size=(h, w, 3))
        img = Image.fromarray(np.clip(base + noise + i * 3 % 255, 0, 255).astype(np.uint8))
        path = folder / f"{i:04d}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return paths


def _load(args: argparse.Namespace, model_dir: Path):
    from ..tagging.models import locate_blip, locate_wd14

    if args.tagger == "blip":
        from ..tagging.blip import BlipCaptioner

        return BlipCaptioner(locate_blip(model_dir=model_dir), device=args.device)
    from ..tagging.wd14 import Wd14Tagger

    return Wd14Tagger(locate_wd14(model_dir=model_dir), device=args.device)


class _SimulatedGpu:
    """The real tagger, plus a per-batch wait (sleep: the CPU stays free, as while a GPU computes)."""

    def __init__(self, inner, spec: str) -> None:
        try:
            self.call_s, self.image_s = (float(v) / 1000 for v in spec.split(","))
        except ValueError as exc:
            raise BadInput(f"--simulate_gpu must look like 5,3 (ms per call, ms per image), got {spec!r}") from exc
        self.inner, self.name, self.max_batch = inner, inner.name, inner.max_batch
        self.provider = f"{inner.provider} + a simulated GPU wait of {self.call_s * 1000:g} ms per batch " \
                        f"+ {self.image_s * 1000:g} ms per image"

    def prepare(self, path):
        return self.inner.prepare(path)

    def tag_batch(self, prepared):
        time.sleep(self.call_s + self.image_s * len(prepared))
        return self.inner.tag_batch(prepared)

    def close(self) -> None:
        self.inner.close()


def _timed(fn, repeat: int = 1) -> float:
    """Best of `repeat` runs: on a shared machine the minimum is the figure least disturbed by other work."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _machine(provider: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other work on the machine skews every figure: say how much there was
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        if provider == "CPUExecutionProvider" or provider == "cpu":
            return info
        import torch  # only to name the GPU

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="lora-bench-tag-") as tmp:
        tmp_path = Path(tmp)
        if args.model_dir:
            model_dir, model_name = Path(args.model_dir), Path(args.model_dir).name
        elif args.tagger == "blip":
            raise BadInput("bench tag --tagger blip needs --model_dir (a BLIP captioning model folder)")
        else:
            model_dir = _tiny_model(tmp_path / "model", args.synthetic)
            model_name = f"synthetic {args.synthetic} WD14-contract model"
        tagger = _load(args, model_dir)
        if args.simulate_gpu:
            tagger = _SimulatedGpu(tagger, args.simulate_gpu)
        try:
            if args.images:
                paths = list(iter_image_files(args.images))
                if not paths:
                    raise BadInput(f"no images in {args.images}")
                source = f"{len(paths)} images from {args.images}"
            else:
                (tmp_path / "images").mkdir()
                paths = _synthetic_images(tmp_path / "images", args.count, args.image_size)
                source = f"{len(paths)} synthetic JPEG photos {args.image_size}"
            figures = _measure(tagger, paths, args.batch_size, args.workers, max(1, args.repeat))
        finally:
            tagger.close()
    provider = getattr(tagger, "provider", "?")
    report = {"model": model_name, "provider": provider, "images": source, "batch_size": args.batch_size,
              "repeat": args.repeat, "machine": _machine(provider), "results": figures}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _measure(tagger, paths, batch_size, workers, repeat) -> list[dict]:
    """Every figure is the best of `repeat` rounds; each round runs all cases in a rotated order, so a busy
    moment of the machine (or the scheduler's favour to a process that just woke up) hits each case alike."""
    from ..imagefiles import open_image_rgb
    from ..tagging.runner import iter_tagged

    n = len(paths)
    threads = workers or min(8, os.cpu_count() or 1)
    list(iter_tagged(paths[: max(batch_size, 2)], tagger, batch_size, workers=0))  # warm-up: sessions, caches
    decoded = [tagger.prepare(p) for p in paths]
    batches = [decoded[i : i + batch_size] for i in range(0, n, batch_size)]
    cases = [("decode only, 1 thread", lambda: [tagger.prepare(p) for p in paths])]
    size = getattr(getattr(tagger, "inner", tagger), "size", None)
    if hasattr(getattr(tagger, "inner", tagger), "table"):  # WD14: what the JPEG draft decode saves
        from ..tagging.wd14 import preprocess

        cases.append(("decode only, 1 thread, full-size JPEG decode",
                      lambda: [preprocess(open_image_rgb(p), size) for p in paths]))
    cases += [
        ("model only, one at a time", lambda: [tagger.tag_batch([x]) for x in decoded]),
        (f"model only, batch {batch_size}", lambda: [tagger.tag_batch(b) for b in batches]),
    ]
    first_pipeline = len(cases)
    for label, bs, w in [
        ("one at a time (decode, then model, per image)", 1, 0),
        (f"batch {batch_size}, decode in the same thread", batch_size, 0),
        (f"one at a time, {threads} decode threads", 1, threads),
        (f"batch {batch_size}, {threads} decode threads (default)", batch_size, threads),
    ]:
        cases.append((label, lambda bs=bs, w=w: list(iter_tagged(paths, tagger, bs, workers=w))))
    best = [float("inf")] * len(cases)
    for round_ in range(repeat):
        for k in range(len(cases)):
            i = (k + round_) % len(cases)
            best[i] = min(best[i], _timed(cases[i][1]))
    out = [{"run": label, "images_per_s": n / seconds} for (label, _), seconds in zip(cases, best)]
    base = out[first_pipeline]["images_per_s"]
    for row in out[first_pipeline:]:
        row["speedup"] = row["images_per_s"] / base
    return out


def _print(report: dict) -> None:
    m = report["machine"]
    print(f"model:    {report['model']} on {report['provider']}")
    print(f"images:   {report['images']}")
    print(f"machine:  {m.get('cpu')} ({m.get('cores')} cores)" + (f", GPU {m['gpu']}" if "gpu" in m else "")
          + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
          + (f", load average {m['load_average_1min']}" if "load_average_1min" in m else ""))
    width = max(len(r["run"]) for r in report["results"])
    for row in report["results"]:
        speed = f"  x{row['speedup']:.2f}" if "speedup" in row else ""
        print(f"  {row['run']:<{width}}  {row['images_per_s']:8.1f} images/s{speed}")

"""`torch_compile` / `dynamo_backend` / `dynamo_mode`: the training UNet forward through torch.compile.

Why a compiled closure and not `torch.compile(unet)`: the model belongs to the host (the webui keeps using it after
the run), so nothing may replace or wrap it. The run compiles a small function that calls `backend.predict`;
dynamo traces through it into the UNet and the LoRA forwards attached to its layers, so it is built after the LoRA
is attached, and its guards notice when the LoRA is detached (pause) and attached again (continue) without
recompiling. The compiled code lives in dynamo's cache on that function's code object; `release()` empties it at
the end of the run, and with CUDA graphs frees their memory pool, so nothing of the run stays behind.

Shapes are static (`dynamic=False`): every latent shape (bucket resolution, and a short last batch) compiles a graph
of its own the first time it appears. Symbolic shapes would need one graph for all buckets, but inductor failed to
compile the UNet with symbolic height and width (the diffusers UNet on a CPU: "cannot determine truth value of
Relational"), and where it succeeded (the webui's ldm UNet) it specialised the sizes again anyway. Dynamo's
recompile limit (8 per function) is raised for the run's own calls to two graphs per bucket plus two, so no bucket
falls back to eager.

A torch without torch.compile, or a compile that fails (no C++ compiler for inductor on a CPU, no triton on
Windows, an unknown backend), never stops the run: the step is redone eagerly and the run goes on eagerly, with a
note that says why.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompileFailed(Exception):
    """The compiled forward failed; the wrapper has switched itself to eager and the caller redoes the step."""


def first_line(exc: BaseException) -> str:
    """One line that says why: the innermost cause's first line (dynamo wraps the compiler's own error, e.g.
    `BackendCompilerFailed: backend='inductor' raised:` around `Compiler: cl is not found`), class names first."""
    chain = [exc]
    while len(chain) < 8:
        inner = getattr(chain[-1], "inner_exception", None) or chain[-1].__cause__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    names = " <- ".join(dict.fromkeys(type(e).__name__ for e in chain))
    lines = [ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if len(line) > 240:
        line = line[:237] + "..."
    return f"{names}: {line}" if line else names


def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device (CUDA raises a RuntimeError subclass, the CPU a MemoryError)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class CompiledForward:
    """`forward(noisy, t, cond) -> prediction` through torch.compile, falling back to `backend.predict`.

    `enabled` is False once a compile failed (or when it could not be set up); `failure` then says why."""

    def __init__(self, backend: Any, *, dynamo_backend: str = "inductor", mode: str = "default",
                 shapes: int = 1) -> None:
        self.backend = backend
        self.dynamo_backend = dynamo_backend
        self.mode = mode
        self.failure: str | None = None
        self.calls = 0
        self.uses_cudagraphs = False

        def predict(noisy, t, cond):  # a closure, compiled: the model objects are never wrapped
            return backend.predict(noisy, t, cond)

        self._code = predict.__code__
        self._compiled: Callable | None = None
        compile_fn = getattr(torch, "compile", None)
        if compile_fn is None:
            self.failure = f"this torch ({torch.__version__}) has no torch.compile (it needs torch 2.0 or later)"
            return
        kwargs: dict[str, Any] = {"backend": dynamo_backend, "dynamic": False}
        if mode and mode != "default" and dynamo_backend == "inductor":  # modes are inductor's
            kwargs["mode"] = mode
        try:
            self._compiled = compile_fn(predict, **kwargs)
        except Exception as exc:  # Python too new for this torch's dynamo, unknown backend, bad mode
            self.failure = first_line(exc)
            return
        device = getattr(backend, "device", None)
        self.uses_cudagraphs = (dynamo_backend == "inductor" and mode in _CUDAGRAPH_MODES
                                and torch.device(device).type == "cuda") or dynamo_backend == "cudagraphs"
        self._limits = _recompile_limits(2 * shapes + 2)

    @property
    def enabled(self) -> bool:
        return self._compiled is not None

    def step_begins(self) -> None:
        """Call before each optimizer step: with CUDA graphs, the previous step's graph outputs may be reused."""
        if self.uses_cudagraphs and self._compiled is not None:
            mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
            if mark is not None:
                mark()

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if self._compiled is None:
            return self.backend.predict(noisy, t, cond)
        try:
            with self._limits():
                out = self._compiled(noisy, t, cond)
        except Exception as exc:
            if is_oom(exc):
                raise
            self.failure = first_line(exc)
            self._compiled = None
            self.release()
            raise CompileFailed(self.failure) from exc
        self.calls += 1
        return out

    def release(self) -> None:
        """Drop the compiled code (dynamo's cache on our closure's code object) and any CUDA graph pool."""
        self._compiled = None
        try:
            from torch._C._dynamo.eval_frame import reset_code

            reset_code(self._code)
        except Exception:  # an older torch without it: the cache entries stay until the process ends
            pass
        if self.uses_cudagraphs and torch.cuda.is_available() and torch.cuda.is_initialized():
            try:
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
            except Exception:
                pass


def _recompile_limits(wanted: int) -> Callable[[], Any]:
    """A context factory raising dynamo's per-function recompile limit to `wanted` while it is active (a no-op
    where the limit is higher already or the config lacks it): set around our own calls only, so the process's
    other compiled code keeps torch's setting."""
    from contextlib import nullcontext

    try:
        from torch._dynamo import config
    except ImportError:
        return nullcontext
    name = next((n for n in ("recompile_limit", "cache_size_limit") if isinstance(getattr(config, n, None), int)), None)
    if name is None or getattr(config, name) >= wanted or not hasattr(config, "patch"):
        return nullcontext
    return lambda: config.patch(**{name: wanted})


def bucket_count(dataset: Any) -> int:
    """How many latent shapes the dataset's batches have (1 when it does not say)."""
    info = getattr(dataset, "bucket_info", None)
    if not callable(info):
        return 1
    try:
        buckets = info().get("buckets", {})
    except Exception:
        return 1
    return max(1, len({tuple(b.get("resolution", ())) for b in buckets.values()}))


def compile_notes(cfg: Any, net: Any, device: Any = None, shapes: int = 1) -> list[str]:
    """What the user should know before the first (slow) step."""
    notes = [f"torch_compile: compiling the UNet forward with {cfg.dynamo_backend}"
             + (f" ({cfg.dynamo_mode})" if cfg.dynamo_mode != "default" else "")
             + "; the first step (and the first of each new shape) takes minutes"]
    if shapes > 1:
        notes.append(f"torch_compile with {shapes} bucket resolutions: the first batch of each compiles its own graph")
    if device is not None and torch.device(device).type == "cpu" and cfg.dynamo_backend == "inductor":
        notes.append("torch_compile on a CPU: inductor's CPU code was slower than eager for SD-sized UNets in our "
                     "measurements (docs/performance.md); it pays on a GPU")
    if any(getattr(lora, "module_dropout", 0) for lora in getattr(net, "loras", lambda: [])()):
        notes.append("torch_compile with module_dropout: the random skip of each module splits the compiled graph, "
                     "so compiling gains little")
    return notes


__all__ = ["CompileFailed", "CompiledForward", "bucket_count", "compile_notes", "first_line"]

"""One interface over a loaded SD model (docs/backends.md): `LdmBackend` for the webui's ldm/sgm object,
`DiffusersBackend` for diffusers folders and single checkpoint files.

Names resolve lazily so that `import lib_lora.backends` stays cheap and never imports diffusers on the webui path.
"""

from __future__ import annotations

_EXPORTS = {
    "Backend": "base",
    "Cond": "base",
    "size_ids": "base",
    "LdmBackend": "ldm_backend",
    "DiffusersBackend": "diffusers_backend",
    "load_single_file": "single_file",
    "generate": "sampling",
}

__all__ = sorted(_EXPORTS) + ["load_backend"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(name)


def load_backend(path, **kwargs):
    """A DiffusersBackend for a diffusers folder or a `.safetensors` / `.ckpt` file (CLI and standalone app)."""
    from .diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(path, **kwargs)

"""LoRA / LoCon networks in kohya format: naming, targets, modules, inject/restore, files."""

"""Benchmarks behind `python -m lib_lora bench <name>`: each module exposes add_arguments(parser) and run(args)."""

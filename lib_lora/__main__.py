"""`python -m lib_lora ...` (and `accelerate launch -m lib_lora train ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

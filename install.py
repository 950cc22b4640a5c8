"""Run by the webui on every start (a separate process, webui root on PYTHONPATH): install what the tab needs
and is missing, through the webui's own helpers, without changing anything already installed. Quiet when there
is nothing to do."""

import os
import sys
import tempfile

import launch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib_lora.webui.install_plan import constraints_text, missing  # noqa: E402


def main() -> None:
    todo = missing(launch.is_installed)
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="lora-train-install-") as folder:
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as fh:
            fh.write(constraints_text())
        for req in todo:
            try:
                launch.run_pip(f'install -c "{constraints}" "{req.spec}"', f"{req.spec} for LoRA Train ({req.why})")
            except Exception as exc:  # the webui must still start; the feature says what is missing when used
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(f"LoRA Train: could not install {req.spec}; {req.why} will not work until it is installed ({first})")


main()

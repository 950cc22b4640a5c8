"""install.py: only what is missing, through the webui's own helpers, never changing what is installed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from lib_lora.webui import install_plan

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_missing_means_nothing_to_do():
    assert install_plan.missing(lambda name: True, cuda_version=lambda: "12.1") == []


def test_onnxruntime_build_follows_cuda():
    assert install_plan.onnxruntime_requirement(None).spec.startswith("onnxruntime>=")
    assert install_plan.onnxruntime_requirement("12.1").spec == "onnxruntime-gpu>=1.19"
    assert install_plan.onnxruntime_requirement("11.8").spec == "onnxruntime-gpu>=1.16,<1.19"


def test_cuda_is_only_probed_when_onnxruntime_is_missing():
    probed = []

    def cuda():
        probed.append(1)
        return None

    install_plan.missing(lambda name: True, cuda_version=cuda)
    assert probed == []
    todo = install_plan.missing(lambda name: name != "onnxruntime", cuda_version=cuda)
    assert probed == [1] and [r.spec for r in todo] == ["onnxruntime>=1.16"]


def test_tomli_only_on_python_3_10():
    absent = lambda name: name != "tomli"  # noqa: E731
    assert install_plan.missing(absent, lambda: None, python=(3, 11)) == []
    assert [r.check for r in install_plan.missing(absent, lambda: None, python=(3, 10))] == ["tomli"]


def test_constraints_pin_every_installed_distribution():
    text = install_plan.constraints_text()
    for name in ("torch", "numpy", "gradio", "transformers", "safetensors"):
        version = importlib.metadata.version(name)
        assert any(line.lower() == f"{name}=={version}".lower() for line in text.splitlines()), name


def _run_install(tmp_path, installed: str) -> tuple[str, list[str]]:
    """Run install.py as the webui does (separate process), with a stand-in `launch` module recording pip calls."""
    fake = tmp_path / "launch.py"
    log = tmp_path / "pip.log"
    fake.write_text(
        "import os\n"
        f"INSTALLED = {installed}\n"
        "def is_installed(name):\n    return INSTALLED is None or name in INSTALLED\n"
        "def run_pip(command, desc=None, live=False):\n"
        f"    open({str(log)!r}, 'a').write(command + '\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "install.py")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout, log.read_text().splitlines() if log.exists() else []


def test_install_py_is_quiet_when_nothing_is_missing(tmp_path):
    stdout, calls = _run_install(tmp_path, "None")
    assert stdout == "" and calls == []


def test_install_py_installs_only_the_missing_with_constraints(tmp_path):
    stdout, calls = _run_install(tmp_path, "['prodigyopt', 'lion-pytorch', 'tomli_w', 'tomli']")
    assert len(calls) == 1
    assert calls[0].startswith("install -c ") and "onnxruntime" in calls[0]

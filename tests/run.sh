#!/usr/bin/env bash
# The project's one test command (README): builds both test environments from nothing, then runs the suite in
# each. .venv = current releases (diffusers, transformers 5); .venv-webui = the webui 1.10.1 pins, no diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

setup() {  # venv dir, requirements file
    [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
    "$1/bin/python" -m pip install -q -r "$2" 2>&1 | grep -v "is ignored: it is neither" || true
    "$1/bin/python" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 2>&1 | grep -v "is ignored: it is neither" || true
    "$1/bin/python" -c "import torch, transformers, safetensors" # fail early if the install did not take
}

# Debian's chromium for the browser tests of the standalone tab (playwright drives it; no browser download)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "warning: could not install chromium; the browser tests will be skipped"
fi

setup .venv requirements-dev.txt
setup .venv-webui tests/requirements-webui.txt

status=0
echo "== current stack (.venv) =="
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
echo "== webui 1.10.1 stack (.venv-webui) =="
.venv-webui/bin/python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
exit $status

#!/usr/bin/env bash
# The project's one test command (README): builds both test environments from nothing, then runs the suite in
# each. .venv = current releases (diffusers, transformers 5); .venv-webui = the webui 1.10.1 pins, no diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

pip_quiet() {  # venv dir, pip arguments...: quiet on success, the log (less local-index noise) on failure
    local venv=$1; shift
    if ! "$venv/bin/python" -m pip install -q "$@" >"$venv/pip.log" 2>&1; then
        grep -v "is ignored: it is neither" "$venv/pip.log" >&2
        echo "error: pip install $* failed in $venv" >&2
        exit 1
    fi
}

setup() {  # venv dir, requirements file
    [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
    pip_quiet "$1" -r "$2"
    pip_quiet "$1" --no-deps stable-diffusion-sdkit==2.1.5  # the ldm package; its own pins are from 2022
    "$1/bin/python" -c "import torch, transformers, safetensors"
}

# Debian's chromium for the browser tests of the standalone tab (playwright drives it; no browser download)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "warning: could not install chromium; the browser tests will be skipped"
fi

# Both venvs hold a torch build (~6 GB each): say so up front rather than fail deep inside pip with ENOSPC.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ ! -x .venv-webui/bin/python ] && [ "${free_kb:-0}" -lt $((14 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GB free here; building the two test venvs needs about 13 GB" >&2
fi

setup .venv requirements-dev.txt
setup .venv-webui tests/requirements-webui.txt

status=0
echo "== current stack (.venv) =="
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
echo "== webui 1.10.1 stack (.venv-webui) =="
.venv-webui/bin/python -m pytest -q -p no:cacheprovider tests "$@" || status=$?
exit $status

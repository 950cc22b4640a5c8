"""Start a real webui (WEBUI_DIR) with this checkout as an extension, in a throw-away data dir, on a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe_extension"  # test-only routes inside the webui (digest, consistency)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webui_python(webui_dir: Path) -> str:
    explicit = os.environ.get("WEBUI_PYTHON")
    if explicit:
        return explicit
    for candidate in (webui_dir / "venv" / "bin" / "python", webui_dir / "venv" / "Scripts" / "python.exe"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def make_tiny_model(python: str, webui_dir: Path, folder: Path, arch: str = "sd1") -> Path:
    """`tiny-<arch>.safetensors` + yaml + text-encoder folder (tools/make_tiny_checkpoint.py). For sd2 / sdxl the
    tool also registers its tiny OpenCLIP architecture in the webui Python's open_clip (a dev-environment step the
    webui needs to build that text encoder by name; docs/webui-dev.md)."""
    out = folder / f"tiny-{arch}.safetensors"
    if not out.exists():
        repos = webui_dir / "repositories"
        cmd = [python, str(ROOT / "tools" / "make_tiny_checkpoint.py"), "--out", str(out), "--arch", arch,
               "--ldm-path", str(repos / "stable-diffusion-stability-ai")]
        if arch != "sd1":
            cmd += ["--sgm-path", str(repos / "generative-models"), "--open-clip-config-dir", "auto"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"make_tiny_checkpoint.py --arch {arch} failed:\n{done.stderr[-3000:]}")
    return out


class Webui:
    def __init__(self, webui_dir: Path, data_dir: Path, ckpt_dir: Path, extra_args: list[str] = (),
                 env: dict | None = None, options: dict | None = None) -> None:
        """`options`: webui settings written to the data dir's config.json before the start."""
        self.dir = webui_dir
        self.data_dir = data_dir
        if options:
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "config.json").write_text(json.dumps(options))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ext = data_dir / "extensions"
        ext.mkdir(parents=True, exist_ok=True)
        for name, target in (("sd-webui-lora-train", ROOT), ("zz-lora-train-probe", PROBE)):
            link = ext / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        self.log_path = data_dir / "webui.log"
        args = [webui_python(webui_dir), "launch.py", "--skip-prepare-environment", "--use-cpu", "all", "--no-half",
                "--api", "--port", str(self.port), "--data-dir", str(data_dir), "--ckpt-dir", str(ckpt_dir),
                "--no-download-sd-model", *extra_args]
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                        **(env or {}))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=webui_dir, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 240.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            text = self.log_path.read_text(errors="replace")
            if "Startup time:" in text:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"webui exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(1)
        else:
            raise TimeoutError(f"webui did not start in {timeout} s:\n{self.log_path.read_text()[-3000:]}")
        while time.time() < end:  # the model loads in a background thread after startup
            options = self.get("/sdapi/v1/options")
            if options.get("sd_model_checkpoint") and "Model loaded in" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(1)
        raise TimeoutError("the model did not load")

    def request(self, method: str, path: str, body=None, auth: tuple[str, str] | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if auth:
            import base64

            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, body=None):
        return self.request("POST", path, body if body is not None else {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

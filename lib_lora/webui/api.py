"""HTTP routes under /lora-train/v1/ for scripts and automation (present with --api, guarded by --api-auth).

Routes added in `on_app_started` get none of the webui's API auth, so the same `user:password` list is checked
here (fastapi is imported at module level: its annotations are resolved from this module's globals). Bad input
answers 4xx with the one-line message the tab would show; nothing is started then.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from secrets import compare_digest

from fastapi import Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..errors import BadInput, IncompatibleFile, LoraTrainError

PREFIX = "/lora-train/v1"


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    creds = {}
    for item in (api_auth or "").split(","):
        if ":" in item:
            user, password = item.strip().split(":", 1)
            creds[user] = password
    return creds


def status_for(exc: LoraTrainError) -> int:
    text = str(exc)
    if "does not exist" in text or "not found" in text:
        return 404
    if "in progress" in text or "already" in text:
        return 409
    if isinstance(exc, IncompatibleFile):
        return 422
    return 400


def add_routes(app, service, api_auth: str | None = None) -> None:
    creds = parse_credentials(api_auth)
    dependencies = []
    if creds:
        basic = HTTPBasic()

        def check(credentials: HTTPBasicCredentials = Depends(basic)):
            expected = creds.get(credentials.username)
            if expected is None or not compare_digest(credentials.password, expected):
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})

        dependencies = [Depends(check)]

    def guarded(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LoraTrainError as exc:
                raise HTTPException(status_code=status_for(exc), detail=str(exc)) from None
        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        call.__signature__ = __import__("inspect").signature(fn)
        return call

    def route(path: str, fn, method: str, status_code: int = 200):
        app.add_api_route(PREFIX + path, guarded(fn), methods=[method], dependencies=dependencies,
                          status_code=status_code)

    host = service.host

    def list_projects():
        """Every project with its concept folders and saved epoch files."""
        out = []
        for name in service.project_names():
            project = service.project(name)
            files = sorted(host.lora_output_dir(name).glob("*.safetensors")) if host.lora_output_dir(name).is_dir() else []
            out.append({
                "name": name, "path": str(project.path), "images": len(project.images()),
                "concepts": [{"folder": c.folder.name, "repeats": c.repeats, "images": c.images} for c in project.concepts()],
                "activation_tag": project.meta.activation_tag, "epochs": [str(f) for f in files],
            })
        return out

    def create_project(body: dict = Body(...)):
        """{"name": "...", "repeats": 10} -> the new project's folder."""
        from ..ui.projects import create_project as create

        project = create(service.root(), str(body.get("name", "")), repeats=body.get("repeats", 10))
        return {"name": project.name, "path": str(project.path), "dataset": str(project.dataset)}

    def tag_project(name: str, body: dict = Body(default={})):
        """Run a tagger over the project: {"tagger": "wd14"|"blip", "threshold": 0.35, "mode": "append",
        "model_dir": a folder holding the model (optional)}; in the webui's queue like a generation."""
        from ..ui.tab_tags import run_tagger

        project = service.project(name)
        from ..ui.tab_test import number

        threshold = number("threshold", body.get("threshold", 0.35), 0.0, 1.0)
        service.check_idle_for("tagging")
        result = run_tagger(project, str(body.get("tagger", "wd14")), threshold,
                            str(body.get("mode", "append")), host, model_dir=str(body.get("model_dir") or ""))
        return {"project": name, "result": result}

    def start_job(body: dict = Body(...)):
        """{"project": "...", "config": {sd-scripts names...}} -> the queued job. The tab's first-LoRA defaults
        apply to every setting the config leaves out."""
        from ..train.config_io import from_dict
        from ..ui import fields

        name = str(body.get("project", ""))
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise BadInput("config must be an object of settings")
        project = service.project(name)
        base = fields.build_config(fields.defaults(), service.fixed(project))
        cfg = from_dict(config, base=base)
        job = service.start(name, config=cfg)
        return job.public()

    def list_jobs():
        return [j.public() for j in service.queue.jobs()]

    def job_status(job_id: str):
        job = service.queue.get(job_id)
        if job is None:
            raise BadInput(f"job {job_id} not found")
        return {**job.public(), "losses": [list(p) for p in job.losses]}

    def interrupt(job_id: str):
        job = service.queue.get(job_id)
        if job is None:
            raise BadInput(f"job {job_id} not found")
        service.queue.interrupt(job_id)
        return job.public()

    def pause(job_id: str):
        """Pause at the next step: the model is handed back (and the queue lock freed) until resume."""
        job = service.queue.get(job_id)
        if job is None:
            raise BadInput(f"job {job_id} not found")
        if job.status not in ("running", "paused"):
            raise BadInput(f"job {job_id} is {job.status}, not running")
        job.control.pause()
        return job.public()

    def resume(job_id: str):
        job = service.queue.get(job_id)
        if job is None:
            raise BadInput(f"job {job_id} not found")
        job.control.unpause()
        return job.public()

    def grid(body: dict = Body(...)):
        """{"project", "epochs": ["name-01", ...] (default: all), "weights": [0.5, 1], "prompt", "seed", ...}"""
        from ..ui.host import GridRequest
        from ..ui.tab_test import epoch_files, number, parse_weights

        name = str(body.get("project", ""))
        project = service.project(name)
        known = [p.stem for p in epoch_files(host.lora_output_dir(name), name)]
        stems = body.get("epochs") or known
        if not stems:
            raise BadInput(f"project {name!r} has no epoch files yet")
        if not isinstance(stems, list):
            raise BadInput(f'epochs must be a list of epoch names, like ["{name}-01", "{name}-02"]')
        # the webui skips a <lora:...> it cannot find, so an unknown epoch would give a grid of the bare model
        missing = [str(s) for s in stems if str(s) not in known]
        if missing:
            raise BadInput(f"epoch {missing[0]!r} not found in project {name!r} (its epochs: {', '.join(known) or 'none yet'})")
        weights = body.get("weights", [])
        if not isinstance(weights, list):
            raise BadInput("weights must be a list of numbers, like [0.5, 1]")
        request = GridRequest(
            lora_stems=tuple(str(s) for s in stems), weights=parse_weights(", ".join(str(w) for w in weights)),
            prompt=str(body.get("prompt") or project.meta.activation_tag), negative_prompt=str(body.get("negative_prompt", "")),
            seed=int(number("Seed", body.get("seed", 1), -1, 2**32 - 1)),
            steps=int(number("Steps", body.get("steps", 20), 1, 150)),
            cfg_scale=number("CFG scale", body.get("cfg_scale", 7.0), 1, 30),
            width=int(number("Width", body.get("width", 512), 64, 2048)),
            height=int(number("Height", body.get("height", 512), 64, 2048)),
            sampler=str(body.get("sampler", "Euler a")),
        )
        service.check_idle_for("the comparison grid")
        result = host.run_grid(request)
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        return {"image": base64.b64encode(buf.getvalue()).decode("ascii"), "infotext": result.infotext}

    def merge(body: dict = Body(...)):
        """{"checkpoint": title, "loras": [{"path": ..., "weight": 0.8}], "name": "new-model"}"""
        from ..ui.host import MergeRequest

        known = {str(p) for p in host.lora_files()}
        by_stem = {Path(p).stem: p for p in known}
        from ..ui.tab_test import number

        loras = []
        items = body.get("loras") or []
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise BadInput('loras must be a list like [{"name": "mychar-08", "weight": 0.8}]')
        for item in items:
            ref = str(item.get("path") or item.get("name") or "")
            path = ref if ref in known else by_stem.get(ref)
            if path is None:
                raise BadInput(f"LoRA {ref!r} not found in the Lora folder")
            loras.append((path, number(f"weight of {ref}", item.get("weight", 1.0), -4.0, 4.0)))
        if not loras:
            raise BadInput("name at least one LoRA")
        service.check_idle_for("the merge")
        out = host.merge(MergeRequest(str(body.get("checkpoint", "")), tuple(loras), str(body.get("name", "")),
                                      str(body.get("save_precision", "fp16"))))
        return {"path": str(out)}

    route("/projects", list_projects, "GET")
    route("/projects", create_project, "POST", 201)
    route("/projects/{name}/tag", tag_project, "POST")
    route("/jobs", start_job, "POST", 201)
    route("/jobs", list_jobs, "GET")
    route("/jobs/{job_id}", job_status, "GET")
    route("/jobs/{job_id}/interrupt", interrupt, "POST")
    route("/jobs/{job_id}/pause", pause, "POST")
    route("/jobs/{job_id}/resume", resume, "POST")
    route("/grid", grid, "POST")
    route("/merge", merge, "POST")


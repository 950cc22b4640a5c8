"""What the tab and the API do with projects and jobs, in one place both call.

Why: "start a training from these settings" must behave the same from a button and from `POST /jobs`: the same
checks (model, project, dataset, every setting), the same refusal messages, nothing started when any fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..errors import BadInput
from . import fields, projects
from .jobs import Job, JobQueue


class TrainService:
    def __init__(self, host, queue: JobQueue | None = None) -> None:
        self.host = host
        if queue is None:
            from .runner import make_runner

            queue = JobQueue(make_runner(host))
        self.queue = queue

    # -- projects
    def root(self) -> Path:
        return self.host.projects_root()

    def project(self, name: str | None) -> projects.Project:
        if not name:
            raise BadInput("choose or create a project first")
        return projects.open_project(self.root(), name)

    def project_names(self) -> list[str]:
        return projects.list_projects(self.root())

    def saved_values(self, project: projects.Project) -> dict[str, Any]:
        """The tab's values for a project: its last settings, else the first-LoRA defaults."""
        if project.settings_file.is_file():
            from ..train.config_io import load_toml

            return {**fields.defaults(), **fields.from_config(load_toml(project.settings_file))}
        return fields.defaults()

    # -- jobs
    def fixed(self, project: projects.Project) -> dict[str, Any]:
        info = self.host.model_info()
        return {
            **self.host.fixed_config(info),
            "train_data_dir": str(project.dataset),
            "output_dir": str(self.host.lora_output_dir(project.name)),
            "output_name": project.name,
            "logging_dir": str(project.logs),
        }

    def make_config(self, project: projects.Project, values: Mapping[str, Any] | None = None, config=None):
        """A validated TrainConfig from tab values (or a given config); BadInput lists every error."""
        from ..train.validate import errors_of, validate

        if not project.images():
            raise BadInput(f"project {project.name!r} has no images: import a folder in the Dataset tab first")
        fixed = self.fixed(project)
        if config is not None:
            cfg = dataclasses.replace(config, **{k: v for k, v in fixed.items()})
        else:
            cfg = fields.build_config(values or {}, fixed)
        problems = errors_of(validate(cfg, need_model_path=False))
        if problems:
            raise BadInput("; ".join(str(p) for p in problems))
        return cfg

    def start(self, project_name: str, values: Mapping[str, Any] | None = None, config=None) -> Job:
        """Check everything, save the settings to the project, queue the job. Nothing is queued on any error."""
        project = self.project(project_name)
        self.host.check_can_train()
        cfg = self.make_config(project, values, config)
        from ..train.config_io import save_toml

        save_toml(cfg, project.settings_file)
        job = Job(project=project.name, config=cfg, meta=dict(project.meta.__dict__))
        return self.queue.submit(job)

    def steps_line(self, project_name: str | None, values: Mapping[str, Any]) -> tuple[str, int]:
        """('N images x repeats = M per epoch; ... = T steps', M) for the current widget values (no model needed)."""
        if not project_name:
            return "choose a project to see the step count", 0
        project = self.project(project_name)
        from ..train.config import TrainConfig
        from ..train.steps import plan_from_folders

        conv = fields.to_config_values({k: v for k, v in values.items() if k in fields.BY_NAME})
        keep = {k: v for k, v in conv.items() if k in ("max_train_epochs", "train_batch_size", "gradient_accumulation_steps")}
        cfg = dataclasses.replace(TrainConfig(), train_data_dir=str(project.dataset), **keep)
        plan = plan_from_folders(cfg)
        if not plan.train_images:
            return "no images yet: import a folder in the Dataset tab", 0
        return plan.describe(cfg), plan.repeated_images

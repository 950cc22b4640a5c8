"""What the tab and the API do with projects and jobs, in one place both call.

Why: "start a training from these settings" must behave the same from a button and from `POST /jobs`: the same
checks (model, project, dataset, every setting), the same refusal messages, nothing started when any fails.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Mapping

from ..errors import BadInput
from . import fields, projects
from .jobs import FINISHED, RUNNING, Job, JobQueue

LAST_PROJECT_FILE = ".last-project"  # in the projects folder: the project a page (re)load opens


def describe_problem(problem) -> str:
    """A validation problem named by the tab's label ('Network rank (dim): must be at least 1')."""
    f = fields.BY_NAME.get(problem.field)
    name = f"{f.label} ({problem.field})" if f else problem.field
    return f"{name}: {problem.message}" if name else problem.message


class TrainService:
    def __init__(self, host, queue: JobQueue | None = None) -> None:
        self.host = host
        if queue is None:
            from .runner import make_runner

            queue = JobQueue(make_runner(host))
        self.queue = queue
        self._start_lock = threading.Lock()

    # -- projects
    def root(self) -> Path:
        return self.host.projects_root()

    def project(self, name: str | None) -> projects.Project:
        if not name:
            raise BadInput("choose or create a project first")
        return projects.open_project(self.root(), name)

    def project_names(self) -> list[str]:
        return projects.list_projects(self.root())

    def remember_project(self, name: str | None) -> None:
        """Note the chosen project, so a page reload (or a restart) comes back to it. A convenience: a projects
        folder that cannot be written only loses the note."""
        if not name or name not in self.project_names():
            return
        from ..errors import LoraTrainError
        from ..fsutil import atomic_write_text

        try:
            atomic_write_text(self.root() / LAST_PROJECT_FILE, name)
        except (OSError, LoraTrainError):
            pass

    def last_project(self) -> str | None:
        """The project chosen last (remember_project), if it still exists."""
        try:
            name = (self.root() / LAST_PROJECT_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if name in self.project_names() else None

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
            "dataset_config": "",  # a project trains its own folders, as its train_data_dir says
            "output_dir": str(self.host.lora_output_dir(project.name)),
            "output_name": project.name,
            "logging_dir": str(project.logs),
            # resume state and previews stay in the project: the webui lists every .safetensors / .pt below its
            # Lora folder, so a state folder there would show cards named "network", "optimizer", "scheduler"
            "state_dir": str(project.state),
            "sample_dir": str(project.samples),
        }

    def make_config(self, project: projects.Project, values: Mapping[str, Any] | None = None, config=None):
        """A validated TrainConfig from tab values (or a given config); BadInput lists every error."""
        return self.checked_config(project, values, config)[0]

    def checked_config(self, project: projects.Project, values: Mapping[str, Any] | None = None,
                       config=None) -> tuple[Any, list[str]]:
        """(validated TrainConfig, warnings: settings allowed but probably not meant)."""
        from ..train.validate import errors_of, validate

        if not project.images():
            raise BadInput(f"project {project.name!r} has no images: import a folder in the Dataset tab first")
        fixed = self.fixed(project)
        if config is not None:
            cfg = dataclasses.replace(config, **{k: v for k, v in fixed.items()})
            fields.check_ranges(cfg)  # the widgets' values were checked on their way in; a config was not
        else:
            cfg = fields.build_config(values or {}, fixed)
        problems = validate(cfg, need_model_path=False)
        errors = errors_of(problems)
        if errors:
            raise BadInput("; ".join(describe_problem(p) for p in errors))
        return cfg, [describe_problem(p) for p in problems if p not in errors]

    def start(self, project_name: str, values: Mapping[str, Any] | None = None, config=None) -> Job:
        """Check everything, save the settings to the project, queue the job. Nothing is queued on any error."""
        with self._start_lock:  # two clicks (or a click and an API call) must not both pass the busy check
            return self._start(project_name, values, config)

    def _start(self, project_name: str, values: Mapping[str, Any] | None, config) -> Job:
        project = self.project(project_name)
        self.host.check_can_train()
        busy = [j for j in self.queue.jobs() if j.project == project.name and j.status not in FINISHED]
        if busy:
            raise BadInput(f"project {project.name!r} already has a training {busy[0].status} ({busy[0].id}); "
                           "a second run would overwrite its epoch files: wait for it or interrupt it, or copy "
                           "the project under another name to train a variant")
        cfg, warnings = self.checked_config(project, values, config)
        from ..train.config_io import save_toml

        # the earlier run's settings: the runner moves that run aside later (when the job runs) and keeps a copy
        earlier = project.settings_file.read_bytes() if project.settings_file.is_file() else b""
        save_toml(cfg, project.settings_file)
        job = Job(project=project.name, config=cfg, meta=dict(project.meta.__dict__),
                  warnings=warnings, earlier_settings=earlier)
        return self.queue.submit(job)

    def check_idle_for(self, what: str) -> None:
        """A generation-like job (the comparison grid) waits for the webui's queue lock, which a running training
        holds until its last epoch: refuse it with what to do instead of a spinner for the rest of the run. A run
        that is paused (or pausing) has handed the model back, so the job can go ahead."""
        job = self.queue.current()
        if job is not None and job.status == RUNNING and not job.control.paused:
            raise BadInput(f"a training is in progress ({job.project}, {job.id}): {what} would wait until it ends; "
                           "Pause it in the Train sub-tab (or wait for it), then try again")

    def steps_line(self, project_name: str | None, values: Mapping[str, Any]) -> tuple[str, int, str]:
        """('11 images x 5 repeats = 55 per epoch / batch 2 = 28 steps per epoch x 3 epochs = 84 steps', 55, lhs)
        for the current widget values (no model needed). `lhs` is the images x repeats part, which the page's
        javascript keeps while it recomputes the rest as the user types."""
        if not project_name:
            return "choose a project to see the step count", 0, ""
        project = self.project(project_name)
        from ..train.config import TrainConfig
        from ..train.steps import plan_from_folders

        conv = fields.to_config_values({k: v for k, v in values.items() if k in fields.BY_NAME})
        keep = {k: v for k, v in conv.items()
                if k in ("max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "validation_split")}
        cfg = dataclasses.replace(TrainConfig(), train_data_dir=str(project.dataset), **keep)
        plan = plan_from_folders(cfg)
        if not plan.train_images:
            return "no images yet: import a folder in the Dataset tab", 0, ""
        lhs = images_times_repeats(plan.concepts, plan.repeated_images)
        accum = cfg.gradient_accumulation_steps or 1
        text = (f"{lhs} per epoch / batch {cfg.train_batch_size}" + (f" / accumulation {accum}" if accum > 1 else "")
                + f" = {plan.epochs_text()}")
        return text, plan.repeated_images, lhs


def images_times_repeats(concepts, repeated: int) -> str:
    """'11 images x 5 repeats = 55', or '4 x 5 (5_a) + 3 x 10 (10_b) = 50' for several concept folders
    (`concepts`: `lib_lora.train.steps.ConceptCount`, images = the ones training can read)."""
    used = [c for c in concepts if c.images]
    if len(used) == 1:
        text = f"{used[0].images} images x {used[0].repeats} repeats = {repeated}"
    else:
        text = " + ".join(f"{c.images} x {c.repeats} ({c.folder})" for c in used) + f" = {repeated}"
    if repeated != sum(c.images * c.repeats for c in used):
        text += " (validation images held out)"
    unreadable = sum(c.unreadable for c in concepts)
    if unreadable:
        text += f" ({unreadable} unreadable image{'s' if unreadable > 1 else ''} left out: Dataset > Check images)"
    return text

"""The "LoRA Train" tab: a project bar over five sub-tabs (Dataset, Tags, Train, Test, Merge).

`build_tab(host)` returns a gr.Blocks that the webui renders as a tab and the standalone app serves as a page.
The project selector is shared: choosing a project refreshes every sub-tab at once.

Why refreshers come in two kinds: choosing a project loads its saved Train settings into the widgets, but a
change of the dataset (an import, a tagging run, a finished training) must not throw away settings the user is
editing; it only refreshes what shows the data (galleries, tables, epoch lists, the steps line). Opening a
sub-tab refreshes that sub-tab's data, so files written meanwhile (epochs, merged checkpoints) show up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr

from ..errors import BadInput
from . import projects
from .common import message, on
from .service import TrainService

SUB_TABS = ("Dataset", "Tags", "Train", "Test", "Merge")


@dataclass
class _Refresher:
    fn: Callable  # fn(project_name) -> {component: value}
    outputs: list
    tab: str
    settings: bool  # loads saved settings: only when a project is chosen
    needs_project: bool


@dataclass
class _Followup:
    fn: Callable  # fn(**inputs) -> {component: value}
    inputs: dict
    outputs: list
    tab: str


class Tab:
    def __init__(self, host, service: TrainService | None = None) -> None:
        self.host = host
        self.service = service or TrainService(host)
        self._refreshers: list[_Refresher] = []
        self._followups: list[_Followup] = []
        self._then_refresh: list = []
        self._building = ""
        self.selector = None
        self.msg = None

    # -- helpers for sub-tabs
    def project(self, name):
        return self.service.project(name)

    def on_project_change(self, fn: Callable, outputs: list, settings: bool = False, needs_project: bool = True) -> None:
        """Register `fn(project_name) -> {component: value}`: run when a project is chosen and, unless it loads
        saved settings (`settings=True`), also when the data changes or its sub-tab is opened."""
        self._refreshers.append(_Refresher(fn, list(outputs), self._building, settings, needs_project))

    def on_data_change(self, fn: Callable, inputs: dict, outputs: list) -> None:
        """Register `fn(**inputs)` to run after the data changed or its sub-tab is opened (for refreshes that
        need the current widget values, like the steps line)."""
        self._followups.append(_Followup(fn, dict(inputs), list(outputs), self._building))

    def refresh_after(self, dependency) -> None:
        """Refresh every sub-tab's data after `dependency` (an event that changed the dataset) has run."""
        self._then_refresh.append(dependency)

    def host_register_send(self, button, infotext) -> None:
        register = getattr(self.host, "register_send_to_txt2img", None)
        if register is None:
            button.visible = False
        else:
            register(button, infotext)

    def default_size(self) -> int:
        try:
            return {"sdxl": 1024, "sd2": 768}.get(self.host.model_info().arch, 512)
        except Exception:
            return 512

    def model_line(self) -> str:
        try:
            info = self.host.model_info()
            return message(f"model: {info.name} ({info.sd_version})", "info")
        except BadInput as exc:
            return message(str(exc), "warn")

    # -- the page
    def build(self) -> gr.Blocks:
        from . import tab_dataset, tab_merge, tab_tags, tab_test, tab_train

        builders = {"Dataset": tab_dataset, "Tags": tab_tags, "Train": tab_train, "Test": tab_test, "Merge": tab_merge}
        with gr.Blocks(analytics_enabled=False, css=_CSS) as blocks:
            with gr.Row(elem_id="lora_train_project_bar"):
                self.selector = gr.Dropdown(self.service.project_names(), label="Project", elem_id="lora_train_project",
                                            scale=3)
                refresh = gr.Button("Refresh", elem_id="lora_train_project_refresh", scale=1)
                new_name = gr.Textbox(label="New project name", elem_id="lora_train_new_name", scale=3)
                create = gr.Button("Create project", elem_id="lora_train_create", scale=1)
            model = gr.HTML(self.model_line(), elem_id="lora_train_model")
            self.msg = gr.HTML("", elem_id="lora_train_msg")
            sub_tabs = {}
            with gr.Tabs(elem_id="lora_train_tabs"):
                for label in SUB_TABS:
                    with gr.Tab(label, elem_id=f"lora_train_tab_{label.lower()}") as sub_tab:
                        self._building = label
                        builders[label].build(self)
                    sub_tabs[label] = sub_tab
            self._building = ""

            def outputs_of(items) -> list:
                out: list = []
                for item in items:
                    out += [o for o in item.outputs if o not in out]
                return out

            def run(refreshers, project_name) -> dict:
                result: dict = {}
                errors = []
                for r in refreshers:
                    if r.needs_project and not project_name:
                        continue
                    try:
                        result.update(r.fn(project_name))
                    except BadInput as exc:
                        errors.append(str(exc))
                if errors:
                    result[self.msg] = message("; ".join(errors), "error")
                return result

            def wire_data_refresh(event_then, refreshers, followups) -> None:
                outputs = outputs_of(refreshers)
                if refreshers:
                    on(event_then, lambda project_name: run(refreshers, project_name), {"project_name": self.selector},
                       outputs, error_output=self.msg, show_progress="hidden")
                for f in followups:
                    on(event_then, f.fn, f.inputs, f.outputs, error_output=self.msg, show_progress="hidden")

            data = [r for r in self._refreshers if not r.settings]

            # choosing a project: everything, saved settings included
            every = list(self._refreshers)
            def choose(project_name) -> dict:
                self.service.remember_project(project_name)  # a page reload comes back to it
                return {model: self.model_line(), **run(every, project_name)}

            on(self.selector.change, choose, {"project_name": self.selector}, [model, self.msg, *outputs_of(every)],
               error_output=self.msg)
            # a change of the dataset: every sub-tab's data, settings the user is editing left alone
            for dependency in self._then_refresh:
                wire_data_refresh(dependency.then, data, self._followups)
            # opening a sub-tab: that sub-tab's data (epoch files, checkpoints and captions written meanwhile)
            for label, sub_tab in sub_tabs.items():
                wire_data_refresh(sub_tab.select, [r for r in data if r.tab == label],
                                  [f for f in self._followups if f.tab == label])
                # a message about another sub-tab's action would be read as about this one
                sub_tab.select(lambda: "", inputs=None, outputs=[self.msg], show_progress="hidden")

            def project_list(project_name=None) -> dict:
                names = self.service.project_names()
                return {self.selector: gr.update(choices=names, value=project_name if project_name in names else None),
                        model: self.model_line()}

            # Refresh: the project list, the model line and every sub-tab's data
            refreshed = on(refresh.click, project_list, {"project_name": self.selector}, [self.selector, model],
                           error_output=self.msg)
            wire_data_refresh(refreshed.then, data, self._followups)
            # a page (re)load: the project list and the model as they are now, not as they were at webui start
            # (the webui loads the model in the background after building the page), and the project chosen last
            # (its change event then loads its settings and data, as choosing it does)
            on(blocks.load, lambda: project_list(self.service.last_project()), {}, [self.selector, model],
               error_output=self.msg, show_progress="hidden")
            # projects made elsewhere (API, file manager, another browser) appear when the list is opened
            on(self.selector.focus, lambda: {self.selector: gr.update(choices=self.service.project_names())}, {},
               [self.selector], error_output=self.msg, show_progress="hidden")

            def do_create(new_name):
                root = self.service.root()
                project = projects.create_project(root, new_name)
                return {self.selector: gr.update(choices=self.service.project_names(), value=project.name),
                        new_name_box: "",
                        self.msg: message(f"created project {project.name} in {root}", "ok")}

            new_name_box = new_name
            on(create.click, do_create, {"new_name": new_name}, [self.selector, new_name, self.msg], error_output=self.msg)
        return blocks


def build_tab(host, service: TrainService | None = None) -> gr.Blocks:
    """The whole tab for `host` (a WebuiHost or a StandaloneHost)."""
    return Tab(host, service).build()


def _page_css() -> str:
    """style.css, for the standalone page (the webui links it by itself; a second copy there does no harm)."""
    from pathlib import Path

    try:
        return (Path(__file__).resolve().parents[2] / "style.css").read_text(encoding="utf-8")
    except OSError:
        return ""


_CSS = _page_css()

"""The "LoRA Train" tab: a project bar over five sub-tabs (Dataset, Tags, Train, Test, Merge).

`build_tab(host)` returns a gr.Blocks that the webui renders as a tab and the standalone app serves as a page.
The project selector is shared: choosing a project refreshes every sub-tab at once.
"""

from __future__ import annotations

from typing import Callable

import gradio as gr

from ..errors import BadInput
from . import projects
from .common import message, on
from .service import TrainService


class Tab:
    def __init__(self, host, service: TrainService | None = None) -> None:
        self.host = host
        self.service = service or TrainService(host)
        self._refreshers: list[tuple[Callable, list]] = []
        self._then_refresh: list = []
        self.selector = None
        self.msg = None

    # -- helpers for sub-tabs
    def project(self, name):
        return self.service.project(name)

    def on_project_change(self, fn: Callable, outputs: list) -> None:
        """Register `fn(project_name) -> {component: value}` to run whenever a project is chosen."""
        self._refreshers.append((fn, outputs))

    def refresh_after(self, dependency) -> None:
        """Refresh every sub-tab after `dependency` (an event that changed the dataset) has run."""
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

        with gr.Blocks(analytics_enabled=False, css=_CSS) as blocks:
            with gr.Row(elem_id="lora_train_project_bar"):
                self.selector = gr.Dropdown(self.service.project_names(), label="Project", elem_id="lora_train_project",
                                            scale=3)
                refresh = gr.Button("Refresh", elem_id="lora_train_project_refresh", scale=1)
                new_name = gr.Textbox(label="New project name", elem_id="lora_train_new_name", scale=3)
                create = gr.Button("Create project", elem_id="lora_train_create", scale=1)
            model = gr.HTML(self.model_line(), elem_id="lora_train_model")
            self.msg = gr.HTML("", elem_id="lora_train_msg")
            with gr.Tabs(elem_id="lora_train_tabs"):
                with gr.Tab("Dataset", elem_id="lora_train_tab_dataset"):
                    tab_dataset.build(self)
                with gr.Tab("Tags", elem_id="lora_train_tab_tags"):
                    tab_tags.build(self)
                with gr.Tab("Train", elem_id="lora_train_tab_train"):
                    tab_train.build(self)
                with gr.Tab("Test", elem_id="lora_train_tab_test"):
                    tab_test.build(self)
                with gr.Tab("Merge", elem_id="lora_train_tab_merge"):
                    tab_merge.build(self)

            all_outputs: list = [model, self.msg]
            for _, outs in self._refreshers:
                all_outputs += [o for o in outs if o not in all_outputs]

            def refresh_all(project_name):
                result: dict = {model: self.model_line()}
                if not project_name:
                    return result
                errors = []
                for fn, _ in self._refreshers:
                    try:
                        result.update(fn(project_name))
                    except BadInput as exc:
                        errors.append(str(exc))
                if errors:
                    result[self.msg] = message("; ".join(errors), "error")
                return result

            on(self.selector.change, refresh_all,
               {"project_name": self.selector}, all_outputs, error_output=self.msg)
            for dependency in self._then_refresh:
                on(dependency.then, refresh_all, {"project_name": self.selector}, all_outputs, error_output=self.msg)

            def do_create(new_name):
                root = self.service.root()
                project = projects.create_project(root, new_name)
                return {self.selector: gr.update(choices=self.service.project_names(), value=project.name),
                        self.msg: message(f"created project {project.name} in {root}", "ok")}

            on(create.click, do_create, {"new_name": new_name}, [self.selector, self.msg], error_output=self.msg)
            # projects made elsewhere (API, file manager, another browser) appear when the list is opened
            on(self.selector.focus, lambda: {self.selector: gr.update(choices=self.service.project_names())}, {},
               [self.selector], error_output=self.msg)
            on(refresh.click, lambda: {self.selector: gr.update(choices=self.service.project_names()),
                                       model: self.model_line()}, {}, [self.selector, model], error_output=self.msg)
        return blocks


def build_tab(host, service: TrainService | None = None) -> gr.Blocks:
    """The whole tab for `host` (a WebuiHost or a StandaloneHost)."""
    return Tab(host, service).build()


_CSS = """
.lora-train-msg.lt-error { color: #d33; font-weight: 600; }
.lora-train-msg.lt-ok { color: #2a7; }
.lora-train-msg.lt-warn { color: #c80; }
"""

"""Composition requests at submit: ``task: "auto"`` routed to a pipeline, and every composition
field checked against the registry and the tenant, so a mistake is a 4xx now and not a failed
job after a wait in line. Torch-free: the API process runs it."""

from __future__ import annotations

import re

from inference_server.errors import InvalidRequest
from inference_server.jobs.enums import Task
from inference_server.jobs.spec import ControlNetRequest, JobRequest, Route, Safety
from inference_server.registry import FamilySpec, Registry
from inference_server.registry.composition import RouteRule


def route(family: FamilySpec, req: JobRequest) -> tuple[JobRequest, Route | None]:
    """``req`` with a concrete task, and the route ``task: "auto"`` took (None: the client chose).

    The rules, first match wins: a mask or a mask prompt inpaints; a prompt holding a word of one
    of the family's routing rules, with an input image, generates anew through the rule's
    ControlNet on that image (the image gives the structure, the prompt the rest); any other input
    image is img2img, or an edit in an edit family; ControlNets alone steer a txt2img; else txt2img."""
    if req.task != "auto":
        return req, None
    tasks = set(family.tasks)
    if req.mask or req.mask_prompt:
        why = "a mask was given" if req.mask else "a mask_prompt was given"
        return _routed(family, req, Task.INPAINT, why)
    rule = _matching_rule(family, req) if req.image and not req.controlnets else None
    if rule is not None:
        word, entry = rule
        control = ControlNetRequest(name=entry.controlnet, preprocess=entry.preprocess, scale=entry.scale)
        reason = (
            f"the prompt names {word!r}: the input image's structure steers a new image "
            f"(ControlNet {entry.controlnet!r})"
        )
        routed = req.model_copy(update={"controlnets": [control]})
        return _routed(family, routed, Task.TXT2IMG, reason, controlnet=entry.controlnet)
    if req.image:
        if Task.IMG2IMG not in tasks and Task.EDIT in tasks:
            return _routed(
                family, req, Task.EDIT, "an input image, and the family edits images by instruction"
            )
        return _routed(family, req, Task.IMG2IMG, "an input image without a mask")
    if req.controlnets:
        return _routed(family, req, Task.TXT2IMG, "control images without an input image")
    return _routed(family, req, Task.TXT2IMG, "no input image")


def _routed(
    family: FamilySpec, req: JobRequest, task: Task, reason: str, *, controlnet: str | None = None
) -> tuple[JobRequest, Route]:
    if task not in family.tasks:
        supported = ", ".join(map(str, family.tasks))
        raise InvalidRequest(
            f"task auto chose {task.value!r} ({reason}), which family {family.name!r} does not run "
            f"(it runs {supported})",
            code="unsupported_task",
        )
    return req.model_copy(update={"task": task}), Route(task=task, reason=reason, controlnet=controlnet)


def _matching_rule(family: FamilySpec, req: JobRequest) -> tuple[str, RouteRule] | None:
    words = set(_words(req.prompt))
    for rule in family.routes:
        for word in rule.words:
            if word.lower() in words:
                return word, rule
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def check(registry: Registry, family: FamilySpec, req: JobRequest, *, safety: Safety) -> None:
    """Refuse composition fields that cannot run on ``family`` (``req.task`` is concrete by now)."""
    task = Task(req.task)
    composing = req.controlnets or req.ip_adapter
    if composing and task == Task.EDIT:
        raise InvalidRequest(
            "edit jobs take no ControlNet or IP-Adapter: the edit pipelines have no such inputs",
            code="unsupported_composition",
        )
    for i, control in enumerate(req.controlnets):
        entry = family.controlnet(control.name)
        if entry is None:
            raise InvalidRequest(
                _unknown(registry, family, "ControlNet", control.name), code="unknown_controlnet"
            )
        if not control.image and not req.image:
            raise InvalidRequest(
                f"controlnets[{i}] ({control.name!r}) has no image, and the job has no input image "
                "to take it from",
                code="missing_control_image",
            )
        kind = control.preprocess or entry.preprocess
        if kind not in registry.tools.preprocess_kinds():
            known = ", ".join(registry.tools.preprocess_kinds())
            raise InvalidRequest(
                f"controlnets[{i}]: preprocess {kind!r} has no model in this deployment (available: {known})",
                code="unsupported_composition",
            )
    if req.return_control and not req.controlnets:
        raise InvalidRequest("return_control needs at least one ControlNet", code="unsupported_composition")
    if req.ip_adapter is not None and family.ip_adapter(req.ip_adapter.name) is None:
        raise InvalidRequest(
            _unknown(registry, family, "IP-Adapter", req.ip_adapter.name), code="unknown_ip_adapter"
        )
    if req.mask_prompt is not None:
        if task != Task.INPAINT:
            raise InvalidRequest(
                f"mask_prompt is for inpaint jobs (this one is {task.value}; task auto inpaints with it)",
                code="unsupported_composition",
            )
        if req.mask:
            raise InvalidRequest("give a mask or a mask_prompt, not both", code="invalid_request")
        if registry.tools.detector is None:
            raise InvalidRequest(
                "mask_prompt needs a detector, and this deployment has none", code="no_detector"
            )
    if req.return_mask and task != Task.INPAINT:
        raise InvalidRequest("return_mask is for inpaint jobs", code="unsupported_composition")
    if safety != "off" and family.safety_checker is None:
        raise InvalidRequest(
            f"safety {safety!r} needs a safety checker, and family {family.name!r} has none "
            "(use safety 'off')",
            code="no_safety_checker",
        )


def _unknown(registry: Registry, family: FamilySpec, what: str, name: str) -> str:
    table = "controlnets" if what == "ControlNet" else "ip_adapters"
    own = [e.name for e in getattr(family, table)]
    elsewhere = [
        f.name
        for f in registry.families.values()
        if f is not family and any(e.name == name for e in getattr(f, table))
    ]
    if elsewhere:
        return (
            f"{what} {name!r} belongs to family {elsewhere[0]!r}, not {family.name!r} "
            f"(its own: {', '.join(own) or 'none'})"
        )
    return f"unknown {what} {name!r} for {family.name} (known: {', '.join(own) or 'none'})"


def resolved_safety(req: JobRequest, tenant_safety: str | None, default: Safety) -> Safety:
    """The job's safety: its own, else the tenant's default, else the deployment's."""
    chosen = req.safety or tenant_safety or default
    return chosen  # type: ignore[return-value]


def check_prompt(prompt: str, deny_words: list[str] | None) -> None:
    """Refuse a prompt holding a word (or phrase) of the tenant's deny-list: whole words, any case."""
    if not deny_words:
        return
    text = " ".join(_words(prompt))
    for word in deny_words:
        phrase = " ".join(_words(word))
        if phrase and re.search(rf"(?<![\w'-]){re.escape(phrase)}(?![\w'-])", text):
            raise InvalidRequest("the prompt holds a word this tenant does not allow", code="prompt_denied")

"""Logging for every role: one ``configure_logging`` call at start, text or JSON lines on stderr,
and the job a line is about.

A job's fields (``job_id``, ``tenant``, ``family``, ``attempt``) are held in a context variable set
where a job is handled (the worker's run, the service's submit, the dispatcher's delivery):

    with job_context(job_id=job_id):
        ...
        bind_job(tenant=..., family=..., attempt=...)   # once the claim has read them
        log.info("...")                                  # carries all four

A filter on the root handler copies them onto every record, so call sites log as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

JOB_FIELDS = ("job_id", "tenant", "family", "attempt")
CONTEXT_FIELDS = (*JOB_FIELDS, "request_id")  # request_id: the API request being handled
LogFormat = Literal["text", "json", "auto"]

_active: list[str] = ["text"]  # the format configure_logging chose, for banners that are not log lines
_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("inference_job", default=None)

# Loggers that are chatty at INFO without saying anything an operator acts on.
QUIET_LOGGERS = {
    "alembic.runtime.plugins": logging.WARNING,
    "botocore": logging.WARNING,
    "boto3": logging.WARNING,
    "urllib3": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "diffusers": logging.ERROR,
    "transformers": logging.ERROR,
    "accelerate": logging.WARNING,
    "peft": logging.WARNING,
    "uvicorn.access": logging.WARNING,  # the API writes its own access line (api/access_log.py)
    "uvicorn.error": logging.WARNING,
    "celery.worker.consumer.tasks": logging.WARNING,  # "Global QoS is disabled": expected, quorum queues
}

# Warnings raised at import or load by the engine's libraries about their own future, not ours.
_LIBRARY_WARNINGS = ("diffusers", "transformers", "torch", "accelerate", "peft", "huggingface_hub")


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside carries ``fields`` (any of CONTEXT_FIELDS); nested contexts add to
    them, and leave the outer ones as they were on exit."""
    token = _job.set({**(_job.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _job.reset(token)


def bind_job(**fields: Any) -> None:
    """Add fields to the current job context (no effect outside one)."""
    current = _job.get()
    if current is not None:
        _job.set({**current, **{k: v for k, v in fields.items() if v is not None}})


def current_job() -> dict[str, Any]:
    """The job fields in effect here (empty outside a job)."""
    return dict(_job.get() or {})


class JobFields(logging.Filter):
    """Copies the current job's fields onto each record (``None`` where unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job.get() or {}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` with ``job_id=... tenant=...`` after it on a job's lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(
            f"{n}={getattr(record, n)}" for n in CONTEXT_FIELDS if getattr(record, n, None) is not None
        )
        return f"{line} [{extra}]" if extra else line


def _json_formatter(role: str) -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(JsonFormatter):  # type: ignore[misc]
        def process_log_record(self, log_record: dict[str, Any]) -> dict[str, Any]:
            # A line about no job carries no empty job fields.
            return {k: v for k, v in log_record.items() if v is not None or k not in CONTEXT_FIELDS}

        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
            # ISO 8601 in UTC with milliseconds: lines of several processes sort by it.
            stamp = datetime.fromtimestamp(record.created, UTC)
            return stamp.isoformat(timespec="milliseconds")

    return Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"role": role},
    )


def resolve_format(fmt: str, stream: Any = None) -> Literal["text", "json"]:
    """``auto``: text for a person at a terminal, JSON for a collector reading a pipe or a file."""
    if fmt in ("text", "json"):
        return fmt  # type: ignore[return-value]
    stream = stream if stream is not None else sys.stderr
    return "text" if getattr(stream, "isatty", lambda: False)() else "json"


def configure_logging(fmt: str = "auto", level: str | int = "INFO", *, role: str = "cli") -> None:
    """Set up the process's logging once: one stderr handler with the job filter and the chosen
    format, library noise quieted, Python warnings from the engine's libraries dropped and the
    rest routed through logging (so they are JSON lines too)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFields())
    _active[0] = resolve_format(fmt)
    handler.setFormatter(_json_formatter(role) if _active[0] == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)
    quiet_libraries()
    logging.captureWarnings(True)


def json_logs() -> bool:
    """Whether this process logs JSON lines (then nothing else should be printed to its streams)."""
    return _active[0] == "json"


def quiet_libraries() -> None:
    """Silence the engine libraries' import-time warnings and progress bars, before they load."""
    for module in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
    # Read by diffusers, transformers and huggingface_hub when they load (tqdm bars per component).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

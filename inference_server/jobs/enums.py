"""The job's vocabulary, defined once: statuses and their transitions, tasks, event types, and the
outcomes of one run. The same values are stored in the database, shown by the API and carried by
webhooks."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# A redelivered job goes running -> running (a new attempt); nothing leaves a terminal status.
ALLOWED = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    ),
}


def can_transition(current: JobStatus | str, new: JobStatus | str) -> bool:
    return JobStatus(new) in ALLOWED.get(JobStatus(current), frozenset())


class Priority(StrEnum):
    """A job's priority; the scheduler publishes higher ranks first (the rank is what is stored)."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return PRIORITY_RANKS[self]

    @classmethod
    def of_rank(cls, rank: int | None) -> Priority:
        return next((p for p, r in PRIORITY_RANKS.items() if r == rank), cls.NORMAL)


PRIORITY_RANKS = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}


class Task(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    EDIT = "edit"

    @property
    def needs_image(self) -> bool:
        return self is not Task.TXT2IMG

    @property
    def has_strength(self) -> bool:
        """img2img and inpaint run only ``int(steps * strength)`` of their steps."""
        return self in (Task.IMG2IMG, Task.INPAINT)


class EventType(StrEnum):
    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    PREVIEW = "job.preview"  # only for a job that asked for previews
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"

    @classmethod
    def parse(cls, name: str) -> EventType:
        """``job.succeeded`` or its shorthand ``succeeded``; ValueError for anything else."""
        return cls(name if name.startswith("job.") else f"job.{name}")


class WebhookProfile(StrEnum):
    """The shape of a job's webhook deliveries (``webhook.profile``, or the tenant's default)."""

    STANDARD = "standard"  # Standard Webhooks: one signed POST per event
    SPLIT = "split"  # PATCH {url}/progress, POST {url}/complete, POST {url}/failed


class DeliveryKind(StrEnum):
    """How one delivery is sent (``webhook_deliveries.kind``)."""

    STANDARD = "standard"  # a Standard Webhooks POST to the URL
    SPLIT = "split"  # a `split` profile callback (webhooks/profiles.py)
    AMQP = "amqp"  # published to the job's reply_to queue; the url is ``amqp:<queue>``


TERMINAL_EVENT = {
    JobStatus.SUCCEEDED: EventType.SUCCEEDED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELED: EventType.CANCELED,
}
TERMINAL_EVENTS = frozenset(TERMINAL_EVENT.values())


class RunOutcome(StrEnum):
    """How one run of a job in a worker ended (logs and metrics; the job's status is the record)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    SUPERSEDED = "superseded"  # a cancel or a newer attempt took the job while this run went on
    REQUEUED = "requeued"  # a transient failure: the job goes back to its queue for another attempt
    ABANDONED = "abandoned"  # its end could not be recorded: the lease expires, the reconciler acts
    FINISHING = "finishing"  # denoised and handed to the worker's finisher, which records the end

    @property
    def finished_job(self) -> bool:
        return self in (RunOutcome.SUCCEEDED, RunOutcome.FAILED, RunOutcome.CANCELED)


class ClaimRefusal(StrEnum):
    """Why a worker did not run the job a message named."""

    MISSING = "missing"  # no such job: the message is dead-lettered
    FINISHED = "finished"  # already terminal: a duplicate message
    OWNED = "owned"  # another attempt holds a live lease on it
    EXHAUSTED = "exhausted"  # out of attempts: failed too_many_attempts, committed
    INVALID = "invalid"  # its stored spec does not validate: failed invalid_job_spec, committed

"""The catalogue of every error code a client or an operator can see, each defined once.

A code is the stable part of an error: it lands in an API error body, on a failed job and in its
``job.failed`` webhook, or on the command line as ``code: message``. ``api/errors.py`` takes the
HTTP status from here, ``InferenceError`` refuses a code that is not here, and ``docs/errors.md``
is generated from here: ``python -m inference_server.error_codes > docs/errors.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Surface(StrEnum):
    """Where a code shows up."""

    API = "API response"
    JOB = "failed job"
    CLI = "command line"
    RECEIVER = "webhooks.verify"
    INGRESS = "AMQP ingress"


API, JOB, CLI, RECEIVER, INGRESS = Surface.API, Surface.JOB, Surface.CLI, Surface.RECEIVER, Surface.INGRESS


@dataclass(frozen=True)
class ErrorCode:
    """One code. ``status`` is its HTTP status, None for a code that is never an HTTP response;
    ``reserved`` names a code before the work that raises it lands, so the name stays stable."""

    code: str
    status: int | None
    seen: tuple[Surface, ...]
    meaning: str
    reserved: bool = False


_c = ErrorCode  # a short name keeps the table below one entry a line


# fmt: off
REQUESTS = (
    _c("invalid_request", 400, (API, JOB), "The request breaks a rule of the job contract."),
    _c("validation_error", 422, (API,),
       "The body or query does not match the schema: a field missing, of the wrong type or out of range."),
    _c("request_too_large", 413, (API,), "The request body is over MAX_REQUEST_BYTES."),
    _c("invalid_characters", 400, (API,),
       "The path, query, a header or a JSON string holds a NUL character or an unpaired surrogate."),
    _c("method_not_allowed", 405, (API,), "The route exists, but not with this HTTP method."),
    _c("http_error", 400, (API,), "Another refusal by the web framework; the response's status says which."),
    _c("unauthorized", 401, (API,), "No valid API key."),
    _c("missing_api_key", 401, (API,), "No `Authorization: Bearer <key>` header."),
    _c("invalid_api_key", 401, (API,), "The API key is unknown or revoked."),
    _c("rate_limited", 429, (API,), "Too many requests for this key; slow down and retry."),
    _c("not_found", 404, (API,), "The route, or the thing asked for, does not exist."),
    _c("job_not_found", 404, (API,), "No such job, or it belongs to another tenant."),
    _c("output_not_found", 404, (API,), "The job has no output with this index."),
    _c("output_expired", 410, (API,),
       "The job's outputs were deleted by retention (OUTPUT_RETENTION_DAYS, or the tenant's own)."),
    _c("job_deleted", 404, (API,), "The job was deleted (`DELETE /v1/jobs/{id}`); nothing of it is left."),
    _c("quota_exceeded", 429, (API,),
       "The tenant's monthly images are used up; `Retry-After` gives the seconds to the next month (UTC)."),
    _c("tenant_not_found", 404, (API, CLI), "No tenant with this name (`keys create --tenant` makes one)."),
    _c("key_not_found", 404, (API, CLI), "No API key with this id or prefix."),
    _c("ambiguous_key", 409, (API, CLI), "More than one API key has this prefix: name the key by its id."),
    _c("forbidden", 403, (API,), "The API key is valid but lacks the scope this request needs."),
    _c("admin_required", 403, (API,),
       "Only an admin key (`keys create --admin`) may do this: shared models and LoRAs, the file's models."),
    _c("preview_not_found", 404, (API,),
       "The job has no preview (yet): it did not ask for previews, or its first one is not made."),
    _c("invalid_last_event_id", 400, (API,),
       "`Last-Event-ID` (or `after`) is not an event's sequence number."),
    _c("conflict", 409, (API,), "The request conflicts with the current state."),
    _c("idempotency_conflict", 409, (API,), "This Idempotency-Key was already used with a different body."),
    _c("job_finished", 409, (API,), "The job already ended, so it cannot be canceled."),
    _c("delivery_in_flight", 409, (API,), "The webhook delivery is being attempted now; replay it later."),
    _c("priority_not_allowed", 400, (API,),
       "The job asks for a priority above its tenant's maximum (`tenants set --max-priority`)."),
    _c("invalid_filter", 400, (API,), "A list filter names a value that does not exist."),
    _c("invalid_cursor", 400, (API,), "The pagination cursor is not one this API returned."),
    _c("unknown_family", 400, (API, CLI),
       "The family is not in the model registry (a job's `family`, or a worker's `--families`)."),
    _c("unknown_model", 400, (API, JOB), "The model id is not registered in the family."),
    _c("unknown_lora", 400, (API, JOB), "The LoRA is not registered for the family, or absent at its URI."),
    _c("unsupported_task", 400, (API, JOB), "The family or model does not serve this task."),
    _c("model_not_found", 404, (API,), "No such model in the family, or it belongs to another tenant."),
    _c("model_exists", 409, (API,),
       "The family already has a model with this id (in the file or added at runtime)."),
    _c("model_in_registry_file", 409, (API,),
       "The model or LoRA comes from MODELS_FILE: change it there, not through the API."),
    _c("model_busy", 409, (API,),
       "Jobs for the model are queued or running; wait, or delete with `?force=true` to fail them."),
    _c("unsupported_model_source", 400, (API,),
       "A model or LoRA source is not an s3://, gs://, file:// or https:// URI, or its URL does not "
       "name a .tar/.tar.gz/.tgz archive (a model) or a .safetensors file (a LoRA), or is plain http://."),
    _c("lora_not_found", 404, (API,), "No such LoRA, or it belongs to another tenant."),
    _c("lora_exists", 409, (API,),
       "A LoRA with this name already exists (names are shared by every family)."),
    _c("invalid_lora", 400, (API,),
       "The uploaded file is not a safetensors LoRA (header, offsets, or no LoRA weights in it)."),
    _c("lora_family_mismatch", 400, (API,),
       "The LoRA's layers do not match the family's denoiser (another architecture or other sizes)."),
    _c("lora_too_large", 413, (API,), "The uploaded LoRA is over MAX_LORA_BYTES."),
    _c("invalid_size", 400, (API, JOB),
       "width or height is outside the family's limits, or not a multiple of its size step."),
    _c("invalid_steps", 400, (API,), "steps is over the family's limit."),
    _c("invalid_preview", 400, (API,), "preview.every_steps is more than the job's steps."),
    _c("missing_image", 400, (API,), "The task needs an input `image`."),
    _c("missing_mask", 400, (API,), "The inpaint task needs a `mask`."),
    _c("missing_prompt", 400, (API,), "The edit task needs a `prompt` (the instruction)."),
    _c("invalid_signature", 400, (API, JOB), "`signature` has a bad position, size, opacity or image."),
    _c("invalid_metadata", 400, (API, JOB), "`output.metadata` is not a small map of printable strings."),
    _c("invalid_output_format", 400, (API, JOB), "`output.format` is not png, jpeg or webp."),
    _c("invalid_output_quality", 400, (API, JOB), "`output.quality` is not between 1 and 100."),
    _c("webhook_verification_failed", 400, (RECEIVER,),
       "A received webhook's headers, timestamp or signature do not check out."),
    _c("missing_message_id", None, (INGRESS,),
       "An AMQP request has no `message_id` (its idempotency key), or one over 255 characters."),
    _c("invalid_message", None, (INGRESS,),
       "An AMQP request's body is not a JSON object, or its routing key, `reply_to`, `correlation_id` "
       "or `events` header cannot be used."),
    _c("unknown_controlnet", 400, (API,),
       "A `controlnets[].name` the family does not register (GET /v1/models lists them)."),
    _c("unknown_ip_adapter", 400, (API,),
       "An `ip_adapter.name` the family does not register (GET /v1/models lists them)."),
    _c("missing_control_image", 400, (API,),
       "A ControlNet has no `image` and the job has no input `image` to take its control from."),
    _c("unsupported_composition", 400, (API, JOB),
       "The family or task has no pipeline for this composition (a ControlNet, an IP-Adapter or a "
       "mask prompt where it cannot run)."),
    _c("no_detector", 400, (API,), "`mask_prompt` needs a detector, and the registry has none."),
    _c("no_safety_checker", 400, (API,),
       "`safety` is `flag` or `block`, and the registry has no safety checker for the family."),
    _c("prompt_denied", 400, (API,), "The prompt holds a word on the tenant's deny-list."),
    _c("unknown_tenant", None, (INGRESS, CLI),
       "No tenant has this name: `tenants set` names none (`keys create` makes one), or, with "
       "INGRESS_TRUST_USER_ID, an AMQP message's `user_id` names none."),
)

INPUTS = (
    _c("invalid_input", 400, (API, JOB), "An input image or mask cannot be used."),
    _c("invalid_data_uri", 400, (API,), "A `data:` URI is malformed, empty or not valid base64."),
    _c("unsupported_input_uri", 400, (API, JOB),
       "An input is not a `data:` URI, an `https://` URL or a URI from POST /v1/uploads."),
    _c("unsafe_url", 400, (API, JOB),
       "A URL uses a refused scheme or reaches a private, loopback or link-local address."),
    _c("input_not_found", 400, (JOB,), "No uploaded input at this storage URI."),
    _c("input_fetch_failed", 400, (JOB,), "An input URL could not be fetched (network, timeout, non-2xx)."),
    _c("input_too_large", 413, (API, JOB), "An input is over MAX_INPUT_BYTES or MAX_INPUT_PIXELS."),
    _c("decompression_bomb", 413, (API, JOB), "An image declares far more pixels than its bytes can hold."),
    _c("unsupported_format", 400, (API, JOB), "The image is a known format other than PNG, JPEG or WebP."),
    _c("not_an_image", 400, (API, JOB), "The bytes are not a PNG, JPEG or WebP image."),
    _c("corrupt_image", 400, (API, JOB), "The image's header or data is damaged."),
    _c("truncated_image", 400, (API, JOB), "The image file ends before its data does."),
)

DEPENDENCIES = (
    _c("dependency_unavailable", 503, (API, JOB),
       "A service the request needs (database, broker, storage) is unreachable."),
    _c("database_unavailable", 503, (API,),
       "The database is unreachable; nothing was recorded, so the request can be retried.", reserved=True),
    _c("storage_error", 503, (API, JOB), "Reading or writing job files failed after retries."),
    _c("storage_unavailable", 503, (API, JOB), "The storage service could not be reached after retries."),
    _c("storage_full", 503, (API, JOB), "The storage has no space left for the job's files."),
    _c("storage_read_only", 503, (API, JOB), "The storage refuses writes (a read-only disk or bucket)."),
)

JOBS = (
    _c("internal_error", 500, (API, JOB), "A bug or an unexpected failure; the detail is in the log."),
    _c("model_error", None, (JOB,), "The model could not be loaded, or failed while generating."),
    _c("df11_format_error", None, (JOB, CLI), "A folder or tensor marked DFloat11 is not in that format."),
    _c("mask_not_found", None, (JOB,),
       "The detector found nothing the `mask_prompt` names above its threshold: no mask to inpaint."),
    _c("content_blocked", 404, (API, JOB),
       "The safety checker blocked this output (`safety: block`): it is marked `blocked`, has no URL, "
       "and nothing of it was stored. Not a failure of the job."),
    _c("too_many_attempts", None, (JOB,), "The job was started JOB_MAX_ATTEMPTS times without finishing."),
    _c("invalid_job_spec", None, (JOB,),
       "The stored job does not validate as a JobSpec (written by hand or by another release)."),
    _c("model_deleted", None, (JOB,),
       "The job's model was deleted (`DELETE /v1/models/...?force=true`) while it was queued or running."),
    _c("poison_message", None, (JOB,),
       "The job's queue message failed every worker that took it, so it was set aside.", reserved=True),
    _c("canceled", None, (),
       "A canceled job has no error; only a `split` webhook profile reports a cancel, to /failed, with it."),
)

OPERATORS = (
    _c("registry_error", 503, (CLI,), "The model registry file (MODELS_FILE) is missing or invalid."),
    _c("database_not_migrated", None, (CLI,), "The database has no job tables: run the migrations."),
    _c("no_registry", None, (CLI,), "MODELS_FILE is not set, and a worker needs a model registry."),
    _c("invalid_families", None, (CLI,), "`--families` names no family."),
    _c("invalid_device", None, (CLI,), "`--device` is not cpu, cuda, cuda:N or mps."),
    _c("no_gpu", None, (CLI,), "A CUDA device was asked for but none is visible, or no GPU fits a family."),
    _c("worker_running", None, (CLI,), "A worker of the same device and families is already running."),
    _c("invalid_settings", None, (CLI,), "An environment setting has a value the settings refuse."),
    _c("invalid_storage_url", None, (CLI,), "STORAGE_URL does not start with file://, s3:// or gs://."),
    _c("invalid_warm_models", None, (CLI,), "WARM_MODELS names a family or model the registry lacks."),
)
# fmt: on

SECTIONS = {
    "Requests": REQUESTS,
    "Input images": INPUTS,
    "Dependencies": DEPENDENCIES,
    "Job failures": JOBS,
    "Operator mistakes": OPERATORS,
}

CATALOGUE: dict[str, ErrorCode] = {}
for _entry in (e for section in SECTIONS.values() for e in section):
    if _entry.code in CATALOGUE:
        raise RuntimeError(f"error code {_entry.code!r} is catalogued twice")
    CATALOGUE[_entry.code] = _entry


def lookup(code: str) -> ErrorCode:
    """The entry of ``code``. A code nobody catalogued is a bug: ``LookupError`` says where to add it."""
    try:
        return CATALOGUE[code]
    except KeyError:
        raise LookupError(
            f"error code {code!r} is not in inference_server/error_codes.py: add it there "
            "(status and meaning), then regenerate docs/errors.md"
        ) from None


def render_markdown() -> str:
    """``docs/errors.md``: every code with its HTTP status, where it shows up and what it means."""
    lines = [
        "# Error codes",
        "",
        "<!-- Generated from inference_server/error_codes.py; do not edit. Regenerate with:",
        "     python -m inference_server.error_codes > docs/errors.md -->",
        "",
        'Every error carries a stable `code` and a human `message`. The API answers `{"error": {"code": ...,',
        '"message": ...}}` with the status below; a failed job carries the same `{code, message}` in its',
        "`error` field and in its `job.failed` webhook; the command line prints `Error: code: message` and",
        "exits with status 1. Messages are for people and may change; codes do not. HTTP `—` marks a code",
        "that is never an HTTP response. *Reserved* codes are named ahead of the work that raises them.",
    ]
    for title, entries in SECTIONS.items():
        lines += ["", f"## {title}", "", "| Code | HTTP | Seen in | Meaning |", "|---|---|---|---|"]
        for e in entries:
            status = "—" if e.status is None else str(e.status)
            seen = ", ".join(s.value for s in e.seen) or "—"
            meaning = ("*Reserved.* " if e.reserved else "") + e.meaning.replace("|", "\\|")
            lines.append(f"| `{e.code}` | {status} | {seen} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")

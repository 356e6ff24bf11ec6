"""One rooted hierarchy of domain errors. Each carries a stable ``code`` that lands on a failed job,
in its webhook and in API error bodies. Codes, their HTTP statuses and meanings are catalogued in
``inference_server.error_codes``; a code missing there fails when the class is defined or the error
is built, so a typo cannot reach a client."""

from __future__ import annotations

from typing import Any

from inference_server.error_codes import lookup


class InferenceError(Exception):
    """Base of every error this system raises on purpose."""

    code = "internal_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        lookup(cls.code)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            lookup(code)
            self.code = code

    @property
    def status(self) -> int | None:
        """The HTTP status of this error's code (None: never an HTTP response)."""
        return lookup(self.code).status


class InvalidRequest(InferenceError):
    """The client sent something the contract does not allow."""

    code = "invalid_request"


class InvalidInput(InvalidRequest):
    """An input image or mask could not be used (format, size, content)."""

    code = "invalid_input"


class InputTooLarge(InvalidInput):
    """An input is over the byte or pixel limit."""

    code = "input_too_large"


class UnsafeURL(InvalidRequest):
    """A URL points at a private, loopback or link-local address, or uses a refused scheme."""

    code = "unsafe_url"


class InputFetchFailed(InferenceError):
    """An input URL could not be fetched within its timeout and retries."""

    code = "input_fetch_failed"


class NotFound(InferenceError):
    """The thing asked for does not exist, or belongs to another tenant."""

    code = "not_found"


class Unauthorized(InferenceError):
    """No API key, or one that is not valid."""

    code = "unauthorized"


class Forbidden(InferenceError):
    """The key is valid but lacks the scope the request needs."""

    code = "forbidden"


class Conflict(InferenceError):
    """The request conflicts with the current state (an idempotency key reused with another body)."""

    code = "conflict"


class RateLimited(InferenceError):
    """Too many requests for this key."""

    code = "rate_limited"


class DependencyDown(InferenceError):
    """A service the request needs (database, broker, storage) is unreachable."""

    code = "dependency_unavailable"


class ModelError(InferenceError):
    """The engine could not load or run a model."""

    code = "model_error"


class ConfigurationError(InferenceError):
    """An operator's mistake: a setting, a command-line option or a file the deployment provides."""

    code = "invalid_settings"


class RegistryError(ConfigurationError):
    """The model registry file is missing or invalid."""

    code = "registry_error"


class StorageError(InferenceError):
    """Reading or writing job files failed after retries."""

    code = "storage_error"


class StorageUnavailable(StorageError):
    """The storage did not answer, timed out or failed on its side (5xx) after bounded retries."""

    code = "storage_unavailable"


class StorageFull(StorageError):
    """The storage has no space or quota left for the write."""

    code = "storage_full"


class StorageReadOnly(StorageError):
    """The storage refuses writes: a read-only mount, missing permission, access denied."""

    code = "storage_read_only"


class JobCanceled(InferenceError):
    """The job was canceled while it ran (control flow, not a failure)."""

    code = "canceled"


def public_reason(exc: BaseException) -> str:
    """What a client may read about ``exc``: a domain error's own message, else only the class name.
    Library messages carry paths, hosts and object reprs; they belong in the log."""
    return exc.message if isinstance(exc, InferenceError) else type(exc).__name__

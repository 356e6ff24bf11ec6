"""Whether a failed fetch is worth another try, for input URLs (and other outbound requests).
The words for why it failed are ``net_errors.reason``."""

from __future__ import annotations

import requests

from inference_server.errors import InputFetchFailed


class TransientFetchError(InputFetchFailed):
    """A fetch failure that another try may get past: the network, a timeout, a 5xx, a 429."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def transient(exc: BaseException) -> bool:
    """Whether another try may succeed. A certificate the server presents or a URL that cannot be
    parsed stays so on the next try."""
    return not isinstance(exc, requests.exceptions.SSLError | requests.exceptions.InvalidURL)


def retry_after(response: requests.Response) -> float | None:
    """The seconds of a ``Retry-After`` header (the HTTP-date form is ignored)."""
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None

"""Where input images come from: ``data:`` URIs, ``https://`` URLs and storage URIs.

``resolve_input`` turns the reference a client sent (``image``, ``mask``, ``signature.image``) into
bytes, bounded by ``max_bytes`` on every path; ``decode.decode_image`` then validates those bytes.
The API calls it for inline inputs at submit (so a bad ``data:`` URI is a 4xx), the worker for the
rest (so a bad URL fails the job with a code, never the worker).
"""

from __future__ import annotations

import base64
import binascii
import random
import time
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from inference_server.errors import InputFetchFailed, InputTooLarge, InvalidInput, NotFound, UnsafeURL

# Schemes handed to the storage reader. The reader must refuse URIs outside the configured storage
# root (file:///etc/passwd, another bucket): this module cannot know that root.
STORAGE_SCHEMES = ("file://", "s3://", "gs://")
RETRY_BASE = 0.5  # seconds before the second try of a URL; doubled for each one after
MIN_ATTEMPT = 0.5  # no try is started with less of the budget left

_WHITESPACE = b" \t\r\n\f\v"


def parse_data_uri(uri: str, *, max_bytes: int | None = None) -> bytes:
    """Decode a ``data:`` URI (base64 or percent-encoded) into bytes.

    Raises ``InvalidInput`` (code ``invalid_data_uri``) when malformed or empty, and
    ``InputTooLarge`` when ``max_bytes`` is given and the payload is larger (checked on the encoded
    length first, so a huge URI is refused before it is decoded).
    """
    # RFC 2397: data:[<mediatype>][;base64],<data>. The media type is ignored on purpose: the real
    # format is sniffed from the bytes, a client's claim is not trusted.
    comma = uri.find(",")
    if uri[:5].lower() != "data:" or comma < 0:
        raise InvalidInput(
            "not a data: URI (expected data:[<type>][;base64],<data>)", code="invalid_data_uri"
        )
    meta = uri[5:comma].lower()
    payload = uri[comma + 1 :]
    is_base64 = meta.endswith(";base64") or meta == "base64"
    if max_bytes is not None:
        # base64 is 4 characters per 3 bytes; percent-encoding at least 1 character per byte.
        bound = len(payload) * 3 // 4 if is_base64 else len(payload) // 3
        if bound > max_bytes:
            raise InputTooLarge(f"input is larger than {max_bytes} bytes", code="input_too_large")
    try:
        if is_base64:
            raw = payload.encode("ascii")
            if b"%" in raw:
                raw = unquote_to_bytes(raw)
            raw = raw.translate(None, _WHITESPACE)  # line-wrapped base64 (MIME style)
            # Accept unpadded and URL-safe base64: both are common in the wild.
            raw = raw.replace(b"-", b"+").replace(b"_", b"/")
            raw += b"=" * (-len(raw) % 4)
            data = base64.b64decode(raw, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except UnicodeEncodeError as exc:
        raise InvalidInput("data: URI has characters outside ASCII", code="invalid_data_uri") from exc
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("data: URI payload is not valid base64", code="invalid_data_uri") from exc
    if not data:
        raise InvalidInput("data: URI is empty", code="invalid_data_uri")
    if max_bytes is not None and len(data) > max_bytes:
        raise InputTooLarge(f"input is larger than {max_bytes} bytes", code="input_too_large")
    return data


def input_kind(ref: str) -> str:
    """Classify a reference without fetching it: ``"data"``, ``"url"``, ``"storage"``.

    Lets the API decide what it can validate at submit (``data``) and what the worker fetches later.
    Raises ``InvalidInput`` (code ``unsupported_input_uri``) for any other scheme.
    """
    lowered = ref[:16].lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith(("https://", "http://")):
        return "url"
    if lowered.startswith(STORAGE_SCHEMES):
        return "storage"
    raise InvalidInput(
        "an input must be a data: URI, an https:// URL or a storage URI from POST /v1/uploads",
        code="unsupported_input_uri",
    )


def resolve_input(
    ref: str,
    *,
    read_storage: Callable[[str], bytes],
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    attempts: int = 3,
) -> bytes:
    """Return the bytes an input reference points at, at most ``max_bytes`` of them.

    - ``data:`` URIs are decoded in place;
    - ``https://`` URLs (and ``http://`` only when ``allow_private``, i.e. tests and single-machine
      setups) are fetched by ``inference_server.netguard.fetch_url`` with the private-address guard
      and the size limit, up to ``attempts`` times with backoff when the network or the server
      failed (5xx, 429), all within ``timeout`` seconds; a 4xx is not tried again;
    - ``file://``, ``s3://``, ``gs://`` storage URIs go to ``read_storage``, which must confine them to
      the configured storage root.

    Raises ``InvalidInput`` (``invalid_data_uri``, ``unsupported_input_uri``, ``input_not_found``),
    ``InputTooLarge``, ``UnsafeURL`` or ``InputFetchFailed``.
    """
    kind = input_kind(ref)
    if kind == "data":
        return parse_data_uri(ref, max_bytes=max_bytes)
    if kind == "url":
        if ref[:8].lower() != "https://" and not allow_private:
            raise UnsafeURL("input URLs must use https://", code="unsafe_url")
        data = fetch_with_retries(
            ref, allow_private=allow_private, timeout=timeout, max_bytes=max_bytes, attempts=attempts
        )
    else:
        try:
            data = read_storage(ref)
        except (FileNotFoundError, NotFound) as exc:  # the storage backends raise NotFound
            raise InvalidInput(f"no uploaded input at {ref}", code="input_not_found") from exc
    if len(data) > max_bytes:
        raise InputTooLarge(f"input is larger than {max_bytes} bytes", code="input_too_large")
    return data


def fetch_with_retries(
    url: str, *, allow_private: bool, timeout: float, max_bytes: int, attempts: int
) -> bytes:
    """``netguard.fetch_url``, tried again after a transient failure while attempts and the
    ``timeout`` budget last; the last failure is raised as ``InputFetchFailed``."""
    # Imported here: netguard belongs to the webhooks side and pulls in an HTTP client.
    from inference_server.netfailures import TransientFetchError
    from inference_server.netguard import fetch_url

    deadline = time.monotonic() + timeout
    attempt = 1
    while True:
        left = max(deadline - time.monotonic(), 0.1)
        try:
            return fetch_url(url, allow_private=allow_private, timeout=left, max_bytes=max_bytes)
        except TransientFetchError as exc:
            # Backoff with jitter, so an input many jobs share is not asked for in lockstep.
            pause = max(RETRY_BASE * 2 ** (attempt - 1) * random.uniform(0.5, 1.0), exc.retry_after or 0.0)
            if attempt >= attempts or time.monotonic() + pause + MIN_ATTEMPT > deadline:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise InputFetchFailed(exc.message + tries) from exc
        time.sleep(pause)
        attempt += 1

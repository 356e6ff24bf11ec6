"""Model and LoRA sources named by https:// URLs: one file, downloaded through the SSRF guard.

A model's URL names a ``.tar``/``.tar.gz``/``.tgz`` archive of its ``save_pretrained`` folder,
unpacked with tarfile's ``data`` filter and absolute names refused (no absolute paths, no ``..``,
no links out of the folder, no device files); a LoRA's names its ``.safetensors`` file."""

from __future__ import annotations

import logging
import random
import shutil
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from inference_server.errors import InferenceError, InputTooLarge, ModelError
from inference_server.netfailures import TransientFetchError
from inference_server.netguard import fetch_url
from inference_server.registry.access import LORA_SUFFIXES
from inference_server.settings import Settings

log = logging.getLogger(__name__)

RETRY_BASE = 1.0  # seconds before the second attempt; doubled after each


def is_url(uri: str) -> bool:
    return uri.startswith(("https://", "http://"))


def fetch_url_source(settings: Settings, url: str, dest: Path) -> Path:
    """Download ``url`` into the folder ``dest``: a LoRA file is returned as its path, a model
    archive as the folder it unpacks to. Raises ``ModelError`` (``model_error``) on any failure."""
    dest.mkdir(parents=True, exist_ok=True)
    path = urlsplit(url).path
    if path.lower().endswith(LORA_SUFFIXES):
        target = dest / (Path(unquote(path)).name or "lora.safetensors")
        _download(settings, url, target, settings.max_lora_bytes, "LoRA")
        return target
    archive = dest / ".download"
    _download(settings, url, archive, settings.max_model_download_bytes, "model archive")
    try:
        return extract(archive, dest / "model")
    finally:
        archive.unlink(missing_ok=True)


def _download(settings: Settings, url: str, target: Path, max_bytes: int, what: str) -> None:
    """Stream ``url`` to ``target``, tried again after transient failures up to the attempts set."""
    for attempt in range(1, settings.model_download_attempts + 1):
        try:
            with target.open("wb") as out:
                fetch_url(
                    url,
                    allow_private=settings.allow_private_networks,
                    timeout=settings.model_download_timeout,
                    max_bytes=max_bytes,
                    into=out,
                )
            return
        except InputTooLarge as exc:
            target.unlink(missing_ok=True)
            raise ModelError(f"the {what} is larger than the limit of {max_bytes} bytes") from exc
        except TransientFetchError as exc:
            target.unlink(missing_ok=True)
            if attempt >= settings.model_download_attempts:
                raise ModelError(f"{exc.message} (after {attempt} attempts)") from exc
            pause = max(RETRY_BASE * 2 ** (attempt - 1) * random.uniform(0.5, 1.0), exc.retry_after or 0.0)
            log.warning("downloading %s failed (%s), again in %.1f s", what, exc.message, pause)
            time.sleep(pause)
        except InferenceError as exc:  # unsafe_url, a 4xx: trying again changes nothing
            target.unlink(missing_ok=True)
            raise ModelError(exc.message) from exc


def _refuse_absolute(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    # The data filter would strip the leading slash and extract it; an archive built with
    # absolute names was not made from a model folder, so it is refused like one with "..".
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def extract(archive: Path, folder: Path) -> Path:
    """Unpack a tar archive (compressed or not) into ``folder`` and return the model folder in it:
    ``folder`` itself, or its single top directory when the archive wraps the files in one.
    An unsafe member (absolute, ``..``, a link out) refuses the whole archive with ``ModelError``."""
    shutil.rmtree(folder, ignore_errors=True)  # what an earlier, failed extraction left
    folder.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(folder, filter=_refuse_absolute)
    except tarfile.FilterError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelError(f"the model archive has an unsafe member: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelError(f"the model archive could not be unpacked ({type(exc).__name__})") from exc
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder

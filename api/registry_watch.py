"""The API's model registry when ``MODELS_FILE`` may not exist yet.

In the GPU compose flow and on Kubernetes the registry file is written into a shared volume by
the operator, possibly after the API starts. Exiting would crash-loop the API until then; instead
it starts with no families, ``/readyz`` answers 503 with ``checks.registry = false`` (so no
traffic is routed to an API that would refuse every submit with ``unknown_family``), and the
file is read as soon as it appears. A file that exists but does not validate still stops the
start: that is an operator's mistake to fix, not a file still on its way."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from inference_server.registry import Registry, load_registry

log = logging.getLogger(__name__)


class RegistryWatch:
    """Holds the process's one Registry object and fills it in place once its file exists, so
    everything handed the object (the job context, the metrics) sees the families appear."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path.exists():
            self.registry = load_registry(path)
            self.loaded = True
        else:
            self.registry = Registry(None, {})
            self.loaded = False
            log.warning("MODELS_FILE %s does not exist yet: not ready until it does", path)

    def ready(self) -> bool:
        """Whether the registry is loaded; reads the file if it has appeared since the last call."""
        if self.loaded or not self.path.exists():
            return self.loaded
        with self._lock:
            if not self.loaded:
                loaded = load_registry(self.path)  # invalid: raises, the probe answers 500 once logged
                self.registry.families.update(loaded.families)
                self.registry.path = loaded.path
                self.loaded = True
                log.info("model registry %s loaded: %s", self.path, ", ".join(loaded.families))
        return True

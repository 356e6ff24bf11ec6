"""The layout shows the flow: the API publishes through ``inference_server.publish`` and asks
webhooks only through ``webhooks.service``; it never imports the workers' package or torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.system import ROOT


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_api_imports_neither_workers_nor_webhook_internals() -> None:
    offending = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        for name in _imports(path):
            if name == "workers" or name.startswith("workers."):
                offending.append(f"{path.relative_to(ROOT)}: {name}")
            if name.startswith("webhooks.") and not name.startswith(("webhooks.service",)):
                offending.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offending, offending


def test_publishing_lives_outside_the_workers_package() -> None:
    for path in sorted((ROOT / "inference_server" / "publish").rglob("*.py")):
        assert not [n for n in _imports(path) if n.startswith("workers")], path


def test_building_the_api_loads_no_torch_and_no_worker_code() -> None:
    code = (
        "import sys; from api.app import create_app; from inference_server.settings import Settings; "
        "create_app(Settings(database_url='sqlite://', broker_url='memory://'), run_relay=True); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'workers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)

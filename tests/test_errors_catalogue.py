"""The error catalogue is the one list of codes: every code the source can produce is in it, the
API takes its statuses from it, an uncatalogued code fails where it is written, and docs/errors.md
is what the catalogue renders."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from api.errors import error_body, status_for
from inference_server import errors
from inference_server.error_codes import CATALOGUE, lookup, render_markdown

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "workers", "webhooks", "inference_server")
REGENERATE = "python -m inference_server.error_codes > docs/errors.md"


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def code_literals(tree: ast.AST) -> list[tuple[str, int]]:
    """(code, line) of every string written where an error code goes: ``code=`` and ``error_code=``
    arguments, ``code = ...`` in a class body, the first argument of ``error_body`` and
    ``error_response``, the code argument of ``transitions.fail`` and ``self._fail``,
    ``"error_code": ...`` in a dict, and the values of a ``*_CODES`` mapping."""
    found: list[tuple[str, int]] = []

    def add(node: ast.AST | None) -> None:
        value = _str(node)
        if value is not None and node is not None:
            found.append((value, node.lineno))  # type: ignore[attr-defined]

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in ("code", "error_code"):
                    add(kw.value)
            name = _name(node.func)
            if name in ("error_body", "error_response") and node.args:
                add(node.args[0])
            is_method = isinstance(node.func, ast.Attribute)  # transitions.fail, self._fail
            if is_method and name in ("fail", "_fail") and len(node.args) >= 2:
                add(node.args[1])
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(_name(t) == "code" for t in stmt.targets):
                    add(stmt.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if _str(key) == "error_code":
                    add(value)
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(_name(t).endswith("_CODES") for t in node.targets)
        ):
            for value in node.value.values:
                add(value)
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_code_in_the_source_is_catalogued() -> None:
    missing = []
    seen = set()
    for path in sources():
        for code, line in code_literals(ast.parse(path.read_text(), str(path))):
            seen.add(code)
            if code not in CATALOGUE:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {code!r}")
    assert not missing, "codes missing from inference_server/error_codes.py:\n" + "\n".join(missing)
    # The scan reaches every kind of place a code is written (else it could pass by finding nothing).
    assert {"job_not_found", "internal_error", "too_many_attempts", "not_found", "storage_full"} <= seen


def test_every_catalogued_code_is_used_or_reserved() -> None:
    strings = {
        node.value
        for path in sources()
        if path.name != "error_codes.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    stale = [c for c, e in CATALOGUE.items() if not e.reserved and c not in strings]
    assert not stale, f"catalogued but raised nowhere (remove them or mark them reserved): {stale}"
    reserved = {c for c, e in CATALOGUE.items() if e.reserved}
    assert {"database_unavailable", "poison_message"} <= reserved  # model_deleted is raised now (#14)


def test_the_scanner_sees_an_uncatalogued_code() -> None:
    tree = ast.parse(
        'class E(Exception):\n    code = "c1"\n'
        'raise InvalidRequest("x", code="c2")\n'
        'error_body("c3", "m")\n'
        'self._fail(claim, "c4", "m")\n'
        'row = {"error_code": "c5"}\n'
        'HTTP_CODES = {404: "c6"}\n'
    )
    assert sorted(c for c, _ in code_literals(tree)) == ["c1", "c2", "c3", "c4", "c5", "c6"]


def test_an_uncatalogued_code_fails_where_it_is_written() -> None:
    with pytest.raises(LookupError, match="error_codes.py"):
        errors.InvalidRequest("bad", code="not_a_catalogued_code")
    with pytest.raises(LookupError, match="not_a_catalogued_code"):

        class Stray(errors.InferenceError):
            code = "not_a_catalogued_code"

    with pytest.raises(LookupError):
        error_body("not_a_catalogued_code", "m")


def test_statuses_come_from_the_catalogue() -> None:
    for entry in CATALOGUE.values():
        exc = errors.InferenceError("m", code=entry.code)
        assert status_for(exc) == (entry.status or 500), entry
    # The contract's statuses (DESIGN.md) for the codes clients rely on.
    expected = {
        "validation_error": 422,
        "invalid_size": 400,
        "missing_api_key": 401,
        "job_not_found": 404,
        "idempotency_conflict": 409,
        "input_too_large": 413,
        "request_too_large": 413,
        "rate_limited": 429,
        "dependency_unavailable": 503,
        "database_unavailable": 503,
        "storage_unavailable": 503,
    }
    assert {code: lookup(code).status for code in expected} == expected
    allowed = {400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 503, None}  # 403: admin scope (#14)
    assert {e.status for e in CATALOGUE.values()} <= allowed


def test_every_entry_has_a_one_line_meaning_and_somewhere_to_be_seen() -> None:
    for entry in CATALOGUE.values():
        assert entry.meaning.endswith(".") and "\n" not in entry.meaning, entry
        assert entry.seen or entry.code == "canceled", entry  # canceled is control flow only


def test_docs_errors_md_is_what_the_catalogue_renders() -> None:
    committed = (ROOT / "docs" / "errors.md").read_text()
    assert committed == render_markdown(), f"docs/errors.md is stale: regenerate it with `{REGENERATE}`"
    command = [sys.executable, "-m", "inference_server.error_codes"]
    printed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert printed == committed
    for code in CATALOGUE:
        assert f"| `{code}` |" in committed

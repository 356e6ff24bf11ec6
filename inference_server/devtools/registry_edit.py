"""A registry file made from another with a few keys of one family changed: what tests and
benchmarks use to turn batching on for the tiny models (``models tiny`` writes it off)."""

from __future__ import annotations

from pathlib import Path

from inference_server.registry import load_registry


def with_family_keys(source: Path, family: str, name: str, **values: object) -> Path:
    """Write ``source``'s directory / ``name``: ``source`` with the top-level keys ``values`` of
    ``[families.<family>]`` set (added where absent), and return its path. Written beside
    ``source`` because model folders in a registry are relative to its file."""
    header = f'[families."{family}"]' if "-" in family else f"[families.{family}]"
    lines = source.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [ln for ln in lines[start + 1 : end] if ln.split("=")[0].strip() not in values]
    while body and not body[-1].strip():
        body.pop()
    body += [f"{key} = {_toml(value)}" for key, value in values.items()] + [""]
    out = source.parent / name
    out.write_text("\n".join([*lines[: start + 1], *body, *lines[end:]]) + "\n", encoding="utf-8")
    load_registry(out)  # refuse to hand out a file the registry would not read
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)

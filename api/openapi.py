"""The OpenAPI document: FastAPI's, completed with what every route shares.

Routes declare their own success model (``answers(JobView)``) and the errors only they give
(``answers(JobView, 404, 409)``). Built here for every operation, so a new route gets them too:
the error body schema on each error status the edge, auth and validation can give (FastAPI's own 422
schema is replaced: this API's 422 is the common error body), and the codes of the catalogue
behind each status. The registry's families and the loosest size and step limits over them are
filled in when the document is served, so they follow the registry."""

from __future__ import annotations

import copy
import math
from functools import reduce
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from inference_server.error_codes import API, CATALOGUE
from inference_server.registry import DEFAULT_LIMITS, Registry
from inference_server.schemas import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
WHAT = {
    400: "Bad request",
    401: "No valid API key",
    403: "The key lacks the scope this needs",
    404: "Not found",
    409: "Conflict",
    413: "Request too large",
    422: "Validation error",
    429: "Rate limited (see `Retry-After`)",
    503: "A dependency (database, broker, storage) is unavailable",
}
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}


def answers(model: type[BaseModel] | None, *errors: int, status: int = 200) -> dict[int | str, Any]:
    """A route's ``responses=``: ``model`` on ``status``, and the error body on ``errors``."""
    responses: dict[int | str, Any] = {status: {"model": model} if model else {}}
    for code in errors:
        responses[code] = {"model": ErrorResponse, "description": WHAT.get(code, "Error")}
    return responses


def _codes(status: int) -> str:
    """The catalogue's codes for ``status``, for the response's description."""
    if status == 400:  # too many to list per operation: the rules of the job contract are all 400
        return "`invalid_characters` on any route, the job contract's rules on bodies (docs/errors.md)"
    names = sorted(c.code for c in CATALOGUE.values() if c.status == status and API in c.seen)
    return ", ".join(f"`{n}`" for n in names)


def _error(status: int, description: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": f"{description.rstrip('.')}. Codes: {_codes(status)}.",
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status == 429:
        answer["headers"] = RETRY_AFTER
    return answer


def _complete_operation(path: str, op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})
    statuses = {400}  # the edge refuses unstorable text on any route
    if op.get("security"):
        statuses |= {401, 429, 503}
    if op.get("requestBody"):
        statuses |= {413, 422}
    if op.get("parameters") or op.get("requestBody"):
        statuses.add(422)
    if "{" in path:
        statuses.add(404)
    for status in statuses | {int(s) for s in responses if s.isdigit() and int(s) >= 400}:
        declared = responses.get(str(status), {}).get("description") or WHAT.get(status, "Error")
        responses[str(status)] = _error(status, declared)


def build(app: FastAPI) -> dict[str, Any]:
    """The static part of the document, built once per app."""
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["ErrorResponse"].pop("$defs", {}))
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            _complete_operation(path, op)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _link_jobs(doc)
    return doc


def _operation_id(doc: dict[str, Any], path: str, method: str) -> str | None:
    return doc["paths"].get(path, {}).get(method, {}).get("operationId")


def _link_jobs(doc: dict[str, Any]) -> None:
    """Links from a submitted job to the routes that take its id (clients and stateful testers
    follow them)."""
    submit = doc["paths"].get("/v1/jobs", {}).get("post")
    if submit is None:
        return
    job_id = {"job_id": "$response.body#/id"}
    targets = {
        "GetJob": ("/v1/jobs/{job_id}", "get", job_id),
        "CancelJob": ("/v1/jobs/{job_id}/cancel", "post", job_id),
        "GetFirstOutput": ("/v1/jobs/{job_id}/outputs/{index}", "get", {**job_id, "index": "0"}),
        "ListJobWebhooks": ("/v1/jobs/{job_id}/webhooks", "get", job_id),
    }
    links = {}
    for name, (path, method, params) in targets.items():
        target = _operation_id(doc, path, method)
        if target:
            links[name] = {"operationId": target, "parameters": params}
    for status, answer in submit["responses"].items():
        if status.startswith("2"):
            answer["links"] = links


def served(static: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """``static`` with the registry's families and limits filled in (a copy: the registry may change)."""
    doc = copy.deepcopy(static)
    request = doc["components"]["schemas"].get("JobRequest")
    families = list(registry.families.values())
    if request is None or not families:
        return doc
    props = request["properties"]
    props["family"]["enum"] = [f.name for f in families]
    limits: list[dict[str, Any]] = [{**DEFAULT_LIMITS, **f.limits} for f in families]
    for side in ("width", "height"):
        number = next(s for s in props[side]["anyOf"] if s.get("type") == "integer")
        number["minimum"] = int(max(number.get("minimum", 0), min(lim["min_size"] for lim in limits)))
        number["maximum"] = int(min(number.get("maximum", math.inf), max(lim["max_size"] for lim in limits)))
        loosest = reduce(math.gcd, (lim["size_multiple"] for lim in limits))
        number["multipleOf"] = math.lcm(int(number.get("multipleOf", 1)), loosest)
    steps = next(s for s in props["steps"]["anyOf"] if s.get("type") == "integer")
    steps["maximum"] = int(min(steps.get("maximum", math.inf), max(lim["max_steps"] for lim in limits)))
    return doc

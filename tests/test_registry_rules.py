"""The registry's rules as an operator meets them: each mistake named by file and key path in plain
words (no pydantic class names, no documentation links), and queues that a worker can consume."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from inference_server.errors import RegistryError
from inference_server.registry import parse_registry

ONE_MODEL = "[[families.sd15.models]]\nid = 'a'\nsource = 'b'\n"


def family(body: str = "", models: str = ONE_MODEL, name: str = "sd15") -> str:
    return f"[families.{name}]\ntasks = ['txt2img', 'img2img']\n{body}\n" + models.replace("sd15", name)


def problems(text: str) -> list[str]:
    with pytest.raises(RegistryError) as exc:
        parse_registry(tomllib.loads(text), Path("conf/models.toml"))
    lines = exc.value.message.splitlines()
    assert all(line.startswith("conf/models.toml: ") for line in lines), lines
    return [line.removeprefix("conf/models.toml: ") for line in lines]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            family(models=ONE_MODEL + "dtype = 'int8'\n"),
            "families.sd15.models[0].dtype: must be one of 'float32', 'float16' or 'bfloat16' (got 'int8')",
        ),
        (
            family(models=ONE_MODEL + "memory_gb = -1\n"),
            "families.sd15.models[0].memory_gb: must be at least 0",
        ),
        (
            family(models=ONE_MODEL + "default = 'yes'\n"),
            "families.sd15.models[0].default: must be true or false",
        ),
        (family(models=ONE_MODEL + "family = 'x'\n"), "families.sd15.models[0].family: unknown key"),
        (
            family(models=ONE_MODEL + "tasks = ['inpaint']\n"),
            "families.sd15.models[0].tasks: 'inpaint' is not a task of the family",
        ),
        (family("limits = { max_szie = 512 }"), "families.sd15.limits.max_szie: unknown key"),
        (
            family("limits = { max_size = 0 }"),
            "families.sd15.limits.max_size: must be greater than 0 (got 0)",
        ),
        (
            family("defaults = { width = 51.2 }"),
            "families.sd15.defaults.width: must be an integer (got 51.2)",
        ),
        (family("defaults = { strength = 2.0 }"), "families.sd15.defaults.strength: must be at most 1"),
        (family("limits = 3"), "families.sd15.limits: must be a table (got 3)"),
        (family(models="models = 3"), "families.sd15.models: must be an array (got 3)"),
        (family(models="models = []"), "families.sd15.models: must not be empty"),
        (
            family(models=ONE_MODEL * 2),
            "families.sd15.models[1].id: duplicate model id 'a'",
        ),
        (
            family(
                models=(ONE_MODEL + "default = true\n") + ONE_MODEL.replace("'a'", "'c'") + "default = true\n"
            ),
            "families.sd15.models[1].default: more than one model has default = true",
        ),
        ("families = {}", "families: must not be empty"),
        (
            family(name="'sd 15'"),
            "families.sd 15: 'sd 15' cannot name a family",
        ),
    ],
)
def test_each_mistake_is_named_plainly(text: str, expected: str) -> None:
    found = problems(text)
    assert any(line.startswith(expected) for line in found), found
    for line in found:
        assert (
            "pydantic" not in line and "http" not in line and "FamilySpec" not in line and "Input" not in line
        )


def test_every_mistake_of_a_file_is_listed_at_once() -> None:
    found = problems(family("colour = 1\nlimits = { max_size = -1 }", ONE_MODEL + "dtype = 'int8'\n"))
    assert sorted(line.split(":")[0] for line in found) == [
        "families.sd15.colour",
        "families.sd15.limits.max_size",
        "families.sd15.models[0].dtype",
    ]


@pytest.mark.parametrize(
    ("queue", "why"),
    [
        ("jobs,sd15", "cannot name a queue"),  # a worker's --queues is comma-separated
        ("jobs sd15", "cannot name a queue"),
        ("amq.sd15", "RabbitMQ's own"),
        ("q" * 129, "at most 128 characters"),  # the outbox's queue column
        ("", "cannot name a queue"),
    ],
)
def test_queue_names_a_worker_cannot_consume_are_refused(queue: str, why: str) -> None:
    found = problems(family(f"queue = {queue!r}"))
    assert len(found) == 1 and found[0].startswith("families.sd15.queue: ") and why in found[0], found


def test_two_families_cannot_share_a_queue() -> None:
    """A worker consumes whole queues: one chosen for sd15's models would be handed sdxl's jobs."""
    text = family() + family("queue = 'jobs.sd15'", name="sdxl")
    assert problems(text) == [
        "families.sdxl.queue: 'jobs.sd15' is already the queue of family 'sd15'; "
        "each family needs a queue of its own"
    ]


def test_queue_defaults_to_the_family_name_and_may_be_chosen() -> None:
    registry = parse_registry(tomllib.loads(family() + family("queue = 'gpu:xl.v2'", name="sdxl")))
    assert registry.family("sd15").queue == "jobs.sd15"
    assert registry.family("sdxl").queue == "gpu:xl.v2"


def test_parsed_values_are_the_documented_shapes() -> None:
    text = family("defaults = { width = 512, guidance_scale = 7 }", ONE_MODEL + "memory_gb = 3\n")
    sd = parse_registry(tomllib.loads(text)).family("sd15")
    assert sd.defaults == {"width": 512, "guidance_scale": 7.0}  # only what the file sets
    assert sd.limits == {"min_size": 64, "max_size": 2048, "max_steps": 150, "size_multiple": 8}
    model = sd.model(None, "img2img")
    assert (model.family, model.tasks, model.default, model.memory_gb) == (
        "sd15",
        ("txt2img", "img2img"),
        True,
        3.0,
    )
    with pytest.raises(Exception, match="frozen"):
        model.dtype = "float16"  # type: ignore[misc]

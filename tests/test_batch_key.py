"""Which jobs may share a pipeline call: the batch key of a JobSpec, and the registry's batching
policy (per family, per model over it, gated by size)."""

from __future__ import annotations

import pytest

from inference_server.errors import RegistryError
from inference_server.jobs.batch_key import batch_key
from inference_server.jobs.spec import JobSpec
from inference_server.registry import parse_registry

BASE = {"family": "sd15", "model": "m", "task": "txt2img", "width": 64, "height": 64, "steps": 4}
BASE["seeds"] = [1]


def key(**changes: object) -> str | None:
    return batch_key(JobSpec.model_validate({**BASE, **changes}))


def test_what_may_differ_inside_a_batch() -> None:
    same = key()
    assert same is not None
    assert key(prompt="another", seeds=[9, 10, 11]) == same
    assert key(output={"format": "jpeg", "metadata": {"a": "b"}}) == same
    assert key(signature={"image": "s3://b/sig.png"}) == same
    assert key(negative_prompt="x") == key(negative_prompt="y")
    base_img = {"task": "img2img", "strength": 0.5}
    assert key(**base_img, image="s3://b/1.png") == key(**base_img, image="s3://b/2.png")


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "other"},
        {"task": "img2img", "image": "s3://b/1.png"},
        {"width": 128},
        {"height": 128},
        {"steps": 5},
        {"guidance_scale": 3.0},
        {"loras": [{"name": "style", "scale": 1.0}]},
        {"negative_prompt": ""},  # a missing negative prompt is not the empty one (SDXL: zeros)
    ],
)
def test_what_keeps_jobs_apart(changes: dict) -> None:
    assert key(**changes) != key()


def test_lora_scales_and_strength_matter_and_edits_have_no_key() -> None:
    one = [{"name": "style", "scale": 1.0}]
    assert key(loras=one) != key(loras=[{"name": "style", "scale": 0.5}])
    img = {"task": "img2img", "image": "s3://b/1.png"}
    assert key(**img, strength=0.5) != key(**img, strength=0.6)
    assert key(task="edit", image="s3://b/1.png") is None
    assert key(task="edit", image="s3://b/1.png", width=None, height=None) is None


def test_a_job_that_asks_for_previews_runs_alone() -> None:
    # Previews are projected from one job's latents: a batch would give it none.
    assert key(preview={"every_steps": 2}) is None


def registry(family: dict, model: dict | None = None):  # type: ignore[no-untyped-def]
    models = [{"id": "a", "source": "x", **(model or {})}, {"id": "b", "source": "y"}]
    return parse_registry({"families": {"sd15": {"tasks": ["txt2img"], "models": models, **family}}})


def test_policy_per_family_and_model() -> None:
    off = registry({}).families["sd15"].batching("a")
    assert not off.enabled and not off.admits(64, 64, 1)
    fam = registry({"max_batch": 4, "batch_wait_ms": 25, "batch_max_pixels": 64 * 64}).families["sd15"]
    policy = fam.batching("b")
    assert (policy.max_batch, policy.batch_wait_ms, policy.batch_max_pixels) == (4, 25, 4096)
    assert policy.admits(64, 64, 3)
    assert not policy.admits(64, 72, 1)  # over batch_max_pixels: alone
    assert not policy.admits(64, 64, 4)  # fills a call alone
    assert not policy.admits(None, None, 1)
    own = registry({"max_batch": 4}, {"max_batch": 8, "batch_wait_ms": 0}).families["sd15"]
    assert own.batching("a").max_batch == 8 and own.batching("a").batch_wait_ms == 0
    assert own.batching("b").max_batch == 4 and own.batching("b").batch_wait_ms == 10


@pytest.mark.parametrize(
    ("family", "where"),
    [
        ({"max_batch": 0}, "families.sd15.max_batch"),
        ({"max_batch": 65}, "families.sd15.max_batch"),
        ({"batch_wait_ms": -1}, "families.sd15.batch_wait_ms"),
        ({"batch_max_pixels": 0}, "families.sd15.batch_max_pixels"),
        ({"max_batch": "4"}, "families.sd15.max_batch"),
    ],
)
def test_bad_batching_keys_name_the_key(family: dict, where: str) -> None:
    with pytest.raises(RegistryError, match=where.replace(".", r"\.")):
        registry(family)

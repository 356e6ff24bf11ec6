"""IP-Adapter per job: the reference image changes the pixels, its scale matters, and after reset
every variant sharing the denoiser computes exactly as a pipeline that never saw an adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from inference_server.engine import ip_adapter, variants
from inference_server.engine.tiny import build_tiny_models
from inference_server.engine.tiny.ip_adapter import WEIGHT_NAME, build_ip_adapter
from inference_server.errors import ModelError
from tests.support.engine import tiny_request

torch.set_num_threads(1)

FAMILIES = ("sd15", "sdxl", "flux")
DTYPES = {"sd15": torch.float32, "sdxl": torch.float32, "flux": torch.bfloat16}
INPUT = Image.new("RGB", (64, 64), (120, 60, 30))
REFERENCE = Image.linear_gradient("L").resize((48, 40)).convert("RGB")  # not square: the processor crops
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ip-tiny")
    build_tiny_models(out, list(FAMILIES))
    for family in FAMILIES:
        build_ip_adapter(out / family, out / "ip" / family)
    return out


def load(models: Path, family: str) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(models / family), dtype=DTYPES[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def bases(models: Path) -> dict[str, Any]:
    """The pipelines adapters are applied to, one per family, as the engine caches them."""
    return {family: load(models, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def clean(models: Path) -> dict[str, Any]:
    """Pipelines that never see an adapter: the bytes every reset must give back."""
    return {family: load(models, family) for family in FAMILIES}


_variants: dict[tuple[int, str], Any] = {}


def variant(base: Any, task: str) -> Any:
    """``base``'s variant for ``task``, made once and kept, as the engine keeps them."""
    key = (id(base), task)
    if key not in _variants:
        _variants[key] = variants.variant(base, task)
    return _variants[key]


def run(
    base: Any, family: str, task: str, seeds: list[int] | None = None, ip: Image.Image | None = None
) -> str:
    """The engine's call of ``task`` on ``base``: its variant, its arguments, plus the adapter's."""
    pipe = variant(base, task)
    req = tiny_request(
        family,
        task,
        seeds=seeds or [4],
        image=INPUT if task in ("img2img", "inpaint") else None,
        mask=MASK if task == "inpaint" else None,
    )
    kwargs = variants.call_kwargs(pipe, req, req.seeds, None)
    if ip is not None:
        kwargs.update(ip_adapter.call_kwargs(ip, len(req.seeds)))
    with torch.inference_mode():
        images = pipe(**kwargs).images
    return hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()


def on(base: Any, models: Path, family: str, task: str, scale: float, **kw: Any) -> str:
    """One job with the tiny IP-Adapter at ``scale``, applied and reset as the engine does."""
    pipe = variant(base, task)
    try:
        ip_adapter.apply(
            pipe,
            str(models / "ip" / family),
            weight_name=kw.pop("weight_name", WEIGHT_NAME),
            image_encoder=kw.pop("image_encoder", "image_encoder"),
            scale=scale,
            dtype=DTYPES[family],
        )
        return run(base, family, task, ip=REFERENCE, **kw)
    finally:
        ip_adapter.reset(pipe)


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_reference_image_changes_the_pixels_and_reset_restores_them(
    models: Path, bases: dict[str, Any], clean: dict[str, Any], family: str, task: str
) -> None:
    plain = run(clean[family], family, task)
    full = on(bases[family], models, family, task, 1.0)
    assert full != plain
    assert on(bases[family], models, family, task, 1.0) == full  # kept loaded: the same bytes again
    assert run(bases[family], family, task) == plain  # the next plain job: a clean run's bytes


def test_scales_differ_and_each_repeats(models: Path, bases: dict[str, Any], clean: dict[str, Any]) -> None:
    plain = run(clean["sd15"], "sd15", "txt2img")
    half = on(bases["sd15"], models, "sd15", "txt2img", 0.5)
    full = on(bases["sd15"], models, "sd15", "txt2img", 1.0)
    assert len({plain, half, full}) == 3
    assert on(bases["sd15"], models, "sd15", "txt2img", 0.5) == half
    assert on(bases["sd15"], models, "sd15", "txt2img", 2.0) not in (plain, half, full)


def test_scale_zero_gives_the_plain_bytes_but_is_no_reset(
    models: Path, bases: dict[str, Any], clean: dict[str, Any]
) -> None:
    """At scale 0 diffusers' processors skip the image tokens: the plain bytes, reference or not.
    But the UNet still expects image embeddings, so a plain call fails until reset restores it."""
    plain = run(clean["sd15"], "sd15", "txt2img")
    assert on(bases["sd15"], models, "sd15", "txt2img", 0.0) == plain
    pipe = variant(bases["sd15"], "txt2img")
    folder = str(models / "ip" / "sd15")
    ip_adapter.apply(
        pipe, folder, weight_name=WEIGHT_NAME, image_encoder=None, scale=0.0, dtype=torch.float32
    )
    try:
        # The UNet's forward tests for image_embeds in added_cond_kwargs, None in a plain call.
        with pytest.raises(TypeError, match="not iterable"):
            run(bases["sd15"], "sd15", "txt2img")
    finally:
        ip_adapter.reset(pipe)
    assert run(bases["sd15"], "sd15", "txt2img") == plain


def test_applied_on_one_variant_then_off_on_every_variant(
    models: Path, bases: dict[str, Any], clean: dict[str, Any]
) -> None:
    base = bases["sd15"]
    plains = {task: run(clean["sd15"], "sd15", task) for task in ("txt2img", "img2img", "inpaint")}
    img2img = variant(base, "img2img")
    assert on(base, models, "sd15", "img2img", 1.0) != plains["img2img"]
    for task, plain in plains.items():  # variants made before and after, all sharing the UNet
        assert run(base, "sd15", task) == plain, task
    assert img2img.image_encoder is None and img2img.feature_extractor is None  # its own, put back
    fresh = load(models, "sd15")  # the adapter's bytes do not depend on what the pipeline ran before
    assert on(base, models, "sd15", "txt2img", 1.0) == on(fresh, models, "sd15", "txt2img", 1.0)
    assert run(base, "sd15", "img2img") == plains["img2img"]


def test_adapter_and_encoder_load_once_per_denoiser(models: Path, bases: dict[str, Any]) -> None:
    base = bases["sdxl"]
    on(base, models, "sdxl", "txt2img", 1.0)
    state = base.unet._ip_adapter_state
    [adapter] = state.adapters.values()
    [encoder] = state.encoders.values()
    on(base, models, "sdxl", "img2img", 0.7)  # another variant: the same modules swapped back in
    assert list(state.adapters.values()) == [adapter] and list(state.encoders.values()) == [encoder]
    assert not any(hasattr(p, "to_k_ip") for p in base.unet.attn_processors.values())  # and out again
    assert all(p.scale == [0.7] for p in adapter.processors.values())


def test_a_loaded_encoder_gives_the_bytes_of_its_folder(models: Path, bases: dict[str, Any]) -> None:
    folder = models / "ip" / "sd15"
    encoder = ip_adapter.load_image_encoder(folder / "image_encoder", "cpu", torch.float32)
    by_path = on(bases["sd15"], models, "sd15", "txt2img", 1.0, image_encoder=str(folder / "image_encoder"))
    assert on(bases["sd15"], models, "sd15", "txt2img", 1.0, image_encoder=encoder) == by_path


def test_a_seed_gives_the_same_image_alone_or_in_a_batch(models: Path, bases: dict[str, Any]) -> None:
    """One reference embedding repeated for every image of the call: image i depends on seed i only."""
    pipe = variant(bases["sd15"], "txt2img")
    folder = str(models / "ip" / "sd15")
    ip_adapter.apply(
        pipe, folder, weight_name=WEIGHT_NAME, image_encoder=None, scale=1.0, dtype=torch.float32
    )
    try:
        images = {}
        for seeds in ([5], [6], [5, 6]):
            req = tiny_request("sd15", seeds=seeds)
            kwargs = variants.call_kwargs(pipe, req, seeds, None) | ip_adapter.call_kwargs(
                REFERENCE, len(seeds)
            )
            with torch.inference_mode():
                images[tuple(seeds)] = [im.tobytes() for im in pipe(**kwargs).images]
    finally:
        ip_adapter.reset(pipe)
    assert images[(5, 6)] == images[(5,)] + images[(6,)]


def test_flux_reference_image_and_reset(models: Path, bases: dict[str, Any], clean: dict[str, Any]) -> None:
    plain = run(clean["flux"], "flux", "txt2img")
    full = on(bases["flux"], models, "flux", "txt2img", 1.0)
    assert full != plain and on(bases["flux"], models, "flux", "txt2img", 1.0) == full
    assert run(bases["flux"], "flux", "txt2img") == plain
    assert on(bases["flux"], models, "flux", "img2img", 1.0) != run(clean["flux"], "flux", "img2img")
    assert run(bases["flux"], "flux", "img2img") == run(clean["flux"], "flux", "img2img")
    assert not hasattr(bases["flux"].transformer, "encoder_hid_proj")  # as FLUX had it: none at all


def test_weights_that_do_not_load_fail_the_job_and_leave_the_pipeline_clean(
    models: Path, bases: dict[str, Any], clean: dict[str, Any]
) -> None:
    with pytest.raises(ModelError) as exc:
        on(bases["sd15"], models, "sd15", "txt2img", 1.0, weight_name="missing.safetensors")
    assert "missing.safetensors" in exc.value.message and "Traceback" not in exc.value.message
    with pytest.raises(ModelError):
        on(bases["sd15"], models, "sd15", "txt2img", 1.0, image_encoder="nowhere")
    assert run(bases["sd15"], "sd15", "txt2img") == run(clean["sd15"], "sd15", "txt2img")


def test_with_a_lora_on_the_same_unet(models: Path, clean: dict[str, Any]) -> None:
    """A job with a LoRA and an IP-Adapter: both act, and after both resets the UNet is the base."""
    pipe = load(models, "sd15")
    ip_only = on(pipe, models, "sd15", "txt2img", 1.0)
    pipe.load_lora_weights(str(models / "loras" / "sd15-style"), adapter_name="style")
    lora_only = run(pipe, "sd15", "txt2img")
    both = on(pipe, models, "sd15", "txt2img", 1.0)
    pipe.disable_lora()
    assert len({ip_only, lora_only, both}) == 3
    assert run(pipe, "sd15", "txt2img") == run(clean["sd15"], "sd15", "txt2img")


def test_the_builder_writes_the_same_bytes_each_time(models: Path, tmp_path: Path) -> None:
    again = build_ip_adapter(models / "sd15", tmp_path / "again")
    for name in (WEIGHT_NAME, "image_encoder/model.safetensors", "image_encoder/preprocessor_config.json"):
        assert (again / name).read_bytes() == (models / "ip" / "sd15" / name).read_bytes(), name
    other = build_ip_adapter(models / "sd15", tmp_path / "other", seed=31)
    assert (other / WEIGHT_NAME).read_bytes() != (again / WEIGHT_NAME).read_bytes()

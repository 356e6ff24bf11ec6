"""ControlNets on tiny real pipelines, called the way the engine calls them: ``variants.call_kwargs``
for the request, then ``control.control_kwargs`` for the ControlNets.

Covered: every preprocessor on SD 1.5 and SDXL for txt2img, img2img and inpaint; two ControlNets at
once; scale 0 (and a window outside every step) equal to the plain pipeline bit for bit; the window
changing the output; FLUX ControlNets; the compositions diffusers has no pipeline for."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.engine import control, preprocess, variants
from inference_server.engine.runner import GenerationRequest
from inference_server.engine.tiny import build_tiny_models
from inference_server.engine.tiny.control import build_controlnet, build_depth_estimator, build_pose_estimator
from inference_server.errors import InvalidRequest
from tests.support.engine import tiny_request

torch.set_num_threads(1)

# The registry defaults of the tiny families (the API fills them in before the engine sees a job).
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "flux": 3.5}
DTYPE = {"sd15": torch.float32, "sdxl": torch.float32, "flux": torch.bfloat16}
TASKS = ("txt2img", "img2img", "inpaint")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("control")
    build_tiny_models(root, ["sd15", "sdxl", "flux"])
    for family in GUIDANCE:
        build_controlnet(root / family, root / f"cn-{family}-a", seed=11)
        build_controlnet(root / family, root / f"cn-{family}-b", seed=12)
    build_depth_estimator(root / "depth", seed=13)
    build_pose_estimator(root / "pose", seed=14)
    return root


@pytest.fixture(scope="module")
def bases(root: Path) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    return {f: DiffusionPipeline.from_pretrained(str(root / f), dtype=DTYPE[f]) for f in GUIDANCE}


@pytest.fixture(scope="module")
def nets(root: Path) -> dict[str, Any]:
    return {
        f"{family}-{tag}": control.load_controlnet(str(root / f"cn-{family}-{tag}"), DTYPE[family])
        for family in GUIDANCE
        for tag in "ab"
    }


@pytest.fixture(scope="module")
def preprocessors(root: Path) -> dict[str, Any]:
    return {
        kind: preprocess.load_preprocessor(kind, str(root / kind), "cpu") for kind in preprocess.MODEL_KINDS
    }


def source() -> Image.Image:
    image = Image.new("RGB", (64, 64), (200, 40, 30))
    image.paste((20, 90, 200), (0, 0, 32, 64))
    image.paste((240, 240, 240), (20, 12, 44, 40))
    return image


def request(family: str, task: str, seeds: list[int]) -> GenerationRequest:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return tiny_request(
        family,
        task,
        seeds=seeds,
        guidance_scale=GUIDANCE[family],
        strength=None,
        image=source() if task != "txt2img" else None,
        mask=mask if task == "inpaint" else None,
    )


def control_image(kind: str, preprocessors: dict[str, Any]) -> Image.Image:
    return preprocess.preprocess(kind, preprocessors.get(kind), source(), 64, 64)


def run_plain(base: Any, req: GenerationRequest) -> list[str]:
    pipe = variants.variant(base, req.task)
    return digest(pipe(**variants.call_kwargs(pipe, req, req.seeds, None)).images)


def run_control(
    base: Any, req: GenerationRequest, controlnets: list[Any], controls: list[control.ControlInput]
) -> list[str]:
    pipe = control.control_pipeline(base, req.task, controlnets)
    kwargs = variants.call_kwargs(pipe, req, req.seeds, None)
    kwargs.update(control.control_kwargs(pipe, req.task, controls, len(req.seeds)))
    images = pipe(**kwargs).images
    assert [im.size for im in images] == [(req.width, req.height)] * len(req.seeds)
    return digest(images)


def digest(images: list[Image.Image]) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def test_load_controlnet_gives_the_class_of_the_folder(nets: dict[str, Any]) -> None:
    assert type(nets["sd15-a"]).__name__ == "ControlNetModel"
    assert type(nets["sdxl-a"]).__name__ == "ControlNetModel"
    assert nets["sdxl-a"].config.addition_embed_type == "text_time"
    assert type(nets["flux-a"]).__name__ == "FluxControlNetModel"
    assert nets["flux-a"].dtype == torch.bfloat16


def test_a_folder_without_a_controlnet_is_refused(root: Path) -> None:
    with pytest.raises(InvalidRequest) as refused:
        control.load_controlnet(str(root / "sd15" / "unet"), torch.float32)
    assert refused.value.code == "unsupported_composition"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", TASKS)
def test_every_preprocessor_steers_the_image(
    family: str, task: str, bases: dict, nets: dict, preprocessors: dict
) -> None:
    req = request(family, task, [3])
    plain = run_plain(bases[family], req)
    outputs = {}
    for kind in preprocess.KINDS:
        controls = [control.ControlInput(control_image(kind, preprocessors), scale=1.0)]
        outputs[kind] = run_control(bases[family], req, [nets[f"{family}-a"]], controls)
        assert outputs[kind] != plain, kind
    # Each control image gives its own picture, and the same one on a second run.
    assert len({tuple(v) for v in outputs.values()}) == len(preprocess.KINDS)
    again = run_control(
        bases[family],
        req,
        [nets[f"{family}-a"]],
        [control.ControlInput(control_image("pose", preprocessors))],
    )
    assert again == outputs["pose"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", TASKS)
def test_scale_zero_equals_the_plain_pipeline_bit_for_bit(
    family: str, task: str, bases: dict, nets: dict, preprocessors: dict
) -> None:
    req = request(family, task, [5, 6])
    plain = run_plain(bases[family], req)
    depth = control_image("depth", preprocessors)
    one = run_control(bases[family], req, [nets[f"{family}-a"]], [control.ControlInput(depth, scale=0.0)])
    two = run_control(
        bases[family],
        req,
        [nets[f"{family}-a"], nets[f"{family}-b"]],
        [
            control.ControlInput(depth, scale=0.0),
            control.ControlInput(control_image("canny", preprocessors), 0.0),
        ],
    )
    assert one == plain
    assert two == plain


def test_two_controlnets_at_once_differ_from_each_alone(bases: dict, nets: dict, preprocessors: dict) -> None:
    req = request("sd15", "img2img", [7, 8])
    depth = control.ControlInput(control_image("depth", preprocessors), scale=1.0)
    pose = control.ControlInput(control_image("pose", preprocessors), scale=1.0)
    both = run_control(bases["sd15"], req, [nets["sd15-a"], nets["sd15-b"]], [depth, pose])
    depth_only = run_control(bases["sd15"], req, [nets["sd15-a"]], [depth])
    pose_only = run_control(bases["sd15"], req, [nets["sd15-b"]], [pose])
    assert both != depth_only and both != pose_only
    # One of the two at scale 0 is the other alone, bit for bit: the residuals add.
    muted = run_control(
        bases["sd15"],
        req,
        [nets["sd15-a"], nets["sd15-b"]],
        [depth, control.ControlInput(pose.image, scale=0.0)],
    )
    assert muted == depth_only


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_start_end_window_changes_the_output(
    family: str, bases: dict, nets: dict, preprocessors: dict
) -> None:
    req = request(family, "txt2img", [9])
    canny = control_image("canny", preprocessors)
    net = [nets[f"{family}-a"]]
    whole = run_control(bases[family], req, net, [control.ControlInput(canny, 1.0, 0.0, 1.0)])
    first = run_control(bases[family], req, net, [control.ControlInput(canny, 1.0, 0.0, 0.5)])
    last = run_control(bases[family], req, net, [control.ControlInput(canny, 1.0, 0.5, 1.0)])
    assert len({tuple(whole), tuple(first), tuple(last)}) == 3
    # A window narrower than one of the 3 steps acts on none of them: the plain pipeline's image.
    assert run_control(bases[family], req, net, [control.ControlInput(canny, 1.0, 0.0, 0.1)]) == run_plain(
        bases[family], req
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", TASKS)
def test_a_seed_gives_the_same_controlled_image_alone_or_in_a_batch(
    family: str, task: str, bases: dict, nets: dict, preprocessors: dict
) -> None:
    # The control image draws nothing from the generators: image i's noise comes from seed i alone.
    # Batched convolutions round differently from single ones on CPU (the plain pipeline shows the
    # same): a level here and there, where noise from another generator would change every pixel.
    controls = [control.ControlInput(control_image("depth", preprocessors), scale=0.7)]
    pipe = control.control_pipeline(bases[family], task, [nets[f"{family}-a"]])

    def images(seeds: list[int]) -> list[np.ndarray]:
        req = request(family, task, seeds)
        kwargs = variants.call_kwargs(pipe, req, seeds, None)
        kwargs.update(control.control_kwargs(pipe, task, controls, len(seeds)))
        return [np.asarray(im).astype(int) for im in pipe(**kwargs).images]

    batch, alone, other = images([21, 22])[1], images([22])[0], images([23])[0]
    assert np.abs(batch - alone).max() <= 1
    assert (batch != alone).mean() < 0.001
    assert (other != alone).mean() > 0.5


@pytest.mark.parametrize("task", TASKS)
def test_flux_controlnets_run_and_steer(task: str, bases: dict, nets: dict, preprocessors: dict) -> None:
    req = request("flux", task, [4, 5])
    depth = control_image("depth", preprocessors)
    low = run_control(bases["flux"], req, [nets["flux-a"]], [control.ControlInput(depth, scale=0.0)])
    high = run_control(bases["flux"], req, [nets["flux-a"]], [control.ControlInput(depth, scale=1.0)])
    assert low != high
    # FLUX samples the control image's latents from the generators before the noise: even scale 0
    # is not the plain pipeline's image (see engine/control.py).
    two = run_control(
        bases["flux"],
        req,
        [nets["flux-a"], nets["flux-b"]],
        [control.ControlInput(depth, 1.0), control.ControlInput(control_image("canny", preprocessors), 1.0)],
    )
    assert two != high


def test_compositions_without_a_pipeline_are_refused(bases: dict, nets: dict) -> None:
    with pytest.raises(InvalidRequest) as refused:
        control.control_pipeline(bases["sd15"], "edit", [nets["sd15-a"]])
    assert refused.value.code == "unsupported_composition"
    pipe = control.control_pipeline(bases["sd15"], "txt2img", [nets["sd15-a"]])
    with pytest.raises(InvalidRequest):
        control.control_kwargs(
            pipe, "txt2img", [control.ControlInput(Image.new("RGB", (64, 64)), 1.0, 0.6, 0.4)], 1
        )


def test_tiny_builders_write_the_same_bytes_whatever_the_rng_state(root: Path, tmp_path: Path) -> None:
    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    for i, rng in enumerate((1, 2)):
        torch.manual_seed(rng)
        build_controlnet(root / "sd15", tmp_path / f"cn-{i}", seed=11)
        build_controlnet(root / "flux", tmp_path / f"flux-{i}", seed=11)
        build_pose_estimator(tmp_path / f"pose-{i}", seed=14)
    for name in ("cn", "flux", "pose"):
        assert files(tmp_path / f"{name}-0") == files(tmp_path / f"{name}-1")
    assert files(tmp_path / "cn-0") == files(root / "cn-sd15-a")

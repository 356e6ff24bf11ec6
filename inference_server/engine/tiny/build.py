"""``build_tiny_models``: write small random-weight models of every family and a registry for them.

The result is deterministic (every component is seeded) and fast (seconds per family), ready for
``MODELS_FILE=DIR/models.toml``: what tests, CI and a first try on a laptop run on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl", "flux", "qwen-image-edit")

# Limits allow 64 px so tests stay fast; defaults are small for the same reason.
_FAMILY_TOML: dict[str, dict[str, Any]] = {
    "sd15": dict(
        tasks=["txt2img", "img2img", "inpaint"],
        size_multiple=8,
        defaults="{ width = 64, height = 64, steps = 4, guidance_scale = 7.5, strength = 0.75 }",
    ),
    "sdxl": dict(
        tasks=["txt2img", "img2img", "inpaint"],
        size_multiple=8,
        defaults="{ width = 64, height = 64, steps = 4, guidance_scale = 5.0, strength = 0.75 }",
    ),
    "flux": dict(
        tasks=["txt2img", "img2img"],
        size_multiple=16,
        defaults="{ width = 64, height = 64, steps = 4, guidance_scale = 3.5, strength = 0.75 }",
        strength_steps="ceil",
    ),
    "qwen-image-edit": dict(
        tasks=["edit"],
        size_multiple=16,
        defaults="{ width = 64, height = 64, steps = 4, guidance_scale = 4.0 }",
    ),
}


# The ControlNets of each family, by the preprocessing their control images get.
_CONTROLNETS = {"sd15": ("canny", "depth", "pose"), "sdxl": ("canny", "depth", "pose"), "flux": ("canny",)}
_ROUTE_WORDS = {"pose": ["pose", "posture", "stance"], "depth": ["depth", "layout"]}

# Known verdicts for tests and a first try: sd15's checker flags every image, sdxl's none.
_SAFETY_CHECKERS = {"sd15": "tiny-strict", "sdxl": "tiny-safety"}


def build_tiny_models(dir: Path, families: list[str] | None = None) -> Path:
    """Write tiny models of ``families`` (default: all) under ``dir``; return ``dir/models.toml``."""
    import torch

    from inference_server.engine.tiny import flux, loras, qwen, sd

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    wanted = list(families or FAMILIES)
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown tiny families: {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast and never fights other processes
    sections: list[str] = []
    try:
        for family in wanted:
            started = time.perf_counter()
            models: list[dict] = []
            lora_names: list[str] = []
            if family == "sd15":
                sd.build_sd15(dir / "sd15")
                sd.build_sd15(dir / "sd15-inpaint", seed=10, inpaint_unet=True)
                models = [
                    dict(id="tiny-sd15", source="sd15", default=True, dtype="float32", memory_gb=0.01),
                    dict(
                        id="tiny-sd15-inpaint",
                        source="sd15-inpaint",
                        dtype="float32",
                        memory_gb=0.01,
                        tasks=["inpaint"],
                    ),
                ]
                loras.build_lora(dir / "sd15", dir / "loras" / "sd15-style")
                lora_names = ["tiny-style"]
            elif family == "sdxl":
                sd.build_sdxl(dir / "sdxl")
                models = [dict(id="tiny-sdxl", source="sdxl", default=True, dtype="float32", memory_gb=0.01)]
            elif family == "flux":
                flux.build_flux(dir / "flux")
                models = [dict(id="tiny-flux", source="flux", default=True, dtype="bfloat16", memory_gb=0.01)]
                loras.build_lora(dir / "flux", dir / "loras" / "flux-style")
                lora_names = ["tiny-style"]
                models += _df11_twin(dir, "flux", "tiny-flux-df11")
            elif family == "qwen-image-edit":
                qwen.build_qwen_edit(dir / "qwen-image-edit")
                models = [
                    dict(
                        id="tiny-qwen-image-edit",
                        source="qwen-image-edit",
                        default=True,
                        dtype="bfloat16",
                        memory_gb=0.01,
                    )
                ]
                loras.build_lora(dir / "qwen-image-edit", dir / "loras" / "qwen-image-edit-style")
                lora_names = ["tiny-style"]
                models += _df11_twin(dir, "qwen-image-edit", "tiny-qwen-image-edit-df11")
            composition = _composition(dir, family)
            sections.append(_family_toml(family, models, lora_names, composition))
            log.info("tiny %s written in %.1f s", family, time.perf_counter() - started)
        started = time.perf_counter()
        sections.append(_tools(dir))
        log.info("tiny tools written in %.1f s", time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    toml = dir / "models.toml"
    header = "# Tiny random-weight models written by `inference-server models tiny`. Paths are relative.\n"
    toml.write_text(header + "\n".join(sections), encoding="utf-8")
    return toml


def _tools(dir: Path) -> str:
    """The components every family shares (registry/composition.py): the mask detector and SAM,
    and two safety checkers whose verdicts are known (random weights would make them arbitrary):
    ``tiny-safety`` flags nothing, ``tiny-strict`` flags every image."""
    from inference_server.engine.tiny import vision
    from inference_server.engine.tiny.control import build_depth_estimator, build_pose_estimator

    build_depth_estimator(dir / "tools" / "depth", seed=310)
    build_pose_estimator(dir / "tools" / "pose", seed=311)
    vision.build_detector(dir / "tools" / "detector", seed=300)
    vision.build_segmenter(dir / "tools" / "segmenter", seed=301)
    vision.build_safety_checker(dir / "tools" / "safety", seed=302)
    vision.build_safety_checker(dir / "tools" / "safety-strict", seed=302, flags_everything=True)
    return "\n".join(
        [
            "# Shared by every family. The tiny detector's scores are small and arbitrary: a threshold",
            "# of 0 keeps its boxes, so a mask_prompt always finds something here (mask_threshold: 1",
            "# finds nothing).",
            "[preprocessors]",
            'depth = { source = "tools/depth" }',
            'pose = { source = "tools/pose" }',
            "",
            "[detector]",
            'source = "tools/detector"',
            'segmenter = "tools/segmenter"',
            "threshold = 0.0",
            "",
            "[safety_checkers.tiny-safety]",
            'source = "tools/safety"',
            "",
            "[safety_checkers.tiny-strict]",
            'source = "tools/safety-strict"',
            "",
        ]
    )


def _df11_twin(dir: Path, folder: str, model_id: str) -> list[dict]:
    """Compress the BF16 transformer of ``dir/folder`` to DFloat11 and register a twin model using it."""
    compress = _df11_compressor()
    if compress is None:
        log.warning("inference_server.engine.df11 is not available: no DFloat11 twin of %s", folder)
        return []
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(dir / folder))
    import diffusers
    import torch

    cls = getattr(diffusers, index["transformer"][1])
    transformer = cls.from_pretrained(str(dir / folder), subfolder="transformer", dtype=torch.bfloat16)
    # The config records where it was loaded from; a relative name keeps the twin's bytes deterministic.
    transformer.register_to_config(_name_or_path=f"{folder}/transformer")
    compress(transformer, dir / f"{folder}-df11")
    return [dict(id=model_id, source=folder, df11=f"{folder}-df11", dtype="bfloat16", memory_gb=0.01)]


def _df11_compressor() -> Callable | None:
    try:
        from inference_server.engine.df11 import compress_transformer
    except ImportError:
        return None
    return compress_transformer


def _composition(dir: Path, family: str) -> dict[str, list[dict]]:
    """The family's IP-Adapters and ControlNets (with the tables they need), built for its tiny
    pipeline: ``{table: [entry, ...]}`` for ``_family_toml``."""
    from inference_server.engine.tiny.control import build_controlnet
    from inference_server.engine.tiny.ip_adapter import build_ip_adapter

    tables: dict[str, list[dict]] = {}
    if family not in _CONTROLNETS:
        return tables
    build_ip_adapter(dir / family, dir / "ip-adapters" / family, seed=30)
    tables["ip_adapters"] = [dict(name="tiny-ip", source=f"ip-adapters/{family}")]
    tables["controlnets"] = []
    for n, kind in enumerate(_CONTROLNETS[family]):
        build_controlnet(dir / family, dir / "controlnets" / f"{family}-{kind}", seed=40 + n)
        entry = dict(name=f"tiny-{kind}", source=f"controlnets/{family}-{kind}", preprocess=kind)
        tables["controlnets"].append(entry)
    # task "auto": a prompt naming a pose or a depth, with an input image, runs that ControlNet on it.
    tables["routes"] = [
        dict(words=words, controlnet=f"tiny-{kind}")
        for kind, words in _ROUTE_WORDS.items()
        if kind in _CONTROLNETS[family]
    ]
    return tables


def _family_toml(
    family: str, models: list[dict], lora_names: list[str], composition: dict[str, list[dict]] | None = None
) -> str:
    spec = _FAMILY_TOML[family]
    tasks = ", ".join(f'"{t}"' for t in spec["tasks"])
    lines = [
        f"[families.{_key(family)}]",
        f'queue = "jobs.{family}"',
        f"tasks = [{tasks}]",
        "limits = { min_size = 64, max_size = 512, max_steps = 50, "
        f"size_multiple = {spec['size_multiple']} }}",
        f"defaults = {spec['defaults']}",
        "# Cross-request batching, off here so each test job runs alone; max_batch = 4 lets a worker",
        "# run up to 4 images of compatible queued jobs in one call (docs/configuration.md).",
        "max_batch = 1",
        "batch_wait_ms = 10",
        "batch_max_pixels = 262144",
    ]
    if "strength_steps" in spec:
        lines.append(f'strength_steps = "{spec["strength_steps"]}"')
    if family in _SAFETY_CHECKERS:
        lines.append(f'safety_checker = "{_SAFETY_CHECKERS[family]}"')
    for m in models:
        lines.append(f"\n[[families.{_key(family)}.models]]")
        for k, v in m.items():
            lines.append(f"{k} = {_value(v)}")
    for name in lora_names:
        lines.append(f"\n[[families.{_key(family)}.loras]]")
        lines.append(f'name = "{name}"')
        lines.append(f'source = "loras/{family}-style"')
    for table, entries in (composition or {}).items():
        for entry in entries:
            lines.append(f"\n[[families.{_key(family)}.{table}]]")
            lines.extend(f"{k} = {_value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


def _key(family: str) -> str:
    return f'"{family}"' if "-" in family else family


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)

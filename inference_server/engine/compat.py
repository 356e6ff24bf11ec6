"""Workarounds for library gaps on machines without torchvision (CPU test hosts).

No CPU torchvision build installs beside torch 2.13 there; without it, transformers cannot build the
Qwen2-VL processor's video processor, and the Qwen edit pipelines load that processor. Limiting the
processor to its image processor and tokenizer makes build, save, load and inference work; the
video path is never used by image editing.
"""

from __future__ import annotations

import importlib.util

_done = False


def has_torchvision() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # present but broken (a build that does not match torch)
        return False
    return True


def qwen_processor_without_video() -> None:
    """Drop ``video_processor`` from the Qwen2-VL processors' attributes when torchvision is unusable."""
    global _done
    if _done or has_torchvision():
        _done = True
        return
    from transformers import Qwen2VLProcessor

    classes: list[type] = [Qwen2VLProcessor]
    try:
        from transformers import Qwen2_5_VLProcessor

        classes.append(Qwen2_5_VLProcessor)
    except ImportError:
        pass
    for cls in classes:
        original = cls.get_attributes.__func__  # type: ignore[attr-defined]

        def get_attributes(klass, _original=original):
            return [a for a in _original(klass) if a != "video_processor"]

        cls.get_attributes = classmethod(get_attributes)  # type: ignore[method-assign,assignment]
    _done = True

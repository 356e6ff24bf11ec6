"""The registry's composition tables: a family's ControlNets, IP-Adapters and routing rules, and the
tools every family shares (preprocessors, the mask detector, safety checkers).

File format (paths relative to the file, like models)::

    [families.sd15]
    safety_checker = "default"          # optional: the checker of `safety: flag|block` jobs

    [[families.sd15.controlnets]]
    name = "depth"
    source = "controlnets/sd15-depth"
    preprocess = "depth"                # what its control images are: the default `preprocess`

    [[families.sd15.ip_adapters]]
    name = "plus"
    source = "ip-adapters/sd15"
    weight_name = "ip-adapter.safetensors"
    image_encoder = "ip-adapters/sd15/image_encoder"   # optional: <source>/image_encoder

    [[families.sd15.routes]]            # task "auto": a prompt naming one of these words, with an
    words = ["pose", "posture"]         # input image, runs through this ControlNet on that image
    controlnet = "pose"

    [preprocessors]
    depth = { source = "preprocessors/depth" }   # canny and none need no model
    pose = { source = "preprocessors/pose" }

    [detector]                          # what `mask_prompt` runs: boxes, then SAM's masks
    source = "detectors/owlv2"
    segmenter = "detectors/sam"         # optional: boxes are filled without it
    threshold = 0.1

    [safety_checkers.default]
    source = "safety/default"
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr

from inference_server.jobs.spec import Preprocess

PREPROCESSES = get_args(Preprocess)
MODEL_PREPROCESSES = ("depth", "pose")  # the ones that run a model from the registry

Text = Annotated[StrictStr, Field(min_length=1)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlNetEntry(_Entry):
    """A ControlNet registered for a family."""

    name: Text
    source: Text
    preprocess: Preprocess = "none"


class IpAdapterEntry(_Entry):
    """An IP-Adapter registered for a family, with the image encoder it was trained with."""

    name: Text
    source: Text
    weight_name: Text = "ip-adapter.safetensors"
    subfolder: StrictStr = ""
    image_encoder: Text | None = None  # None: the folder image_encoder inside source


class RouteRule(_Entry):
    """A routing rule of ``task: "auto"``: a prompt holding one of ``words`` (whole words, any case)
    and an input image make a ControlNet job on that image."""

    words: Annotated[list[Text], Field(min_length=1)]
    controlnet: Text
    preprocess: Preprocess | None = None  # None: the ControlNet's own
    scale: Annotated[StrictFloat, Field(ge=0, le=2)] = 1.0


class ToolSource(_Entry):
    source: Text


class DetectorEntry(_Entry):
    """The open-vocabulary detector behind ``mask_prompt``, and optionally SAM to refine its boxes."""

    source: Text
    segmenter: Text | None = None
    threshold: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.1


class Tools(BaseModel):
    """What every family shares: preprocessors, the detector, safety checkers (by name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocessors: dict[Literal["depth", "pose"], ToolSource] = Field(default_factory=dict)
    detector: DetectorEntry | None = None
    safety_checkers: dict[Text, ToolSource] = Field(default_factory=dict)

    def preprocess_kinds(self) -> list[str]:
        """The ``preprocess`` values a job may use here: canny and none always, the others when
        their model is registered."""
        return ["none", "canny", *(k for k in MODEL_PREPROCESSES if k in self.preprocessors)]

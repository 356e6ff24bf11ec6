"""LoRA on DFloat11 weights.

peft (through diffusers' ``load_lora_weights`` / ``load_lora_adapter``) reads each target
Linear's ``weight`` for its shape, device and dtype while it injects an adapter; a DF11 Linear
has no ``weight`` until its block's decode hook runs, so loading fails (dfloat11 upstream issues
#10 and #31). ``lora_placeholders`` lends every weight-less Linear a zero-stride tensor of the
right shape and dtype (one element of memory each) for the duration, then takes it back. The
adapter's forward adds ``lora_B(lora_A(x))`` to the base Linear's output, which the decode hook
still feeds with the exact BF16 weights, so the result equals BF16 + LoRA bit for bit.

``fuse_lora()`` cannot work on DF11 weights (the next decode overwrites a fused weight): keep
adapters unfused, or decode with ``load_df11(..., mode="eager")`` first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_MISSING = object()


@contextmanager
def lora_placeholders(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While the block runs, every Linear without a ``weight`` parameter (a DF11-covered one)
    has a zero-stride BF16 placeholder of shape (out_features, in_features); on exit each gets
    back what it had before (nothing, or the view its last decode left)."""
    fallback = next((p.device for p in model.parameters()), torch.device("cpu"))
    lent: list[tuple[torch.nn.Linear, object]] = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module._parameters.get("weight") is not None:
            continue
        previous = module.__dict__.get("weight", _MISSING)
        device = module.bias.device if module.bias is not None else fallback
        module._parameters.pop("weight", None)
        module.__dict__["weight"] = torch.zeros((), dtype=torch.bfloat16, device=device).expand(
            module.out_features, module.in_features
        )
        lent.append((module, previous))
    try:
        yield model
    finally:
        for module, previous in lent:
            if previous is _MISSING:
                module.__dict__.pop("weight", None)
            else:
                module.__dict__["weight"] = previous


def is_df11(model: torch.nn.Module) -> bool:
    """True when some block of ``model`` holds DF11 tensors (our loader or the dfloat11 package)."""
    return any("encoded_exponent" in m._buffers or hasattr(m, "offloaded_tensors") for m in model.modules())

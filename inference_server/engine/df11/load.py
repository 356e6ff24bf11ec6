"""Install DFloat11 weights into a BF16-architecture model, on any device.

On CUDA the ``dfloat11`` package does it (imported here only: it builds its kernel with cupy at
import). Elsewhere our numpy decoder does, in the same shape as upstream: each compressed block
keeps its DF11 tensors as buffers, its covered Linears lose their ``weight`` parameter, and a
forward pre-hook decodes the block into one buffer shared per device, then points each Linear's
``weight`` at its slice. Only one block's BF16 weights exist at a time.

``mode="eager"`` instead decodes every block once at load into ordinary parameters: the model is
then a plain BF16 model (BF16 memory, no decode per step), useful when memory is not the limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from inference_server.engine.df11.decoder import BlockDecoder
from inference_server.engine.df11.format import (
    DF11FormatError,
    group_df11_tensors,
    read_config,
    split_df11_name,
    weight_files,
)

_CODED_FIELDS = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps")
MODES = ("per_block", "eager")


def load_df11(
    model: torch.nn.Module, df11_dir: Path, device: str, *, mode: str = "per_block"
) -> torch.nn.Module:
    """Install the DF11 weights of ``df11_dir`` into ``model`` and move it to ``device``.

    ``model`` has the BF16 architecture; its weights may be random or on the ``meta`` device
    (build it under ``accelerate.init_empty_weights()`` to never allocate the BF16 weights).
    ``device`` "cuda..." uses the dfloat11 package (``mode`` is ignored there); any other device
    uses our decoder, per block in a forward pre-hook (``"per_block"``, the default, DF11
    memory) or all at load (``"eager"``, BF16 memory, no decode cost per step).
    Every parameter must come from the folder: a missing one is an error, not a random weight.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    target = torch.device(device)
    if target.type == "cuda":
        return _load_with_dfloat11(model, Path(df11_dir), target)
    config, _ = read_config(Path(df11_dir))
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(df11_dir)):
        tensors.update(load_file(str(path)))

    state = model.state_dict(keep_vars=True)
    groups = group_df11_tensors([k for k in tensors if k not in state])
    stray = [k for k in tensors if k not in state and split_df11_name(k) is None]
    if stray:
        raise DF11FormatError(f"tensors the model does not have: {stray[:5]}")

    covered: set[str] = set()
    max_elements = 0
    for module_name, fields in groups.items():
        attrs = config.matches(module_name)
        if attrs is None:
            raise DF11FormatError(f"{module_name} holds DF11 tensors but matches no pattern_dict entry")
        module = model.get_submodule(module_name)
        linears = resolve_targets(module, module_name, attrs)
        coded = {f: tensors[fields[f]] for f in _CODED_FIELDS}
        splits = [int(s) for s in tensors[fields["split_positions"]].tolist()]
        sizes = [lin.out_features * lin.in_features for _, lin in linears]
        if coded["sign_mantissa"].numel() != sum(sizes) or splits != np.cumsum(sizes)[:-1].tolist():
            raise DF11FormatError(f"{module_name}: DF11 sizes do not fit the model's Linear layers")
        prefix = f"{module_name}." if module_name else ""
        covered.update(f"{prefix}{p}.weight" if p else f"{prefix}weight" for p, _ in linears)
        max_elements = max(max_elements, sum(sizes))
        if mode == "eager":
            _install_decoded(linears, coded, splits)
        else:
            _install_per_block(module, linears, coded, splits)

    missing = [k for k in state if k not in tensors and k not in covered]
    if missing:
        raise DF11FormatError(f"{df11_dir} lacks weights for {missing[:5]}")
    for key, value in tensors.items():
        if key in state:
            _assign(model, key, value)
    model.to(target)
    if mode == "per_block":
        DECODE_BUFFERS.reserve(target, max_elements)
    model._df11_max_elements = max_elements  # type: ignore[assignment]
    return model


def resolve_targets(
    module: torch.nn.Module, name: str, attrs: list[str]
) -> list[tuple[str, torch.nn.Linear]]:
    """(path, Linear) pairs whose weights a DF11 block holds, in pattern order; the matched module
    itself when it is a Linear (upstream's rule)."""
    if isinstance(module, torch.nn.Linear):
        return [("", module)]
    found = []
    for path in attrs:
        target = module.get_submodule(path)
        if not isinstance(target, torch.nn.Linear):
            raise DF11FormatError(f"{name}.{path} is {type(target).__name__}, not a Linear")
        found.append((path, target))
    return found


def df11_memory_bytes(model: torch.nn.Module, *, include_decode_buffer: bool = False) -> int:
    """Bytes held by ``model``: its parameters and buffers (DF11 tensors included), each storage
    counted once. Decoded weights of the running block live in the shared per-device buffer,
    counted only with ``include_decode_buffer`` (its size is the largest block, BF16)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    if include_decode_buffer:
        total += 2 * int(getattr(model, "_df11_max_elements", 0))
    return total


# ---------------------------------------------------------------------------------------------


class _DecodeBuffers:
    """One flat BF16 buffer per device that every DF11 block decodes into (as upstream's
    TensorManager). Every block decodes at each of its forwards, even if the buffer still holds
    it: peft's merge (``fuse_lora``) writes into the weight views, so a skipped decode could run
    on modified weights. Engines run one job per process; the lock only guards allocation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def reserve(self, device: torch.device, n_elements: int) -> torch.Tensor:
        device = _canonical(device)
        with self._lock:
            buf = self._buffers.get(device)
            if buf is None or buf.numel() < n_elements:
                buf = torch.empty(n_elements, dtype=torch.bfloat16, device=device)
                self._buffers[device] = buf
            return buf

    def nbytes(self) -> int:
        return sum(b.numel() * 2 for b in self._buffers.values())


DECODE_BUFFERS = _DecodeBuffers()


def _canonical(device: torch.device) -> torch.device:
    if device.type != "cpu" and device.index is None:
        return torch.device(device.type, 0)
    return torch.device("cpu") if device.type == "cpu" else device


@dataclass(eq=False)
class _BlockState:
    """What a block's decode hook needs: its Linears in pattern order, where to split the flat
    weights between them, and a cached decoder (keyed by the buffers' addresses)."""

    linears: list[torch.nn.Linear]
    splits: list[int]
    n_elements: int
    decoder: BlockDecoder | None = None
    decoder_key: tuple[int, ...] = field(default_factory=tuple)


def _install_per_block(
    module: torch.nn.Module,
    linears: list[tuple[str, torch.nn.Linear]],
    coded: dict[str, torch.Tensor],
    splits: list[int],
) -> None:
    for _, lin in linears:
        del lin.weight
    for name, tensor in coded.items():
        module.register_buffer(name, tensor)
    module.split_positions = splits  # type: ignore[assignment]
    state = _BlockState([lin for _, lin in linears], splits, int(coded["sign_mantissa"].numel()))
    module._df11_state = state  # type: ignore[assignment]
    module.register_forward_pre_hook(_decode_hook)


def _decode_hook(module: torch.nn.Module, _args: object) -> None:
    state: _BlockState = module._df11_state  # type: ignore[assignment]
    luts: torch.Tensor = module.luts  # type: ignore[assignment]
    device = _canonical(luts.device)
    buf = DECODE_BUFFERS.reserve(device, state.n_elements)
    decoder = _decoder_for(module, state)
    if device.type == "cpu":
        decoder.decode_into(buf.view(torch.int16).numpy())
    else:
        staging = decoder.decode().view(np.int16)
        buf[: state.n_elements].view(torch.int16).copy_(torch.from_numpy(staging))
    pieces = torch.tensor_split(buf[: state.n_elements], state.splits)
    for lin, piece in zip(state.linears, pieces, strict=True):
        lin.weight = piece.view(lin.out_features, lin.in_features)


def _decoder_for(module: torch.nn.Module, state: _BlockState) -> BlockDecoder:
    """The block's decoder. On the CPU it reads the buffers in place and is cached (rebuilt if
    the buffers move); elsewhere it works on host copies, which are not kept: keeping them would
    double the compressed memory."""
    tensors = [getattr(module, f) for f in _CODED_FIELDS]
    if tensors[0].device.type != "cpu":
        return BlockDecoder(*(t.detach().cpu().numpy() for t in tensors))
    key = tuple(t.data_ptr() for t in tensors)
    if state.decoder is None or state.decoder_key != key:
        state.decoder = BlockDecoder(*(t.detach().numpy() for t in tensors))
        state.decoder_key = key
    return state.decoder


def _install_decoded(
    linears: list[tuple[str, torch.nn.Linear]], coded: dict[str, torch.Tensor], splits: list[int]
) -> None:
    decoder = BlockDecoder(*(coded[f].numpy() for f in _CODED_FIELDS))
    flat = torch.from_numpy(decoder.decode().view(np.int16)).view(torch.bfloat16)
    for (_, lin), piece in zip(linears, torch.tensor_split(flat, splits), strict=True):
        lin.weight = torch.nn.Parameter(piece.view(lin.out_features, lin.in_features), requires_grad=False)


def _assign(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Put a plain tensor in place, keeping the model's dtype; replaces meta tensors too."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        assert old is not None
        if tuple(old.shape) != tuple(value.shape):
            raise DF11FormatError(f"{key}: shape {tuple(value.shape)} in file, {tuple(old.shape)} in model")
        module._parameters[leaf] = torch.nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
    else:
        old_buf = module._buffers[leaf]
        assert old_buf is not None
        if tuple(old_buf.shape) != tuple(value.shape):
            raise DF11FormatError(
                f"{key}: shape {tuple(value.shape)} in file, {tuple(old_buf.shape)} in model"
            )
        module._buffers[leaf] = value.to(old_buf.dtype)


def _load_with_dfloat11(model: torch.nn.Module, df11_dir: Path, device: torch.device) -> torch.nn.Module:
    from dfloat11 import DFloat11Model  # CUDA only: imports cupy and compiles its kernel

    prepare_for_dfloat11(model, df11_dir)
    return DFloat11Model.from_pretrained(str(df11_dir), device=str(device), bfloat16_model=model)


def prepare_for_dfloat11(model: torch.nn.Module, df11_dir: Path) -> None:
    """Make a model built on ``meta`` loadable by the dfloat11 package without ever holding its
    BF16 weights: upstream copies plain tensors into existing parameters (so those need real
    storage) and deletes each covered Linear's ``weight`` (so that one only needs to exist: a
    zero-stride placeholder costs one element). A model with real weights is left as it is."""
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return
    config, _ = read_config(Path(df11_dir))
    names: list[str] = []
    for path in weight_files(Path(df11_dir)):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    state = model.state_dict(keep_vars=True)
    for module_name in group_df11_tensors([k for k in names if k not in state]):
        attrs = config.matches(module_name)
        if attrs is None:
            continue
        for _, lin in resolve_targets(model.get_submodule(module_name), module_name, attrs):
            if lin.weight.is_meta:
                placeholder = torch.zeros((), dtype=lin.weight.dtype).expand(
                    lin.out_features, lin.in_features
                )
                lin.weight = torch.nn.Parameter(placeholder, requires_grad=False)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[key] = torch.nn.Parameter(
                    torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                )
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty_like(buf, device="cpu")

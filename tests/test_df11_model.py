"""DF11 on whole transformers: tiny FLUX and Qwen-Image built here (seeded, bfloat16), compressed,
loaded into a model with other random weights, and run. Outputs must equal the BF16 model's bit
for bit, with and without a LoRA adapter loaded under ``lora_placeholders``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from peft import LoraConfig

from inference_server.devtools.df11_models import FLUX_CONFIG, QWEN_CONFIG, seeded_transformer
from inference_server.engine.df11 import (
    DF11FormatError,
    compress_folder,
    compress_transformer,
    df11_memory_bytes,
    load_df11,
    lora_placeholders,
)

torch.set_num_threads(1)
LORA_FILE = "pytorch_lora_weights.safetensors"


def build(kind: str, seed: int) -> torch.nn.Module:
    """A tiny transformer with seeded N(0, 0.02) weights (like real checkpoints), in bfloat16."""
    if kind == "flux":
        return seeded_transformer(FluxTransformer2DModel, FLUX_CONFIG, seed)
    return seeded_transformer(QwenImageTransformer2DModel, QWEN_CONFIG, seed)


def run(kind: str, model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    bf16 = dict(dtype=torch.bfloat16)
    with torch.no_grad():
        if kind == "flux":
            return model(
                hidden_states=torch.randn(1, 16, 8, generator=g).to(**bf16),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g).to(**bf16),
                pooled_projections=torch.randn(1, 32, generator=g).to(**bf16),
                timestep=torch.tensor([0.5], dtype=torch.bfloat16),
                img_ids=torch.randint(0, 4, (16, 3), generator=g).float(),
                txt_ids=torch.zeros(6, 3),
                return_dict=False,
            )[0]
        return model(
            hidden_states=torch.randn(1, 16, 16, generator=g).to(**bf16),
            encoder_hidden_states=torch.randn(1, 6, 32, generator=g).to(**bf16),
            encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.long),
            timestep=torch.tensor([0.5], dtype=torch.bfloat16),
            img_shapes=[(1, 4, 4)],
            return_dict=False,
        )[0]


def lora_config(kind: str) -> LoraConfig:
    targets = (
        ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]
        if kind == "flux"
        else ["to_q", "to_k", "to_v", "img_mod.1"]
    )
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture(params=["flux", "qwen"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_df11_forward_is_bit_identical(kind: str, tmp_path: Path) -> None:
    reference = build(kind, seed=1)
    expected = run(kind, reference)
    compress_transformer(reference, tmp_path / "df11")

    for mode in ("per_block", "eager"):
        model = load_df11(build(kind, seed=2), tmp_path / "df11", "cpu", mode=mode)
        assert not same_bits(run(kind, build(kind, seed=2)), expected)  # the test can fail
        for _ in range(2):  # the second run decodes into the same shared buffer again
            assert same_bits(run(kind, model), expected), mode


def test_decoded_weights_equal_originals(kind: str, tmp_path: Path) -> None:
    reference = build(kind, seed=3)
    compress_transformer(reference, tmp_path / "df11")
    model = load_df11(build(kind, seed=4), tmp_path / "df11", "cpu", mode="eager")
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert same_bits(a, b), name


def test_meta_model_loads_without_bf16_weights(tmp_path: Path) -> None:
    from accelerate import init_empty_weights

    reference = build("flux", seed=5)
    expected = run("flux", reference)
    compress_transformer(reference, tmp_path / "df11")
    with init_empty_weights():
        empty = FluxTransformer2DModel(**FLUX_CONFIG).to(torch.bfloat16)
    model = load_df11(empty, tmp_path / "df11", "cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert same_bits(run("flux", model), expected)


def test_lora_on_df11_equals_bf16_plus_lora(kind: str, tmp_path: Path) -> None:
    reference = build(kind, seed=6)
    base_out = run(kind, reference)
    compress_transformer(reference, tmp_path / "df11")
    torch.manual_seed(11)
    reference.add_adapter(lora_config(kind), adapter_name="style")
    reference.save_lora_adapter(str(tmp_path / "lora"), adapter_name="style")
    expected = run(kind, reference)
    assert not same_bits(expected, base_out)

    model = load_df11(build(kind, seed=7), tmp_path / "df11", "cpu")
    run(kind, model)  # a forward first leaves decoded views behind; they must come back intact
    with lora_placeholders(model):
        model.load_lora_adapter(
            str(tmp_path / "lora"), weight_name=LORA_FILE, prefix=None, adapter_name="style"
        )
    assert same_bits(run(kind, model), expected)
    model.set_adapters(["style"], [0.0])
    assert same_bits(run(kind, model), base_out)


def test_lora_fails_without_placeholders(tmp_path: Path) -> None:
    """Documents why the placeholders exist: peft needs ``weight`` (upstream issues #10, #31)."""
    reference = build("flux", seed=8)
    compress_transformer(reference, tmp_path / "df11")
    torch.manual_seed(12)
    reference.add_adapter(lora_config("flux"), adapter_name="x")
    reference.save_lora_adapter(str(tmp_path / "lora"), adapter_name="x")
    model = load_df11(build("flux", seed=9), tmp_path / "df11", "cpu")
    with pytest.raises(AttributeError, match="weight"):
        model.load_lora_adapter(str(tmp_path / "lora"), weight_name=LORA_FILE, prefix=None, adapter_name="x")


def test_memory_ratio_of_a_realistic_stack(tmp_path: Path) -> None:
    """A FLUX with realistic widths (blocks dominate the parameters): DF11 / BF16 <= 0.72."""
    torch.manual_seed(0)
    config = dict(
        FLUX_CONFIG, attention_head_dim=64, num_attention_heads=4, num_layers=1, num_single_layers=2
    )
    reference = FluxTransformer2DModel(**config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    reference = reference.to(torch.bfloat16).eval()
    bf16_bytes = df11_memory_bytes(reference)
    compress_transformer(reference, tmp_path / "df11")
    model = load_df11(FluxTransformer2DModel(**config).to(torch.bfloat16), tmp_path / "df11", "cpu")
    ratio = df11_memory_bytes(model) / bf16_bytes
    assert ratio <= 0.72, ratio
    assert sum(p.numel() for p in reference.parameters()) > 1_000_000


def test_compress_folder_from_diffusers_folder(tmp_path: Path) -> None:
    reference = build("qwen", seed=10)
    reference.save_pretrained(tmp_path / "bf16")
    out = compress_folder(tmp_path / "bf16", tmp_path / "df11")
    model = load_df11(build("qwen", seed=11), out, "cpu")
    assert same_bits(run("qwen", model), run("qwen", reference))


def test_compress_folder_takes_a_pipelines_transformer(tmp_path: Path) -> None:
    reference = build("flux", seed=16)
    reference.to(torch.float32).save_pretrained(tmp_path / "pipe" / "transformer")  # cast back on load
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    out = compress_folder(tmp_path / "pipe", tmp_path / "df11")
    model = load_df11(build("flux", seed=17), out, "cpu")
    assert same_bits(run("flux", model), run("flux", reference.to(torch.bfloat16)))


def test_missing_weights_fail_loudly(tmp_path: Path) -> None:
    reference = build("flux", seed=12)
    compress_transformer(reference, tmp_path / "df11")
    bigger = FluxTransformer2DModel(**dict(FLUX_CONFIG, num_single_layers=3)).to(torch.bfloat16)
    with pytest.raises(DF11FormatError):
        load_df11(bigger, tmp_path / "df11", "cpu")


def test_uncodable_block_stays_bf16(tmp_path: Path) -> None:
    """An inf weight cannot be coded in DF11 (exponent 255): that block is stored as BF16."""
    reference = build("flux", seed=13)
    with torch.no_grad():
        reference.single_transformer_blocks[0].proj_mlp.weight[0, 0] = float("inf")
    expected = reference.single_transformer_blocks[0].proj_mlp.weight.clone()
    compress_transformer(reference, tmp_path / "df11")
    model = load_df11(build("flux", seed=14), tmp_path / "df11", "cpu", mode="eager")
    assert same_bits(model.single_transformer_blocks[0].proj_mlp.weight, expected)
    assert "encoded_exponent" not in dict(model.single_transformer_blocks[0].named_buffers())


def test_meta_model_is_prepared_for_the_dfloat11_package(tmp_path: Path) -> None:
    """The CUDA path cannot run here; check what upstream's loader does to the prepared model:
    ``param.data.copy_`` for every plain tensor and ``delattr(linear, "weight")`` for covered ones."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from inference_server.engine.df11.load import prepare_for_dfloat11

    reference = build("flux", seed=15)
    compress_transformer(reference, tmp_path / "df11")
    with init_empty_weights():
        model = FluxTransformer2DModel(**FLUX_CONFIG).to(torch.bfloat16)
    prepare_for_dfloat11(model, tmp_path / "df11")
    assert not any(p.is_meta for p in model.parameters())
    params = dict(model.named_parameters())
    covered = [p for p in params.values() if p.dim() == 2 and p.stride() == (0, 0)]
    plain_bytes = sum(p.numel() * p.element_size() for p in params.values() if all(p.stride()))
    assert len(covered) == 2 * 14 + 2 * 6  # every Linear of FLUX_PATTERNS, no BF16 storage
    for key, value in load_file(str(tmp_path / "df11" / "model.safetensors")).items():
        if key in params:
            params[key].data.copy_(value)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.stride() == (0, 0):
            delattr(module, "weight")
    assert plain_bytes < sum(p.numel() * p.element_size() for p in reference.parameters()) / 2

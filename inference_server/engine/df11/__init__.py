"""DFloat11: lossless ~30 % smaller BF16 weights, in the format of the ``dfloat11`` package (0.5.0).

- ``compress_transformer(model, out_dir)`` / ``compress_folder(src, dst)``: BF16 -> DF11 folder.
- ``load_df11(model, df11_dir, device)``: install DF11 weights; CUDA through the dfloat11 package
  (imported lazily, only there), any other device through our numpy decoder.
- ``lora_placeholders(model)``: wrap LoRA loading on a DF11 model with it.
- ``df11_memory_bytes(model)``: bytes the model holds, for comparisons with its BF16 twin.

The ``dfloat11`` package itself is never imported by this package except on CUDA.
"""

from inference_server.engine.df11.compress import compress_folder, compress_transformer, default_pattern_dict
from inference_server.engine.df11.format import DF11FormatError
from inference_server.engine.df11.load import df11_memory_bytes, load_df11
from inference_server.engine.df11.lora import is_df11, lora_placeholders

__all__ = [
    "DF11FormatError",
    "compress_folder",
    "compress_transformer",
    "default_pattern_dict",
    "df11_memory_bytes",
    "is_df11",
    "load_df11",
    "lora_placeholders",
]

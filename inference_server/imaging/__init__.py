"""Images in and out: safe inputs, fitting to the model's size, artist signatures, metadata, encoding.

Pillow only, no torch: the API imports this package to validate inline inputs at submit.

- ``inputs``: ``parse_data_uri``, ``resolve_input`` (data:, https://, storage URIs), ``input_kind``
- ``decode``: ``decode_image``, ``validate_image`` (format sniffing, byte and pixel limits, bombs,
  truncation, EXIF orientation, colour profile)
- ``fit``: ``fit_input``, ``fit_mask``, ``edit_size`` (cover and centre-crop rule)
- ``signature``: ``composite_signature``, ``signature_box``, ``validate_signature``
- ``prepare``: ``load_image`` (resolve + decode), ``normalize_input`` (decode + fit + PNG, at submit)
- ``encode``: ``encode_output``, ``validate_metadata`` (PNG text chunks, EXIF for JPEG/WebP)
"""

from __future__ import annotations

from inference_server.imaging.decode import (
    SUPPORTED_FORMATS,
    ImageInfo,
    decode_image,
    sniff_format,
    validate_image,
)
from inference_server.imaging.encode import CONTENT_TYPES, encode_output, validate_metadata
from inference_server.imaging.fit import edit_size, fit_input, fit_mask
from inference_server.imaging.inputs import input_kind, parse_data_uri, resolve_input
from inference_server.imaging.prepare import load_image, normalize_input
from inference_server.imaging.signature import (
    POSITIONS,
    SIZES,
    composite_signature,
    prepare_signature,
    signature_box,
    validate_signature,
)

__all__ = [
    "CONTENT_TYPES",
    "POSITIONS",
    "SIZES",
    "SUPPORTED_FORMATS",
    "ImageInfo",
    "composite_signature",
    "decode_image",
    "edit_size",
    "encode_output",
    "fit_input",
    "fit_mask",
    "input_kind",
    "load_image",
    "normalize_input",
    "parse_data_uri",
    "prepare_signature",
    "resolve_input",
    "signature_box",
    "sniff_format",
    "validate_image",
    "validate_metadata",
    "validate_signature",
]

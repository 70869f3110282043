"""Adapters over a quantized frozen base (QLoRA): storage formats, the quantized layer,
merging into it, LoftQ init. See :mod:`lora_jax.quant.layer`."""

from lora_jax.quant.formats import NF4, Int4, Int8, QuantFormat, Quantized, quantization_error
from lora_jax.quant.gguf_q4 import Q4_1_FORMAT, load_gguf_quantized
from lora_jax.quant.layer import (
    DequantizedKernel,
    QuantizedLayer,
    QuantizedWeight,
    dequantize,
    kernel_bytes,
    quantize,
    quantized_layers,
)
from lora_jax.quant.loftq import LoftQReport, loftq
from lora_jax.quant.merge import MergeReport, merge_quantized

__all__ = [
    "NF4",
    "DequantizedKernel",
    "Int4",
    "Int8",
    "Q4_1_FORMAT",
    "LoftQReport",
    "MergeReport",
    "QuantFormat",
    "Quantized",
    "QuantizedLayer",
    "QuantizedWeight",
    "dequantize",
    "kernel_bytes",
    "load_gguf_quantized",
    "loftq",
    "merge_quantized",
    "quantization_error",
    "quantize",
    "quantized_layers",
]

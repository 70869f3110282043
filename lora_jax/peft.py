"""PEFT's adapter files (``adapter_model.safetensors`` + ``adapter_config.json``), both ways.

    lj.peft.export_peft("out/", model, hf_name=lambda path: path)  # then PeftModel.from_pretrained(torch_model, "out/")
    model = lj.peft.import_peft("out/", base_model, hf_name=lambda path: path)

The public namespace of :mod:`lora_jax.peft_format`, which holds the code and the file
layout. Each variant that PEFT can hold declares its own :class:`PeftCodec`
(``VariantConfig.peft_codec``); ``CODECS`` lists them by variant name. Reading and
writing the files needs ``safetensors`` (the ``interop`` extra); importing this module
does not. :func:`save_as_lora` (:mod:`lora_jax.as_lora`) writes any adapter as a plain
LoRA file: the SVD-truncated delta, with its error per layer.
"""

from lora_jax.as_lora import LoraApproximation, save_as_lora, save_as_lora_pair
from lora_jax.peft_codec import PeftCodec
from lora_jax.peft_format import CODECS, PeftFormatError, export_peft, import_peft

__all__ = [
    "CODECS",
    "LoraApproximation",
    "PeftCodec",
    "PeftFormatError",
    "export_peft",
    "import_peft",
    "save_as_lora",
    "save_as_lora_pair",
]

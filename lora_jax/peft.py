"""PEFT's adapter files (``adapter_model.safetensors`` + ``adapter_config.json``), both ways.

    lj.peft.export_peft("out/", model, hf_name=lambda path: path)  # then PeftModel.from_pretrained(torch_model, "out/")
    model = lj.peft.import_peft("out/", base_model, hf_name=lambda path: path)

The public namespace of :mod:`lora_jax.peft_format`, which holds the code, the file
layout and the per-variant codecs. Reading and writing the files needs ``safetensors``
(the ``interop`` extra); importing this module does not.
"""

from lora_jax.peft_format import PeftFormatError, export_peft, import_peft

__all__ = ["PeftFormatError", "export_peft", "import_peft"]

"""A byte-level tokenizer for the built-in tiny model (no download), with the small part
of the HF tokenizer call interface the examples use; real checkpoints bring their own
tokenizer through :func:`load_tokenizer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ByteTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; then ``pad`` (256), ``bos`` (257), ``eos`` (258)."""

    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [self.bos_token_id] * add_bos + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens and any(i >= 256 for i in ids):
            raise ValueError("ByteTokenizer.decode: special tokens have no text; use skip_special_tokens=True")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
        return_tensors: str = "np",
    ) -> dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` as int32 arrays (B, T), like an HF tokenizer."""
        if return_tensors != "np":
            raise ValueError(f"ByteTokenizer returns numpy arrays only (return_tensors='np'), got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            rows = [r[:max_length] for r in rows]
        width = max(len(r) for r in rows)
        if not padding and any(len(r) != width for r in rows):
            raise ValueError("rows differ in length; pass padding=True")
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, span], mask[i, span] = r, 1
        return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's own tokenizer, through ``transformers.AutoTokenizer``, offline."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "loading a checkpoint's tokenizer needs transformers (pip install lora_jax[interop])"
        ) from err
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

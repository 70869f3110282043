"""The tokenizer of a llama.cpp GGUF file, rebuilt from its metadata with ``tokenizers``.

The file stores the vocabulary, merges, token types, special ids and chat template as
``tokenizer.ggml.*`` fields; only byte-level BPE (GPT-2's spelling, ``tokenizer.ggml.model
= "gpt2"``) with GPT-2's split regex is rebuilt, anything else is refused by name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GPT2_SPLIT_PRE", "TOKENIZER_ARRAYS", "tokenizer_from_metadata"]

# Pre-tokenizers whose split is GPT-2's byte-level regex (the ``tokenizers`` ByteLevel default).
GPT2_SPLIT_PRE = ("default", "gpt2", "smollm")
# The array fields the tokenizer needs (reading every array field of a file costs seconds).
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level spelling: each byte is one printable character (printable Latin-1
    bytes stand for themselves, the others map to code points from 256 up)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def tokenizer_from_metadata(meta: dict[str, Any], where: str):
    """An HF ``PreTrainedTokenizerFast`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata
    (read with the arrays in :data:`TOKENIZER_ARRAYS`), with its chat template. ``where``
    names the file in errors. Raises on any tokenizer other than byte-level BPE."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in GPT2_SPLIT_PRE:
        raise ValueError(
            f"{where}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (only byte-level BPE, "
            f"'gpt2', with pre-tokenizer {', '.join(GPT2_SPLIT_PRE)}); load it with "
            "transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name) and use load_gguf(..., tokenizer=False)"
        )
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
    except ImportError as err:
        raise ImportError("a GGUF tokenizer needs tokenizers and transformers (pip install lora_jax[interop])") from err
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    # Some converters store added tokens as plain text; BPE looks tokens up in byte spelling.
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()), i)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", ())]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 control (special, e.g. <|im_start|>), 4 user-defined (matched whole, not special)
    typed = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3 and set(t) <= alphabet]
    )
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])
    special = {
        role: tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and "bos" in special
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in special
    single = [special["bos"]] * add_bos + ["$A"] + [special["eos"]] * add_eos
    pair = [*single, *(["$B:1"] + [f"{special['eos']}:1"] * add_eos)]
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(special[r], vocab[special[r]]) for r, on in (("bos", add_bos), ("eos", add_eos)) if on],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{role}_token": tok for role, tok in special.items()},
        chat_template=meta.get("tokenizer.chat_template"),
    )

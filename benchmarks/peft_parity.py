"""Measured parity of the issue-17 variants with PEFT (torch CPU, fp32): the relative error
``max |ours - PEFT| / max |PEFT|`` of the forward pass, of the worst adapter weight's
gradient and of the worst merged kernel / bias, on the tiny MLP of tests/peft_helpers.py
with the same random (non-identity) adapter weights in both. Not a unit test: the tests
assert <= 1e-5; this prints the numbers the README quotes.

    PYTHONPATH=$PWD python benchmarks/peft_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import peft
import peft_parity
from peft.tuners.boft import layer as peft_boft
from peft_parity import TorchBlockDiag, build, copy_vera_projection, errors, randomize

from lora_jax.variants import AdaLoRAConfig, BOFTConfig, LoHaConfig, LoKrConfig, MiSSConfig, OFTConfig, VeRAConfig

TARGETS = ["up", "down"]
CASES = {
    "loha r=3": (peft.LoHaConfig(r=3, alpha=7, target_modules=TARGETS), LoHaConfig(r=3, lora_alpha=7), "hada"),
    "lokr full W1, W2": (peft.LoKrConfig(r=8, alpha=3, target_modules=TARGETS), LoKrConfig(r=8, lora_alpha=3), "lokr"),
    "lokr factored W1, W2": (
        peft.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=TARGETS),
        LoKrConfig(r=1, lora_alpha=3, decompose_both=True),
        "lokr",
    ),
    "oft block 4": (peft.OFTConfig(oft_block_size=4, target_modules=TARGETS), OFTConfig(oft_block_size=4), "oft"),
    "oft shared block": (
        peft.OFTConfig(oft_block_size=4, block_share=True, target_modules=TARGETS),
        OFTConfig(oft_block_size=4, block_share=True),
        "oft",
    ),
    "miss r=5 (padded)": (peft.MissConfig(r=5, target_modules=TARGETS), MiSSConfig(r=5), "miss"),
    "miss mini": (
        peft.MissConfig(r=4, init_weights="mini", mini_r=2, target_modules=TARGETS),
        MiSSConfig(r=4, mini_r=2),
        "miss",
    ),
    "vera r=4": (peft.VeraConfig(r=4, target_modules=TARGETS), VeRAConfig(r=4), "vera"),
    "vera r=16 (> d_in)": (peft.VeraConfig(r=16, target_modules=TARGETS), VeRAConfig(r=16), "vera"),
    "boft block 4": (peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS), BOFTConfig(boft_block_size=4), "boft"),
    # more than one butterfly factor runs PEFT's own butterfly code with TorchBlockDiag for fbd_cuda
    "boft block 2, 2 factors": (
        peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=TARGETS),
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2),
        "boft",
    ),
    "boft 2 blocks, 2 factors": (
        peft.BOFTConfig(boft_block_num=2, boft_block_size=0, boft_n_butterfly_factor=2, target_modules=TARGETS),
        BOFTConfig(boft_block_num=2, boft_block_size=0, boft_n_butterfly_factor=2),
        "boft",
    ),
    "boft block 2, 3 factors (up: d_in 8)": (
        peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["up"]),
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3),
        "boft",
    ),
    "adalora r=3": (
        peft.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=7, total_step=10, target_modules=TARGETS),
        AdaLoRAConfig(r=3, target_r=1, lora_alpha=7, total_step=10),
        "adalora",
    ),
}
NAMES = {
    "hada": {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    "oft": {"oft_r": "oft_R"},
    "miss": {"miss_block": "miss_block"},
    "vera": {n: n for n in ("vera_lambda_d", "vera_lambda_b")},
    "boft": {"boft_r": "boft_R", "boft_s": "boft_s"},
    "adalora": {"lora_a": "lora_A", "lora_e": "lora_E", "lora_b": "lora_B"},
}


def main() -> None:
    plain = peft_parity.peft_tensor
    print("| variant | forward | gradients | merge |\n|---|---|---|---|")
    for label, (theirs, ours, kind) in CASES.items():
        # OFT's weight sits one level down (oft_R[name].weight)
        peft_parity.peft_tensor = (
            (lambda m, layer, name: m.base_model.model.get_submodule(layer).oft_R["default"].weight)
            if kind == "oft"
            else plain
        )
        fbd = TorchBlockDiag if getattr(ours, "boft_n_butterfly_factor", 1) > 1 else None
        peft_boft.get_fbd_cuda = lambda fbd=fbd: fbd  # None: PEFT on CPU, and no attempt to compile
        peft_model, model = build(theirs, ours, pattern="|".join(sorted(theirs.target_modules)))
        if kind == "vera":  # the shared random projection: PEFT's, drawn by torch
            copy_vera_projection(peft_model, model)
        size, offset = {"oft": (0.2, None), "boft": (0.3, {"boft_s": 1.0})}.get(kind, (0.4, None))
        randomize(peft_model, model, NAMES[kind], size=size, offset=offset)
        e = errors(peft_model, model, NAMES[kind])
        print(f"| {label} | {e['forward']:.1e} | {e['grad']:.1e} | {e['merge']:.1e} |", flush=True)


if __name__ == "__main__":
    main()

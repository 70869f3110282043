"""OLoRA: the residual init (QR of the kernel) and forward equal PEFT's, and it converts to a
plain LoRA. (Identity, alpha=0, merge and training are in tests/test_contract.py; what every
low-rank variant shares is in tests/test_lowrank.py.)"""

from __future__ import annotations

import pytest
from helpers import check_to_lora
from layers import LAYOUT_IDS, LAYOUTS
from peft_helpers import check_residual_init_matches_peft

from lora_jax import OLoRAConfig

OLORA = OLoRAConfig(r=2, lora_alpha=4.0)


@pytest.mark.parametrize("layout", LAYOUTS[::3], ids=LAYOUT_IDS[::3])
def test_to_lora_gives_the_same_layer(layout):
    check_to_lora(OLORA, layout)


def test_residual_init_and_forward_match_peft():
    check_residual_init_matches_peft("olora", OLORA)

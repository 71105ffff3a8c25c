"""An adapter saved by peft-lime 0.1.0 as it landed before the refactor (commit 144ca31) loads and gives its logits.

tests/data/adapter_0_1_0/ was written by that commit's code (tiny Llama, seed 7; LiME-LoRA on q/v/up, n_gram=2,
experts and shared vector far from 1): the adapter directory and the logits it produced. Same fp32 ops in the same
order, so the tolerance is float rounding only (1e-5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

import peft_lime

from ._models import tiny_llama

FIXTURE = Path(__file__).parent / "data" / "adapter_0_1_0"


def test_adapter_saved_by_0_1_0_loads_with_the_same_logits():
    expected = torch.load(FIXTURE / "expected.pt")
    model = PeftModel.from_pretrained(tiny_llama(seed=7), str(FIXTURE / "adapter")).eval()
    assert sum(isinstance(m, peft_lime.LimeLayer) for m in model.modules()) == 6
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)


# peft_lime.__all__ of 0.1.0 (commit 144ca31): every public name still exists.
PUBLIC_0_1_0 = (
    "LimeConfig LimeExperts LimeLayer LimeModel TaskIdsCollator enable_task_ids ensure_lime_peft_type find_lime_model "
    "get_aux_loss get_routing_stats install_model_card_hooks lime_optimizer lime_param_groups register_delta "
    "register_lime reset_routing_stats set_aux_loss_scale set_routing_stats_enabled sync_routing_stats "
    "update_lime_model_card"
).split()


def test_public_names_of_0_1_0_still_exist():
    missing = [name for name in PUBLIC_0_1_0 if name not in peft_lime.__all__ or not hasattr(peft_lime, name)]
    assert not missing

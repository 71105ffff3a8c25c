"""Where LiME's overhead over plain LoRA goes: torch.profiler op tables for one train step and for decoding.

    python benchmarks/profile_lime.py --layers 4 --batch 4 --seq 128

``efficiency.py --variants`` runs the same profile in its full CPU run (results/profile.md). LiME's routing stages
(routing_logits, select_experts, balance/statistics, expert mix, aux injection) are wrapped in ``record_function``
labels during the profile only (monkeypatched, peft_lime is not modified), so their forward time, children included,
is reported next to the per-op self times. The tables are built by ``lime_examples.bench.profile``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Optional

import torch

from lime_examples.bench import harness
from lime_examples.bench.methods import LIME_E8, LORA, all_methods
from lime_examples.bench.param_counts import smollm2_135m_config
from lime_examples.bench.profile import format_profile, profile_pair


def main(argv: Optional[list[str]] = None) -> int:
    """Profile LoRA and LiME E=8 on SmolLM2-135M's shapes and print the tables."""
    from transformers import LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    config = smollm2_135m_config(args.layers)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq))
    prompt = torch.randint(3, config.vocab_size, (1, 32))
    built = {}
    for method in all_methods(include_package=False):
        if method.name in (LORA, LIME_E8):
            model, aux = method.build(copy.deepcopy(base))
            built[method.name] = harness.make_trained(model, aux, ids, torch.ones_like(ids))
    text = format_profile(profile_pair(built[LORA], built[LIME_E8], prompt))
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared parametrisation and helpers of the PEFT-contract tests (test_peft_contract*.py).

Every test runs once per METHOD: plain PEFT LoRA (the reference: no LiME, the behaviour PEFT's own generic tests
check for every tuner) and LiME over LoRA, DoRA, IA3, LoHa and LoKr. Adapters start far from identity (random LoRA
B, random IA3 vectors, experts spread by expert_init_std=0.5 and an open shared-expert gate) so a wrong route or a
stale tensor changes the logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_lime import LimeExperts

from ._models import VOCAB, lime, lora

TARGETS = ["q_proj", "v_proj"]
NUM_EXPERTS = 4

_BASES = {
    "lora": lambda **kw: lora(**kw),
    "dora": lambda **kw: lora(use_dora=True, **kw),
    "ia3": lambda **kw: IA3Config(feedforward_modules=[], init_ia3_weights=False, **kw),
    "loha": lambda **kw: LoHaConfig(r=4, init_weights=False, **kw),
    "lokr": lambda **kw: LoKrConfig(r=4, init_weights=False, **kw),
}

# id -> (wrapped in LiME?, base tuner)
METHODS = {
    "lora-reference": (False, "lora"),
    "lime-lora": (True, "lora"),
    "lime-dora": (True, "dora"),
    "lime-ia3": (True, "ia3"),
    "lime-loha": (True, "loha"),
    "lime-lokr": (True, "lokr"),
}

method_param = pytest.mark.parametrize("method", list(METHODS))


def is_lime(method: str) -> bool:
    return METHODS[method][0]


def base_config(method: str, **kwargs):
    """The base tuner's config of a method (for the reference: the whole config)."""
    kwargs.setdefault("target_modules", list(TARGETS))
    return _BASES[METHODS[method][1]](**kwargs)


def make_config(method: str, lime_kwargs: dict | None = None, **base_kwargs):
    base = base_config(method, **base_kwargs)
    if not is_lime(method):
        return base
    lime_kwargs = dict(lime_kwargs or {})
    lime_kwargs.setdefault("num_experts", NUM_EXPERTS)
    lime_kwargs.setdefault("expert_init_std", 0.5)
    return lime(base, **lime_kwargs)


def spread_experts(model: nn.Module, adapter_name: str, gate: float = 0.5) -> None:
    """Open the shared-expert gate of one adapter (init 0) so the shared vector matters too. No-op for plain PEFT."""
    with torch.no_grad():
        for module in model.modules():
            experts = getattr(module, "lime_experts", None)
            if isinstance(experts, nn.ModuleDict) and adapter_name in experts:
                assert isinstance(experts[adapter_name], LimeExperts)
                if experts[adapter_name].gate is not None:
                    experts[adapter_name].gate.fill_(gate)


def inputs(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def logits(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def adapter_params(model: nn.Module, adapter_name: str) -> set[str]:
    """Names of the parameters that belong to one adapter: a name segment equal to the adapter name.

    That is where PEFT (and LiME) keep per-adapter tensors: ``lora_A.<name>.weight``, ``ia3_l.<name>``,
    ``lime_experts.<name>.weight``, ``modules_to_save.<name>.weight``, ...
    """
    return {n for n, _ in model.named_parameters() if adapter_name in n.split(".")}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expert_params(names: set[str]) -> set[str]:
    return {n for n in names if "lime_experts" in n.split(".")}


def assert_exactly_trainable(model: nn.Module, adapter_name: str, method: str, extra: set[str] = frozenset()):
    """requires_grad is set on exactly the tensors of ``adapter_name`` (base tuner AND experts for LiME)."""
    expected = adapter_params(model, adapter_name) | set(extra)
    assert expected, f"no parameter named for adapter {adapter_name!r}"
    if is_lime(method):
        experts = expert_params(expected)
        assert experts, f"no LiME expert tensors for adapter {adapter_name!r}"
        assert expected - experts, f"no base-tuner tensors for adapter {adapter_name!r}"
    got = trainable(model)
    assert got == expected, (
        f"requires_grad mismatch for adapter {adapter_name!r}: trainable but not the adapter's: "
        f"{sorted(got - expected)[:6]}; the adapter's but frozen: {sorted(expected - got)[:6]}"
    )


def adapter_keyed_leftovers(model: nn.Module, adapter_name: str) -> list[str]:
    """Every place on a tuner layer (or on plain objects it holds) still keyed by ``adapter_name``."""
    found = []
    seen = set()

    def visit(obj, where, depth):
        if id(obj) in seen or depth > 2:
            return
        seen.add(id(obj))
        attrs = vars(obj) if hasattr(obj, "__dict__") else {}
        for attr, value in attrs.items():
            if isinstance(value, (Mapping, nn.ModuleDict, nn.ParameterDict)):
                for key in list(value.keys()):
                    if key == adapter_name or (isinstance(key, tuple) and adapter_name in key):
                        found.append(f"{where}.{attr}[{key!r}]")
                if attr in ("_modules", "_parameters", "_buffers"):
                    continue  # registered children: named_modules() visits them
                for key, sub in list(value.items()):
                    # plain objects and unregistered modules (e.g. headless inner tuners) kept in a dict
                    if not isinstance(sub, torch.Tensor) and hasattr(sub, "__dict__") and not isinstance(sub, type):
                        visit(sub, f"{where}.{attr}[{key!r}]", depth + 1)
            elif isinstance(value, (list, tuple)) and attr in ("_active_adapter", "merged_adapters"):
                if adapter_name in value:
                    found.append(f"{where}.{attr}")
            elif isinstance(value, str) and attr == "_active_adapter" and value == adapter_name:
                found.append(f"{where}.{attr}")
            elif (
                not isinstance(value, (nn.Module, torch.Tensor, type))
                and hasattr(value, "__dict__")
                and not callable(value)
            ):
                visit(value, f"{where}.{attr}", depth + 1)

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in tuple(module.adapter_layer_names) + tuple(module.other_param_names):
                container = getattr(module, attr, None)
                if hasattr(container, "keys") and adapter_name in container.keys():
                    found.append(f"{name}.{attr}")
            for child_name, child in module.named_children():
                if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in child.keys():
                    found.append(f"{name}.{child_name}")
            visit(module, name, 0)
    # tuner-level state (e.g. LiME's routing context, headless inner tuners)
    for name, module in model.named_modules():
        if hasattr(module, "peft_config") and isinstance(module.peft_config, Mapping):
            visit(module, name or "<root>", 0)
    return sorted(set(found))


def tuner_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]

"""The benchmarked methods: how each one adapts a base model, and its trainable-parameter formula.

Every method targets q/k/v/o/gate/up/down at rank 8 with lora_alpha 8 (PEFT's default, scaling 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from .baselines.mixlora import apply_mixlora
from .baselines.mixlora_pkg import apply_mixlora_package
from .baselines.molora import apply_molora
from .harness import AuxFn
from .param_counts import TARGETS, lime_params, lora_params, mixlora_params, molora_params

RANK = 8
ALPHA = 8
MOE_EXPERTS = 8
MOE_TOP_K = 2

LORA = "LoRA (PEFT)"
LIME_E8 = "LiME E=8"
LIME_E8_FUSED = "LiME E=8, fused routing"
LIME_E8_EAGER = "LiME E=8, native kernel off"
MIXLORA = "MixLoRA"
MIXLORA_PKG = "MixLoRA (pip mixlora 0.2.3)"
MOLORA = "MoLoRA-style E=8 top-2"

Builder = Callable[[nn.Module], tuple[nn.Module, Optional[AuxFn]]]


@dataclass
class Method:
    """A benchmarked method: display name, builder (base model -> adapted model, aux-loss hook), param formula."""

    name: str
    build: Builder
    expected_params: Callable[[Any], int]
    description: str


def _lora(model: nn.Module) -> tuple[nn.Module, Optional[AuxFn]]:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))), None


def _lime(fused: bool = False, native: bool = True, **lime_kwargs: Any) -> Builder:
    def build(model: nn.Module) -> tuple[nn.Module, Optional[AuxFn]]:
        from peft import LoraConfig, get_peft_model

        import peft_lime
        from peft_lime import fused_route, native_route

        base = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
        # LiME injects its balance loss into the gradient itself: no aux hook for the train step.
        peft_model = get_peft_model(model, peft_lime.LimeConfig(base=base, **lime_kwargs))
        # The fused routing region and the native decoding kernel are process-wide switches: each LiME model sets
        # them at each of its calls (train steps and every generate step), so rows with and without them can be
        # measured in one process.
        def switches(*_: Any) -> None:
            fused_route.set_fused(fused)
            native_route.set_native(native)

        peft_model.get_base_model().register_forward_pre_hook(switches)
        return peft_model, None

    return build


def _mixlora(model: nn.Module) -> tuple[nn.Module, Optional[AuxFn]]:
    return model, apply_mixlora(model, RANK, ALPHA, MOE_EXPERTS, MOE_TOP_K)


def _mixlora_pkg(model: nn.Module) -> tuple[nn.Module, Optional[AuxFn]]:
    return model, apply_mixlora_package(model, RANK, ALPHA, MOE_EXPERTS, MOE_TOP_K)


def _molora(model: nn.Module) -> tuple[nn.Module, Optional[AuxFn]]:
    return model, apply_molora(model, TARGETS, RANK, ALPHA, MOE_EXPERTS, MOE_TOP_K)


def lime_method(
    name: str, num_experts: int, description: str, fused: bool = False, native: bool = True, **kwargs: Any
) -> Method:
    """LiME over PEFT LoRA (rank 8, seven targets), shared expert on (the default); ``fused``: the compiled routing
    region (peft_lime.fused_route) on for this model's calls; ``native``: the native decoding kernel
    (peft_lime.native_route, on by default) on."""
    return Method(
        name,
        _lime(fused=fused, native=native, num_experts=num_experts, **kwargs),
        lambda config: lime_params(config, RANK, num_experts, shared_expert=True),
        description,
    )


def fused_method() -> Method:
    """LiME E=8 with the compiled routing region on (``efficiency.py --fused`` only; not in all_methods)."""
    return lime_method(LIME_E8_FUSED, 8, "LiME E=8 with PEFT_LIME_FUSED=1 (compiled routing region)", fused=True)


def eager_method() -> Method:
    """LiME E=8 with the native library off (decoding kernel, low-rank modulation, training routing): every op
    dispatched by torch, as before the library (``efficiency.py --fused`` only; not in all_methods)."""
    return lime_method(LIME_E8_EAGER, 8, "LiME E=8 with PEFT_LIME_NATIVE=0 (routing and modulation as torch ops)",
                       native=False)


def all_methods(include_package: bool) -> list[Method]:
    """Every method, the reference (plain LoRA) first; the pip MixLoRA row only when the package is usable."""
    methods = [
        Method(LORA, _lora, lambda c: lora_params(c, RANK), "peft LoraConfig(r=8), the 1.00 reference"),
        lime_method("LiME E=4", 4, "Auto Top-K (default)"),
        lime_method(LIME_E8, 8, "Auto Top-K (default), soft selection"),
        lime_method("LiME E=16", 16, "Auto Top-K (default)"),
        lime_method("LiME E=8 top-2", 8, "fixed top-k: auto_topk=False, top_k=2", auto_topk=False, top_k=2),
        lime_method("LiME E=8 hard", 8, 'selection="hard"', selection="hard"),
        lime_method("LiME E=8 n-gram 4", 8, "n_gram=4 (causal windows)", n_gram=4),
        Method(
            MIXLORA,
            _mixlora,
            lambda c: mixlora_params(c, RANK, MOE_EXPERTS),
            "re-implementation (lime_examples/bench/baselines/mixlora.py): LoRA on q/k/v/o, top-2 of 8 LoRA "
            "experts on gate/up/down sharing the frozen FFN, router hidden->8, load-balance loss",
        ),
    ]
    if include_package:
        methods.append(
            Method(
                MIXLORA_PKG,
                _mixlora_pkg,
                lambda c: mixlora_params(c, RANK, MOE_EXPERTS),
                "the pip package's own forward, made trainable (lime_examples/bench/baselines/mixlora_pkg.py)",
            )
        )
    methods.append(
        Method(
            MOLORA,
            _molora,
            lambda c: molora_params(c, RANK, MOE_EXPERTS),
            "lime_examples/bench/baselines/molora.py: 8 LoRA experts + router in->8 on every target, top-2",
        )
    )
    return methods


def required_method_names() -> list[str]:
    """Names every run reports (the pip MixLoRA row is optional: it needs the package installed)."""
    return [m.name for m in all_methods(include_package=False)]

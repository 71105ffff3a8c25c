"""The pip package ``mixlora`` 0.2.3, made trainable, and a parity check against our MixLoRA re-implementation.

The package runs on transformers 5, but it is an inference loader for adapters trained elsewhere (MoE-PEFT):
``inject_adapter_in_model`` takes a dict of trained weights; the FFN experts live in a plain dict and the router
in a plain tensor attribute, so neither is a registered parameter (``model.parameters()`` and any optimizer miss
them); the experts' dropout is never switched by ``model.eval()``; it requires lora_dropout > 0; it computes no
router loss. To time it as a trainable method we register the experts and the router as parameters, replace the
dropouts by identities (no dropout, like the other methods) and add the router loss in a forward pre-hook on each
MLP (recomputing the router logits: one extra hidden x E matmul per layer). fp32 only: its expert path casts
activations to the adapter dtype before the frozen down projection.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import AuxLossCollector, LoraLinear, init_lora_, load_balance_loss
from .mixlora import ATTENTION, AUX_LOSS_COEF, FFN, ROUTER_INIT_STD, MixLoraMLP, apply_mixlora

PACKAGE_VERSION = "0.2.3"


def package_status() -> tuple[bool, str]:
    """(usable, reason): whether ``import mixlora`` works and is version 0.2.3."""
    try:
        import importlib.metadata

        import mixlora  # noqa: F401

        version = importlib.metadata.version("mixlora")
    except Exception as exc:  # ImportError, or the package's own version asserts
        return False, f"not importable ({type(exc).__name__}: {exc})"
    if version != PACKAGE_VERSION:
        return False, f"version {version} installed, {PACKAGE_VERSION} expected"
    return True, "importable"


def _package_config(r: int, alpha: float, num_experts: int, top_k: int) -> Any:
    from mixlora import MixLoraConfig

    config = MixLoraConfig.from_config(
        {
            "base_model_name_or_path": "random-init",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "r": r,
            "lora_alpha": int(alpha),
            "lora_dropout": 0.05,  # the package asserts > 0; the dropouts are replaced by identities below
            "target_modules": list(ATTENTION + FFN),
            "routing_strategy": "mixlora",
            "num_experts": num_experts,
            "top_k": top_k,
            "act_fn": "silu",
        }
    )
    config.adapter_name_ = "default"
    config.dtype_ = torch.float32
    return config.check()


def random_package_weights(model: nn.Module, r: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Freshly initialised weights in the package's key layout (A kaiming-uniform, B zero, router N(0, 0.02^2))."""
    weights: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ATTENTION:
            lin = getattr(layer.self_attn, proj)
            A, B = torch.empty(r, lin.in_features), torch.empty(lin.out_features, r)
            init_lora_(A, B)
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = A
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = B
        for proj in FFN:
            lin = getattr(layer.mlp, proj)
            for e in range(num_experts):
                A, B = torch.empty(r, lin.in_features), torch.empty(lin.out_features, r)
                init_lora_(A, B)
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight"] = A
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight"] = B
        hidden = layer.mlp.gate_proj.in_features
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(num_experts, hidden) * ROUTER_INIT_STD
    return weights


def weights_from_reimplementation(model: nn.Module) -> dict[str, torch.Tensor]:
    """Export a model built by ``apply_mixlora`` to the package's key layout (for the parity check)."""
    weights: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ATTENTION:
            lora: LoraLinear = getattr(layer.self_attn, proj)
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = lora.lora_A.detach().clone()
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = lora.lora_B.detach().clone()
        moe: MixLoraMLP = layer.mlp
        for proj in FFN:
            for e in range(moe.num_experts):
                prefix = f"mixlora.layers.{i}.mlp.{proj}.experts.{e}"
                weights[f"{prefix}.lora_A.weight"] = moe.lora_A[proj][e].detach().clone()
                weights[f"{prefix}.lora_B.weight"] = moe.lora_B[proj][e].detach().clone()
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = moe.router.weight.detach().clone()
    return weights


def _aux_hook(moe: nn.Module, top_k: int, num_experts: int):
    def hook(mlp: nn.Module, args: tuple) -> None:
        if not (mlp.training and torch.is_grad_enabled()):
            return
        x = args[0].reshape(-1, args[0].shape[-1])
        probs = torch.softmax(F.linear(x, moe.gate_), dim=-1)
        mlp.aux_loss = load_balance_loss(probs, torch.topk(probs, top_k, dim=-1).indices, num_experts)

    return hook


def apply_mixlora_package(
    model: nn.Module,
    r: int,
    alpha: float,
    num_experts: int = 8,
    top_k: int = 2,
    weights: Optional[dict[str, torch.Tensor]] = None,
) -> AuxLossCollector:
    """Freeze ``model``, inject the package's MixLoRA and make it trainable (see the module docstring)."""
    from mixlora import inject_adapter_in_model

    model.requires_grad_(False)
    config = _package_config(r, alpha, num_experts, top_k)
    if weights is None:
        weights = random_package_weights(model, r, num_experts)
    inject_adapter_in_model(model, config, weights)
    for layer in model.model.layers:
        for proj in ATTENTION:
            getattr(layer.self_attn, proj).dropout_ = nn.Identity()
        mlp = layer.mlp
        moe = mlp.mixlora_moes[config.adapter_name_]
        experts = list(moe.experts_.values())
        for expert in experts:
            expert.dropout_ = nn.Identity()
        mlp.mixlora_experts = nn.ModuleList(experts)  # registered: parameters(), train()/eval() reach them
        moe.gate_ = nn.Parameter(moe.gate_.detach().clone())
        mlp.mixlora_router = moe.gate_
        mlp.aux_loss = None
        mlp.register_forward_pre_hook(_aux_hook(moe, top_k, num_experts))
    return AuxLossCollector(model, AUX_LOSS_COEF)


def check_parity(base_model: nn.Module, r: int = 8, alpha: float = 8.0, num_experts: int = 8, top_k: int = 2) -> float:
    """Max |logits difference| between our MixLoRA and the package on the same weights (non-zero B), eval mode.

    ``base_model`` is left untouched (deep copies are adapted).
    """
    ours = copy.deepcopy(base_model)
    apply_mixlora(ours, r, alpha, num_experts, top_k)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    theirs = copy.deepcopy(base_model)
    apply_mixlora_package(theirs, r, alpha, num_experts, top_k, weights=weights_from_reimplementation(ours))
    ours.eval()
    theirs.eval()
    vocab = base_model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=generator)
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max()
    return float(diff)

"""The LiME layer: wraps one adapted layer of the base tuner and modulates its adapter output per token.

y = h + sum over active adapters of delta_a * (1 + w_a @ P_a + g_a * p_s,a), with h the frozen output (computed
once), delta_a the adapter's explicit contribution (see deltas.py) and w_a the routing weights (see routing.py).
One class serves every base tuner: only the delta function differs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from . import routing
from .aux_loss import inject_aux_loss
from .context import RoutingContext, TokenLayout
from .deltas import check_lora_variants, find_delta_fn, lora_delta, lora_factors
from .modulation import modulate
from .telemetry import RoutingStats

MERGE_ERROR = (
    "LiME adapters cannot be merged into the base weights: each token's adapter output is multiplied by an "
    "input-dependent mix of expert vectors, so no single weight matrix reproduces it. Keep the adapter unmerged "
    "(or use unload() to get the base model back)."
)


@dataclass(frozen=True)
class LimeRoutingSettings:
    """Per-adapter routing settings of one layer, copied from LimeConfig at update_layer time."""

    num_experts: int
    top_k: int
    auto_topk: bool
    auto_topk_threshold: float
    max_active_experts: Optional[int]
    selection: str
    selection_temperature: float
    n_gram: int
    ngram_mode: str
    temperature: float
    routing_gamma: float
    routing_norm: str
    jitter_noise: float
    importance_loss_coef: float
    kl_loss_coef: float

    @classmethod
    def from_config(cls, config: Any) -> LimeRoutingSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


class LimeExperts(nn.Module):
    """Expert vectors of one adapter in one layer: a leaf module with a ``.weight``, read only in its forward.

    FSDP's PEFT auto-wrap policy wraps leaf modules whose ``.weight`` requires grad, so the experts are sharded and
    gathered as a unit; reading them only here keeps FSDP2 from meeting a sharded tensor in the parent's code.
    ``weight`` stores P - 1 (the deviation from 1), not P: vectors near 1.0 in bf16 (as TRL casts trainable
    parameters of quantized models) would lose every update smaller than 1/256, deviations near 0 do not.
    """

    def __init__(
        self, num_experts: int, width: int, shared_expert: bool, init_std: float, seed: Optional[int] = None
    ) -> None:
        super().__init__()
        self.init_std = init_std
        self.seed = seed
        self.weight = nn.Parameter(torch.empty(num_experts, width, dtype=torch.float32))
        if shared_expert:
            self.shared = nn.Parameter(torch.empty(width, dtype=torch.float32))
            self.gate = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        else:
            self.register_parameter("shared", None)
            self.register_parameter("gate", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A private generator (when a seed is given) leaves the global RNG where the base tuner expects it: LiME over
        # LoRA then initialises exactly the LoRA weights plain LoRA gets with the same seed, which makes side-by-side
        # comparisons fair and lets a user switch methods without changing the adapter's starting point.
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=self.weight.device).manual_seed(self.seed)
        with torch.no_grad():
            self.weight.uniform_(-self.init_std, self.init_std, generator=generator)
            if self.shared is not None:
                self.shared.normal_(0.0, self.init_std, generator=generator)
                self.gate.zero_()

    def _offset(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """1 + g * p_s, shape (d,): one addcmul when the experts' dtype is the compute dtype (decoding pays per op)."""
        if self.shared is None:
            return torch.ones((), dtype=dtype, device=device).expand(self.weight.shape[1])
        if self.shared.dtype == dtype:
            return torch.addcmul(_one(dtype, device), self.gate, self.shared)
        return (self.gate * self.shared).to(dtype) + 1.0

    def forward(
        self,
        mix: torch.Tensor,
        out: Optional[torch.Tensor] = None,
        delta: Optional[torch.Tensor] = None,
        lora: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
    ) -> torch.Tensor:
        """mix: (N, E) weights summing to 1 per row -> modulation (N, d) = 1 + mix @ (P - 1) + g * p_s.

        With ``out`` (and ``delta``, or the LoRA factors ``lora`` = (a, B, scaling) of delta) returns the modulated
        update out + delta * modulation instead, as one memory-lean autograd node (see modulation.py).
        """
        dtype = mix.dtype
        offset = self._offset(dtype, mix.device)
        weight = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        if out is None:
            return torch.addmm(offset, mix, weight)
        return modulate(out, mix, weight, offset, delta=delta, lora=lora)


_ONES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _one(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant 0-d 1.0 per dtype and device (never written to)."""
    key = (dtype, device)
    if key not in _ONES:
        _ONES[key] = torch.ones((), dtype=dtype, device=device)
    return _ONES[key]


def expert_seed(layer_name: str, adapter_name: str) -> int:
    """Seed of one layer's expert init: follows the user's torch.manual_seed, differs per layer and adapter."""
    return (torch.initial_seed() + zlib.crc32(f"{layer_name}/{adapter_name}".encode())) % (2**63)


class LimeLayer(nn.Module, BaseTunerLayer):
    """LiME wrapper around one tuner layer of the base method (e.g. a ``lora.Linear``)."""

    adapter_layer_names = ("lime_experts",)
    other_param_names = ("lime_routing", "lime_stats")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, context: RoutingContext, layer_name: str = ""
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, BaseTunerLayer):
            raise TypeError(f"LimeLayer wraps a PEFT tuner layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lime_experts = nn.ModuleDict()
        self.lime_routing: dict[str, LimeRoutingSettings] = {}
        self.lime_stats: dict[str, RoutingStats] = {}
        self.layer_name = layer_name
        self._context = context
        self._delta_fn = find_delta_fn(base_layer)
        self._active_adapter = adapter_name
        self.merged_adapters = []
        frozen = self.get_base_layer()
        in_features, out_features = _get_in_out_features(frozen)
        if out_features is None or isinstance(frozen, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(
                f"LiME wraps layers whose output features are the last dimension (Linear, Conv1D, quantized "
                f"linear); {layer_name or 'this layer'} is a {type(frozen).__name__}. Remove it from target_modules."
            )
        self.in_features, self.out_features = in_features, out_features
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create and initialise the experts and routing settings of one adapter."""
        if config.num_experts > self.out_features:
            raise ValueError(
                f"num_experts: {config.num_experts} experts route on the first E output channels, but "
                f"{self.layer_name or type(self.get_base_layer()).__name__} has only {self.out_features}"
            )
        if isinstance(self.base_layer, LoraLayer):
            check_lora_variants(self.base_layer, adapter_name)
        experts = LimeExperts(
            config.num_experts,
            self.out_features,
            config.shared_expert,
            config.expert_init_std,
            seed=expert_seed(self.layer_name, adapter_name),
        )
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        self.lime_experts[adapter_name] = experts.to(device) if device is not None else experts
        self.lime_routing[adapter_name] = LimeRoutingSettings.from_config(config)
        self.lime_stats[adapter_name] = RoutingStats(config.num_experts)
        self._context.decode_tails.pop((id(self), adapter_name), None)
        self.set_adapter(self.active_adapters)

    # --- merging is refused -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names: LiME does not support mixed-adapter batches; use set_adapter")
        h = self.base_layer.get_base_layer()(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        layout = self._context.layout_for(x)
        out = h
        for adapter in self.active_adapters:
            if adapter in self.lime_experts:
                out = self._adapter_forward(adapter, x, h, out, layout)
        return out

    def _adapter_forward(
        self, adapter: str, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor, layout: Optional[TokenLayout]
    ) -> torch.Tensor:
        E = self.lime_routing[adapter].num_experts
        # Training with plain LoRA: keep the (N, r) LoRA state instead of the (N, d) delta for backward; the routed
        # slice of delta is recomputed from it (E of d columns of B, a tiny matmul).
        lora = None
        if torch.is_grad_enabled() and self._delta_fn is lora_delta:
            lora = lora_factors(self.base_layer, adapter, x)
        if lora is not None:
            a, B, scaling = lora
            delta = None
            delta_slice = (F.linear(a, B[:E]) * scaling).to(h.dtype)
        else:
            delta = self._delta_fn(self.base_layer, x, adapter, h)
            if delta is None:
                return out
            if delta.dtype != h.dtype:
                delta = delta.to(h.dtype)
            delta_slice = delta[..., :E]
        weights = self._route(adapter, h[..., :E], delta_slice, layout)
        if weights.dtype != h.dtype:
            weights = weights.to(h.dtype)
        out = self.lime_experts[adapter](weights, out, delta, lora)
        return self._attach_aux_loss(adapter, out)

    def _route(
        self, adapter: str, h_slice: torch.Tensor, delta_slice: torch.Tensor, layout: Optional[TokenLayout]
    ) -> torch.Tensor:
        """Mixing weights (N, E) of the tokens, from the routed slices; records statistics and the aux term."""
        s = self.lime_routing[adapter]
        E = s.num_experts
        logits = routing.routing_logits(
            h_slice, delta_slice, gamma=s.routing_gamma, temperature=s.temperature, norm=s.routing_norm
        )
        if self.training:
            logits = routing.apply_jitter(logits, s.jitter_noise)
        if s.n_gram > 1:
            logits = self._window(adapter, logits, layout, s)
        logits = logits.reshape(-1, E)
        probs = torch.softmax(logits, dim=-1)
        stats = self.lime_stats[adapter]
        # Gradient checkpointing re-runs forward inside backward: record statistics only once.
        record = stats.enabled and torch._C._current_graph_task_id() == -1
        selection = routing.select_experts(
            probs,
            top_k=s.top_k,
            auto_topk=s.auto_topk,
            threshold=s.auto_topk_threshold,
            max_active=s.max_active_experts,
            mode=s.selection,
            selection_temperature=s.selection_temperature,
            need_selected=record,
            logits=logits,
        )
        valid = layout.valid.reshape(-1) if (layout is not None and layout.valid is not None) else None
        if self.training:
            self._balance(adapter, probs, valid, s)
        if record:
            stats.record(probs, selection.selected, valid, token_tasks=self._token_tasks(layout, probs.shape[0]))
        return selection.weights

    def _window(
        self, adapter: str, logits: torch.Tensor, layout: Optional[TokenLayout], s: LimeRoutingSettings
    ) -> torch.Tensor:
        """n-gram routing over (B, T, E) logits; keeps the decoding tail when the layout is the model's tokens."""
        shape = logits.shape
        seq = logits if logits.dim() == 3 else logits.reshape(1, -1, shape[-1])
        valid = layout.valid if layout is not None else None
        if s.ngram_mode == "block":
            if layout is not None and layout.continuing:
                return logits  # a decoded token is the last known token of its block
            positions = layout.positions if layout is not None else None
            if positions is None:
                positions = torch.arange(seq.shape[1], device=seq.device).expand(seq.shape[0], -1)
            return routing.block_window_logits(seq, s.n_gram, positions).reshape(shape)
        past_logits = past_valid = None
        if layout is not None and layout.continuing:
            tail = self._context.decode_tails.get((id(self), adapter))
            if tail is None or tail[0].shape[0] != seq.shape[0]:
                why = self._context.decode_tails_lost or "the cache was built elsewhere or changed outside generate"
                raise RuntimeError(
                    f"n_gram={s.n_gram}: this decoding step continues sequences whose earlier routing windows are "
                    f"unknown ({why}). Assisted / speculative decoding is not supported with n_gram > 1; greedy, "
                    "sampling and beam search are."
                )
            past_logits, past_valid = tail
        segments = layout.segments if layout is not None else None
        windowed = routing.causal_window_mean(
            seq, s.n_gram, valid=valid, segments=segments, past_logits=past_logits, past_valid=past_valid
        )
        if layout is not None:
            self._keep_tail(adapter, seq, valid, past_logits, past_valid, s.n_gram)
        return windowed.reshape(shape)

    def _keep_tail(self, adapter, seq, valid, past_logits, past_valid, n_gram) -> None:
        B, T, _ = seq.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=seq.device)
        if past_logits is not None:
            seq = torch.cat([past_logits.to(seq.dtype), seq], dim=1)
            valid = torch.cat([past_valid, valid], dim=1)
        keep = n_gram - 1
        self._context.decode_tails[(id(self), adapter)] = (seq[:, -keep:].detach(), valid[:, -keep:])

    def _balance(
        self, adapter: str, probs: torch.Tensor, valid: Optional[torch.Tensor], s: LimeRoutingSettings
    ) -> None:
        """Training: the balance terms over valid tokens, as the aux term for the gradient and for get_aux_loss.

        Outside training nothing is computed here: the statistics recompute the per-call terms from the recorded
        probabilities when they are read (telemetry.RoutingStats), which keeps inference and decoding lean.
        """
        importance, kl, _ = routing.balance_terms(probs, valid)
        n_layers = max(self._context.layers_per_adapter.get(adapter, 1), 1)
        aux = s.importance_loss_coef * importance + s.kl_loss_coef * kl
        if torch.is_grad_enabled() and (s.importance_loss_coef or s.kl_loss_coef):
            self._pending_aux = aux / n_layers
        if torch._C._current_graph_task_id() != -1:
            return
        stats = self.lime_stats[adapter]
        stats.last_importance, stats.last_kl = importance.detach(), kl.detach()
        stats.last_aux = aux.detach() / n_layers

    def _token_tasks(self, layout: Optional[TokenLayout], n_tokens: int) -> Optional[torch.Tensor]:
        task_ids = self._context.task_ids
        if layout is None or task_ids is None:
            return None
        task_ids = task_ids.reshape(-1).to(torch.long)
        if task_ids.numel() != self._context.batch_size:
            return None
        return task_ids.repeat_interleave(n_tokens // task_ids.numel())

    def _attach_aux_loss(self, adapter: str, out: torch.Tensor) -> torch.Tensor:
        pending = self.__dict__.pop("_pending_aux", None)
        if pending is None or not out.requires_grad:
            return out
        return inject_aux_loss(out, pending, self._context.aux_loss_scale)

    def __repr__(self) -> str:
        return "lime." + super().__repr__()

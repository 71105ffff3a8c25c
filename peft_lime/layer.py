"""The LiME layer: wraps one adapted layer of the base tuner and modulates its adapter output per token.

y = h + sum over active adapters of delta_a * (1 + w_a @ P_a + g_a * p_s,a), with h the frozen output (computed
once), delta_a the adapter's explicit contribution (see deltas.py) and w_a the routing weights (see routing.py).
One class serves every base tuner: only the registered delta extractor differs, and the wrapped tuner layer follows
every adapter operation (set_adapter, delete_adapter, requires_grad, enable / disable) of this layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from . import fused_route, native_route, native_train_route, routing
from .aux_grad import inject_aux_loss
from .balance import balance_due, global_balance_terms
from .context import RoutingContext
from .deltas import find_extractor
from .experts import LimeExperts, expert_seed
from .layout import TokenLayout, as_sequences
from .low_rank_mix import use_low_rank_mix
from .native_balance import micro_batch_aux
from .opening_logits import opening_only_logits
from .routing_modes import centroid_logits, mode_weights
from .settings import LimeRoutingSettings
from .stats import RoutingStats
from .windowing import pools_over_sequence, window_logits
from .wrappable import ADAPTER_NAMES_ERROR, MERGE_ERROR, check_wrappable


class LimeLayer(nn.Module, BaseTunerLayer):
    """LiME wrapper around one tuner layer of the base method (e.g. a ``lora.Linear``)."""

    adapter_layer_names = ("lime_experts",)
    other_param_names = ("lime_routing", "lime_stats", "lime_static_routing")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, context: RoutingContext, layer_name: str = ""
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, BaseTunerLayer):
            raise TypeError(f"LimeLayer wraps a PEFT tuner layer, got {type(base_layer).__name__}")
        check_wrappable(base_layer, layer_name)
        self.base_layer = base_layer
        self.lime_experts = nn.ModuleDict()
        self.lime_routing: dict[str, LimeRoutingSettings] = {}
        self.lime_stats: dict[str, RoutingStats] = {}
        # Fixed (E,) mixing weights per adapter (static_routing.py): routing is skipped while one is set.
        self.lime_static_routing: dict[str, torch.Tensor] = {}
        self.layer_name = layer_name
        self._context = context
        self._extractor = find_extractor(base_layer)
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create and initialise the experts and routing settings of one adapter."""
        if config.num_experts > self.out_features:
            raise ValueError(
                f"num_experts: {config.num_experts} experts route on the first E output channels, but "
                f"{self.layer_name or type(self.get_base_layer()).__name__} has only {self.out_features}"
            )
        if self._extractor.check is not None:
            self._extractor.check(self.base_layer, adapter_name)
        self.lime_experts[adapter_name] = LimeExperts(
            config.num_experts,
            self.out_features,
            config.shared_expert,
            config.expert_init_std,
            seed=expert_seed(self.layer_name, adapter_name),
            num_tasks=config.num_tasks if config.routing_mode == "task_learned" else None,
            centroids=config.routing_mode == "centroid",
        )
        # Device and dtype of the base layer, as PEFT does for every adapter tensor (PeftModel then upcasts to
        # float32 unless autocast_adapter_dtype=False); experts on the meta device stay there (low_cpu_mem_usage).
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.lime_routing[adapter_name] = LimeRoutingSettings.from_config(config)
        self.lime_stats[adapter_name] = RoutingStats(config.num_experts, self.lime_experts[adapter_name].weight.device)
        self._context.windows.forget(lambda key: key == (id(self), adapter_name))
        self.set_adapter(self.active_adapters)

    # --- the wrapped tuner layer follows every adapter operation ---------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        self.base_layer.set_adapter(adapter_names, inference_mode=inference_mode)
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_layer.delete_adapter(adapter_name)
        super().delete_adapter(adapter_name)
        self._context.windows.forget(lambda key: key == (id(self), adapter_name))

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.base_layer.set_requires_grad(adapter_names, requires_grad=requires_grad)
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self.base_layer.enable_adapters(enabled)
        super().enable_adapters(enabled)

    # --- merging is refused -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(ADAPTER_NAMES_ERROR)
        h = self.base_layer.get_base_layer()(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        layout = self._context.layout_for(x, self)
        out = h
        for adapter in self.active_adapters:
            if adapter in self.lime_experts:
                out = self._adapter_forward(adapter, x, h, out, layout)
        return out

    def _adapter_forward(
        self, adapter: str, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor, layout: Optional[TokenLayout]
    ) -> torch.Tensor:
        # Written for the fewest Python steps and tensor ops: decoding runs this once per layer and token, where every
        # op costs its dispatch (narrow rather than [..., :E] indexing, dtype checks before casts).
        E = self.lime_routing[adapter].num_experts
        dtype, d = h.dtype, h.shape[-1]
        # A low-rank tuner as factors: training keeps the (N, r) hidden state instead of the (N, d) delta for
        # backward, and large calls never build delta at all (one GEMM, low_rank_mix.py). The routed slice of delta
        # is computed from the factors (E of d rows of B, a tiny matmul). A small no-grad call (decoding) builds
        # delta, the plain modulation being the fewest ops there; the native call takes the scaling itself.
        extractor = self._extractor
        delta = None
        low_rank = extractor.factors(self.base_layer, adapter, x) if extractor.factors is not None else None
        if low_rank is not None and not (torch.is_grad_enabled() or use_low_rank_mix(h.numel() // d, d)):
            (a, B, scaling), low_rank = low_rank, None
            unscaled = F.linear(a, B)
            if (y := native_route.modulate(self, adapter, h, out, unscaled, scaling)) is not None:
                return y  # decoding: routing and modulation as one native call (native_route.py)
            delta = unscaled * scaling
        elif low_rank is not None:
            a, B, scaling = low_rank
            delta_slice = F.linear(a, B.narrow(0, 0, E)) * scaling
        else:
            delta = extractor.delta(self.base_layer, x, adapter, h)
            if delta is None:
                return out
        if delta is not None:
            if delta.dtype != dtype:
                delta = delta.to(dtype)
            delta_slice = delta.narrow(-1, 0, E)
        elif delta_slice.dtype != dtype:
            delta_slice = delta_slice.to(dtype)
        if delta is not None and (y := native_route.modulate(self, adapter, h, out, delta)) is not None:
            return y  # decoding: routing and modulation as one native call (native_route.py)
        static = self.lime_static_routing.get(adapter)
        if low_rank is not None and (native := native_route.weights(self, adapter, h, delta_slice)) is not None:
            weights, aux = native, None  # a large no-grad call: the routing math as one native call
        elif static is None:
            h_slice = h.narrow(-1, 0, E)
            if h_slice.dim() == 2:  # token rows: windows must not run across sequences (layout.py)
                h_slice, delta_slice = as_sequences(h_slice, layout), as_sequences(delta_slice, layout)
            weights, aux = self._route(adapter, h_slice, delta_slice, layout, h)
        else:
            weights, aux = static.to(device=h.device, dtype=dtype).expand(delta_slice.numel() // E, E), None
        if self._context.weights_capture is not None:
            self._context.weights_capture(self, adapter, weights, layout)
        if aux is not None and weights.requires_grad:
            # On the (N, E) weights, not the (N, d) output: the injection's copy stays tiny, and the output stays the
            # experts' own tensor, which a model may modify in place (Falcon adds attention into its MLP output).
            weights = inject_aux_loss(weights, aux, self._context.aux_loss_scale)
        if weights.dtype != dtype:
            weights = weights.to(dtype)
        # The single-GEMM path may accumulate into the base output h itself (saving an (N, d) copy) when h is a plain
        # tensor (not a view, which autograd may forbid modifying) and no later adapter reads it for its routing.
        inplace = low_rank is not None and out is h and h._base is None and adapter == self._last_lime_adapter()
        return self.lime_experts[adapter](weights, out, delta, low_rank, inplace)

    def _last_lime_adapter(self) -> Optional[str]:
        active = [name for name in self.active_adapters if name in self.lime_experts]
        return active[-1] if active else None

    def _route(
        self,
        adapter: str,
        h_slice: torch.Tensor,
        delta_slice: torch.Tensor,
        layout: Optional[TokenLayout],
        h: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mixing weights (N, E) of the tokens and, when training with a balance loss, the aux term (per layer).
        ``h``: the whole frozen output, read by routing_mode="centroid" only."""
        s = self.lime_routing[adapter]
        E = s.num_experts
        stats = self.lime_stats[adapter]
        # Gradient checkpointing re-runs forward inside backward (eager): record statistics only once. A compiled
        # graph runs this Python once, when traced; its recomputation never comes back here.
        record = stats.enabled and self._context.records_stats(self.training)
        first_pass = (record or self.training) and (
            torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1
        )
        record = record and first_pass
        if s.routing_mode not in ("token", "centroid"):  # ablations without a router (routing_modes.py): no balance
            n = h_slice.numel() // E
            tasks = self._token_tasks(layout, n)
            experts = self.lime_experts[adapter]
            weights = mode_weights(s.routing_mode, E, n, h_slice.device, tasks, experts.task_logits, self.layer_name)
            if record:
                valid = layout.valid.reshape(-1) if layout is not None and layout.valid is not None else None
                stats.record(weights, weights > 0, valid, token_tasks=tasks)
            return weights, None
        if fused_route.supports(s):  # the math below as one compiled region (fused_route.py)
            return fused_route.route(self, adapter, h_slice, delta_slice, layout, record, first_pass)
        native = native_train_route.route(s, h_slice, delta_slice, self.training)
        if native is not None:  # the default routing as one native call, forward and backward (native_train_route.py)
            selected = native_train_route.selected(native[0], s) if record else None
            probs, selection = native[0], routing.Selection(weights=native[1], selected=selected)
        else:
            probs, selection = self._routing_ops(adapter, s, h, h_slice, delta_slice, layout, record)
        valid = None
        if (self.training or record) and layout is not None and layout.valid is not None:
            valid = layout.valid.reshape(-1)
        aux = None
        if self.training and balance_due(self, adapter, s.balance_interval, first_pass):
            n_layers = max(self._context.layers_per_adapter.get(adapter, 1), 1)
            if s.balance_scope == "global" and (s.importance_loss_coef or s.kl_loss_coef):
                # Statistics of the accumulation window over all data-parallel ranks (balance.py; eager only).
                importance, kl = global_balance_terms(self, adapter, probs, valid)
                aux = (s.importance_loss_coef * importance + s.kl_loss_coef * kl) / n_layers
            else:  # one native call forward and backward where it applies (native_balance.py)
                aux = micro_batch_aux(probs, valid, s.importance_loss_coef, s.kl_loss_coef, n_layers)
            if first_pass:
                stats.record_aux(aux)
            if not (torch.is_grad_enabled() and (s.importance_loss_coef or s.kl_loss_coef)):
                aux = None
        if record:
            stats.record(probs, selection.selected, valid, token_tasks=self._token_tasks(layout, probs.shape[0]))
        return selection.weights, aux

    def _routing_ops(
        self, adapter: str, s: LimeRoutingSettings, h: torch.Tensor, h_slice: torch.Tensor, delta_slice: torch.Tensor,
        layout: Optional[TokenLayout], record: bool,
    ) -> tuple[torch.Tensor, routing.Selection]:
        """Probs and selection of one call with routing.py's torch ops (every setting; the reference of the native
        and fused paths)."""
        E = s.num_experts
        centroid_prefix = s.routing_mode == "centroid" and s.ngram_mode == "prefix"
        if s.routing_mode == "centroid":  # cosine to calibrated centroids of the whole frozen output (centroids.py)
            experts = self.lime_experts[adapter]

            def logits_of(x: torch.Tensor) -> torch.Tensor:
                return centroid_logits(x, experts.centroids, experts.centroid_center, s.temperature)

            logits = None
            if centroid_prefix:  # prefix routing reads the opening's logits only (opening_logits.py)
                complete = self._context.windows.opening_complete((id(self), adapter))
                logits = opening_only_logits(h, s.n_gram, layout, logits_of, E, complete)
            logits = (logits_of(h) if logits is None else logits).reshape(h_slice.shape)
        else:
            logits = routing.routing_logits(
                h_slice, delta_slice, gamma=s.routing_gamma, temperature=s.temperature, norm=s.routing_norm
            )
        if self.training:
            logits = routing.apply_jitter(logits, s.jitter_noise)
        if pools_over_sequence(s.n_gram, s.ngram_mode):
            windows = self._context.windows
            key = (id(self), adapter)
            logits = window_logits(logits, s.n_gram, s.ngram_mode, layout, windows, key, not self.training, centroid_prefix)
        logits = logits.reshape(-1, E)
        probs = routing.softmax_over_experts(logits)
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
        return probs, selection

    def _token_tasks(self, layout: Optional[TokenLayout], n_tokens: int) -> Optional[torch.Tensor]:
        task_ids = self._context.task_ids
        if layout is None or task_ids is None:
            return None
        task_ids = task_ids.reshape(-1).to(torch.long)
        if task_ids.numel() != layout.batch_size:
            return None
        return task_ids.repeat_interleave(n_tokens // task_ids.numel())

    def __repr__(self) -> str:
        return "lime." + super().__repr__()

"""LimeRoutingSettings: the per-adapter routing settings a LiME layer keeps, copied from LimeConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


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
    balance_scope: str = "micro_batch"
    routing_mode: str = "token"
    num_tasks: Optional[int] = None
    balance_interval: int = 1

    @classmethod
    def from_config(cls, config: Any) -> LimeRoutingSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

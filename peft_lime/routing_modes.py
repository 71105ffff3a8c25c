"""Mixing weights without the router: the ablations behind ``LimeConfig.routing_mode`` (pure functions).

They answer "what does routing add?": with ``"uniform"`` every token mixes all experts equally, so the experts act
as one learned per-channel scale of the adapter output; with the oracle modes a token's weights come from its
sample's task id, which the router never sees: ``"task"`` sends task t to expert t mod E (one-hot), ``"task_learned"``
learns one softmax mix per task. The oracle is the ceiling of what a router could add with modulation experts on a
benchmark whose task ids are known; "uniform" is the floor.
"""

from __future__ import annotations

from typing import Optional

import torch

TASK_IDS_ERROR = (
    "routing_mode={mode!r} routes by task id and needs one per sample on every call: call "
    "peft_lime.enable_task_ids(peft_model) once, then pass task_ids=<(batch,) long tensor> to the model's forward "
    "(layer {layer}: {why})"
)


def uniform_weights(n_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """(N, E) weights 1 / E: every token mixes every expert equally."""
    return torch.full((n_tokens, num_experts), 1.0 / num_experts, device=device)


def task_weights(token_tasks: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, E) one-hot weights: a token of task t goes to expert t mod E."""
    return torch.nn.functional.one_hot(token_tasks.remainder(num_experts), num_experts).float()


def task_mix_weights(task_logits: torch.Tensor, token_tasks: torch.Tensor) -> torch.Tensor:
    """(N, E) weights softmax(task_logits[t]) of each token's task t (task_logits: (num_tasks, E), learned)."""
    num_tasks = task_logits.shape[0]
    if token_tasks.numel() and (int(token_tasks.min()) < 0 or int(token_tasks.max()) >= num_tasks):
        raise ValueError(
            f"task_ids: routing_mode='task_learned' was configured with num_tasks={num_tasks}, so task ids must be in "
            f"[0, {num_tasks - 1}], got values in [{int(token_tasks.min())}, {int(token_tasks.max())}]"
        )
    return torch.softmax(task_logits.float(), dim=-1).index_select(0, token_tasks)


def mode_weights(
    mode: str,
    num_experts: int,
    n_tokens: int,
    device: torch.device,
    token_tasks: Optional[torch.Tensor],
    task_logits: Optional[torch.Tensor],
    layer_name: str = "",
    missing_why: str = "no task ids reached it",
) -> torch.Tensor:
    """The (N, E) float32 mixing weights of a routing mode other than "token" (rows sum to 1)."""
    if mode == "uniform":
        return uniform_weights(n_tokens, num_experts, device)
    if token_tasks is None:
        raise ValueError(TASK_IDS_ERROR.format(mode=mode, layer=layer_name or "?", why=missing_why))
    token_tasks = token_tasks.to(device=device, dtype=torch.long)
    if mode == "task":
        if token_tasks.numel() and int(token_tasks.min()) < 0:
            raise ValueError(f"task_ids: must be >= 0 for routing_mode='task', got {int(token_tasks.min())}")
        return task_weights(token_tasks, num_experts)
    if mode == "task_learned":
        return task_mix_weights(task_logits, token_tasks)
    raise ValueError(f"routing_mode: unknown {mode!r}")


def centroid_logits(
    h: torch.Tensor, centroids: torch.Tensor, center: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(..., E) logits cos(h - center, c_i) / temperature of routing_mode="centroid" (``centroids`` rows unit norm).

    The whole width of the frozen output is read (E x d multiply-adds per token, E / d_in of the frozen layer's
    cost), so the route sees what the token's representation knows, not 8 fixed channels of it. No gradient flows
    into the centroids (buffers); the logits do depend on h, i.e. on the adapters of earlier layers.
    """
    u = torch.nn.functional.normalize(h.float() - center, dim=-1, eps=1e-6)
    return torch.nn.functional.linear(u, centroids) / temperature

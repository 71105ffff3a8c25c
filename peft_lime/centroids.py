"""Calibration of ``routing_mode="centroid"``: k-means centroids of each layer's frozen output, fitted without labels.

The paper's router reads E fixed channels of one token, which carry little of what the token's representation knows
(on the separation benchmark a linear probe reads the task from them at 0.51, from the whole output at ~1.0). The
centroid router reads the whole frozen output h instead and compares it with E fixed directions: the centroids of
k-means over the calibration tokens' features. It has no trainable parameters; the centroids are buffers, saved with
the adapter.

Features, per layer: u_t = normalise(h_t - mean h) over the calibration tokens; with ``n_gram = n`` the router then
averages the logits u_t . c_i of tokens t-n+1..t of the same sequence (causal windows, windowing.py), which is
(mean of u over the window) . c_i: so k-means runs on those causal window means (normalised), the very features the
router compares with the centroids (with ``ngram_mode="prefix"``: the means of each sequence's opening,
prefix_pooling.py). Spherical k-means (cosine), k-means++ seeding from a fixed seed.

Layers are calibrated together in one pass: while a layer has no centroids its routing is uniform (all logits 0), so
later layers see the outputs of uniformly routed earlier layers; at initialisation (experts within 10% of 1) that is
close to what they see once every layer routes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .prefix_pooling import prefix_mean
from .routing import causal_window_mean

logger = logging.getLogger(__name__)


def _centroid_layers(model: nn.Module, adapter_name: Optional[str]) -> list[tuple[Any, str]]:
    from .layer import LimeLayer

    out = []
    for module in model.modules():
        if not isinstance(module, LimeLayer):
            continue
        name = adapter_name or module.active_adapters[0]
        settings = module.lime_routing.get(name)
        if settings is not None and settings.routing_mode == "centroid":
            out.append((module, name))
    if not out:
        raise ValueError(
            f"model: no LiME layer of adapter {adapter_name or '(active)'!r} has routing_mode='centroid'; nothing to fit"
        )
    return out


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """(k, d) unit centroids of the unit rows of ``x`` (n, d): k-means++ seeding, then Lloyd steps on the cosine."""
    if x.shape[0] < k:
        raise ValueError(f"batches: {x.shape[0]} calibration tokens cannot give {k} centroids; pass more batches")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(x.shape[0], (1,), generator=gen)]
    for _ in range(1, k):
        dist = (1.0 - x @ centroids.T).clamp_min(0).min(dim=1).values
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full_like(dist, 1.0 / len(dist))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=gen)]])
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centroid
        centroids = nn.functional.normalize(sums, dim=1)
    return centroids


@torch.no_grad()
def fit_routing_centroids(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: Optional[str] = None,
    max_tokens: int = 8192,
    iters: int = 30,
    seed: int = 0,
) -> dict[str, int]:
    """Fit the routing centroids of every ``routing_mode="centroid"`` layer on calibration batches (no labels).

    Args:
        model: the PeftModel (or any model with LiME layers), called as ``model(**batch)`` in eval mode without
            gradients (its training mode is restored after). ``task_ids`` in a batch are dropped: tasks are not used.
        batches: model inputs, e.g. a few batches of the training data; padding is excluded through the
            attention mask, packed sequences through position ids (as in routing).
        adapter_name: the LiME adapter (default: each layer's active one).
        max_tokens: calibration tokens kept per layer (the first ones seen).
        iters / seed: k-means iterations and seed.

    Returns:
        {layer name: number of calibration tokens used}.
    """
    layers = _centroid_layers(model, adapter_name)
    captured: dict[int, list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]] = {
        i: [] for i in range(len(layers))
    }
    counts = [0] * len(layers)

    def hook(index: int, layer: Any):
        def capture(_module: nn.Module, args: tuple, h: torch.Tensor) -> None:
            if counts[index] >= max_tokens:
                return
            x = args[0]
            layout = layer._context.layout_for(x, layer)
            seq = h.float()
            if seq.dim() == 2:  # flattened (B * T, d) rows (OPT's MLP): restore the call's layout when it has one
                seq = layout.unflatten(seq) if layout is not None else seq.unsqueeze(0)
            valid = layout.valid if layout is not None else None
            segments = layout.segments if layout is not None else None
            captured[index].append((seq.reshape(-1, seq.shape[-2], seq.shape[-1]).cpu(), valid, segments))
            counts[index] += int(valid.sum()) if valid is not None else seq.shape[:-1].numel()

        return capture

    handles = [
        layer.base_layer.get_base_layer().register_forward_hook(hook(i, layer)) for i, (layer, _) in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "task_ids"}
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    used = {}
    for i, (layer, name) in enumerate(layers):
        entries = captured[i]
        if not entries:
            raise ValueError(f"batches: layer {layer.layer_name} was never called during calibration")
        experts = layer.lime_experts[name]
        settings = layer.lime_routing[name]
        flat = [(s.reshape(-1, s.shape[-1]), None if v is None else v.reshape(-1).cpu()) for s, v, _ in entries]
        all_h = torch.cat([f[v] if v is not None else f for f, v in flat])
        center = all_h.mean(dim=0)
        features = []
        for seq, valid, segments in entries:
            u = nn.functional.normalize(seq - center, dim=-1, eps=1e-6)
            v = None if valid is None else valid.cpu()
            seg = None if segments is None else segments.cpu()
            if settings.ngram_mode == "prefix":  # the router compares the opening's mean with the centroids
                u = prefix_mean(u, settings.n_gram, valid=v, segments=seg)[0]
            elif settings.n_gram > 1:
                u = causal_window_mean(u, settings.n_gram, valid=v, segments=seg)
            u = u.reshape(-1, u.shape[-1])
            features.append(u[valid.reshape(-1).cpu()] if valid is not None else u)
        x = nn.functional.normalize(torch.cat(features)[:max_tokens], dim=-1, eps=1e-6)
        centroids = spherical_kmeans(x, settings.num_experts, iters=iters, seed=seed)
        experts.centroids.copy_(centroids.to(experts.centroids))
        experts.centroid_center.copy_(center.to(experts.centroid_center))
        used[layer.layer_name] = int(x.shape[0])
    logger.info("fitted routing centroids of %d layers (%d tokens each at most)", len(layers), max_tokens)
    return used

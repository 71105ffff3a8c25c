"""Static routing: hold every LiME layer's mixing weights fixed, and measure the weights to hold.

With fixed weights w (one (E,) vector per layer) the modulation m = 1 + g * p_s + w @ (P - 1) no longer depends on the
input, so LiME becomes the base adapter with its output scaled channel-wise by m: for LoRA exactly a LoRA with
B' = diag(m) B (see export.py). ``collect_routing_profiles`` measures the weights on data (the mean mixing weights of
the valid tokens of each task, and of all tokens), ``static_routing`` runs the model with them: what an exported
adapter computes, in the LiME model itself.

A profile is a dict {layer name: (E,) float32 tensor}, the layer names being those of the base model's modules
(``LimeLayer.layer_name``); profiles are saved as one safetensors file by ``save_routing_profiles``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .layer import LimeLayer
from .layout import TokenLayout

RoutingProfile = dict[str, torch.Tensor]
GLOBAL_PROFILE = "global"
# Profile and layer names are joined with this in the safetensors keys (it cannot occur in a module path).
_KEY_SEPARATOR = "::"


def _lime_layers(model: nn.Module) -> list[LimeLayer]:
    layers = [m for m in model.modules() if isinstance(m, LimeLayer)]
    if not layers:
        raise ValueError("model: no LiME layer found (pass the PeftModel returned by get_peft_model with a LimeConfig)")
    return layers


def _adapter_of(layers: list[LimeLayer], adapter_name: Optional[str]) -> str:
    if adapter_name is not None:
        if not any(adapter_name in layer.lime_experts for layer in layers):
            known = sorted({a for layer in layers for a in layer.lime_experts})
            raise ValueError(f"adapter_name: no LiME adapter {adapter_name!r} in the model (it has {known})")
        return adapter_name
    active = layers[0].active_adapters
    if len(active) != 1:
        raise ValueError(f"adapter_name: the model has {len(active)} active adapters {active}; name one")
    return active[0]


def check_mixing_weights(layer_name: str, weights: Any, num_experts: int) -> torch.Tensor:
    """One layer's profile entry as a flat float32 tensor; ValueError unless it holds ``num_experts`` finite weights
    that are >= 0 and sum to 1. Static routing and export both check with this, so an export never folds a route
    that the LiME model could not run."""
    weights = torch.as_tensor(weights, dtype=torch.float32).detach().flatten()
    if weights.numel() != num_experts or not torch.isfinite(weights).all():
        raise ValueError(f"profile[{layer_name!r}]: expected {num_experts} finite mixing weights, got {weights}")
    # Mixing weights are convex in every routing mode, and the layer's fast path relies on it (low_rank_mix.py).
    if (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-4:
        raise ValueError(
            f"profile[{layer_name!r}]: mixing weights must be >= 0 and sum to 1 (as routing makes them), "
            f"got {weights.tolist()} (sum {float(weights.sum()):.6g})"
        )
    return weights


def set_static_routing(
    model: nn.Module, profile: Optional[Mapping[str, torch.Tensor]], adapter_name: Optional[str] = None
) -> None:
    """Route every token of every LiME layer with the fixed weights of ``profile``; ``None`` restores routing.

    Args:
        model: a model with LiME layers (PeftModel, LimeModel or the adapted base model).
        profile: {layer name: (E,) mixing weights}, one entry per LiME layer of the adapter (e.g. an entry of
            ``collect_routing_profiles``'s result), or None to route per token again.
        adapter_name: the LiME adapter (default: the active one).

    Raises:
        ValueError: a layer is missing from ``profile``, a name matches no layer, or a vector has the wrong size, is
            not finite, or is not convex (weights >= 0 summing to 1).
    """
    layers = _lime_layers(model)
    adapter = _adapter_of(layers, adapter_name)
    layers = [layer for layer in layers if adapter in layer.lime_experts]
    if profile is None:
        for layer in layers:
            layer.lime_static_routing.pop(adapter, None)
        return
    names = {layer.layer_name for layer in layers}
    missing, unknown = sorted(names - set(profile)), sorted(set(profile) - names)
    if missing or unknown:
        raise ValueError(
            f"profile: its layers must be the LiME layers of adapter {adapter!r}; missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unknown {unknown[:3]}{' ...' if len(unknown) > 3 else ''}"
        )
    checked = {}
    for layer in layers:
        E = layer.lime_routing[adapter].num_experts
        checked[layer] = check_mixing_weights(layer.layer_name, profile[layer.layer_name], E)
    for layer, weights in checked.items():
        layer.lime_static_routing[adapter] = weights.to(layer.lime_experts[adapter].weight.device)


@contextlib.contextmanager
def static_routing(
    model: nn.Module, profile: Mapping[str, torch.Tensor], adapter_name: Optional[str] = None
) -> Iterator[None]:
    """Context manager form of ``set_static_routing``: per-token routing comes back on exit."""
    set_static_routing(model, profile, adapter_name)
    try:
        yield
    finally:
        set_static_routing(model, None, adapter_name)


class RoutingProfileRecorder:
    """Sums the mixing weights of every LiME layer's valid tokens, overall and per task id (see
    ``recording_routing_profiles``); ``profiles()`` turns them into means."""

    def __init__(self, context: Any, adapter: str, task_names: Sequence[str]) -> None:
        self._context, self.adapter, self.task_names = context, adapter, list(task_names)
        self._sums: dict[str, torch.Tensor] = {}  # layer name -> (1 + tasks, E + 1): weight sums, then token count

    @torch.no_grad()
    def __call__(self, layer: LimeLayer, adapter: str, weights: torch.Tensor, layout: Optional[TokenLayout]) -> None:
        if adapter != self.adapter:
            return
        E, n_tasks = weights.shape[-1], len(self.task_names)
        w = weights.reshape(-1, E).float()
        valid = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        if layout is not None and layout.valid is not None:
            valid = layout.valid.reshape(-1).float()
        rows = torch.cat([w * valid[:, None], valid[:, None]], dim=1)
        acc = self._sums.setdefault(layer.layer_name, torch.zeros(1 + n_tasks, E + 1, device=w.device))
        acc[0] += rows.sum(0)
        task_ids = self._context.task_ids
        if n_tasks and layout is not None:
            if task_ids is None:
                raise ValueError("task_ids: task names were given, so every call needs task ids (one per row)")
            task_ids = task_ids.reshape(-1).to(device=w.device, dtype=torch.long)
            if w.shape[0] % task_ids.numel() or int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks:
                raise ValueError(f"task_ids: one id per row of input_ids, each in 0..{n_tasks - 1}; got {task_ids}")
            acc.index_add_(0, task_ids.repeat_interleave(w.shape[0] // task_ids.numel()) + 1, rows)

    def profiles(self) -> dict[str, RoutingProfile]:
        """{"global": profile, task name: profile, ...}: mean mixing weights per layer."""
        out: dict[str, RoutingProfile] = {}
        for index, name in enumerate([GLOBAL_PROFILE, *self.task_names]):
            counts = [float(acc[index, -1]) for acc in self._sums.values()]
            if not counts or min(counts) <= 0:
                raise ValueError(f"no valid token of {name!r} was routed: cannot measure its routing")
            out[name] = {layer: (acc[index, :-1] / acc[index, -1]).cpu() for layer, acc in self._sums.items()}
        return out


@contextlib.contextmanager
def recording_routing_profiles(
    model: nn.Module, task_names: Optional[Sequence[str]] = None, adapter_name: Optional[str] = None
) -> Iterator[RoutingProfileRecorder]:
    """Record the mixing weights of every forward made inside the block (any call path: a VLM wrapper, generate).

    Per-task profiles read each call's task ids as the per-task telemetry does: ``task_ids=`` on the PeftModel call
    with ``peft_lime.enable_task_ids(model)``, one id per row (an index into ``task_names``).

        with peft_lime.recording_routing_profiles(model, ["qa", "sql"]) as recorder:
            for batch in loader: model(**batch)
        profiles = recorder.profiles()
    """
    layers = _lime_layers(model)
    names = list(task_names or [])
    if GLOBAL_PROFILE in names or len(set(names)) != len(names):
        raise ValueError(f"task_names: must be distinct and must not be {GLOBAL_PROFILE!r}; got {names}")
    context = layers[0]._context
    if context.weights_capture is not None:
        raise RuntimeError("recording_routing_profiles: already recording on this model")
    recorder = RoutingProfileRecorder(context, _adapter_of(layers, adapter_name), names)
    context.weights_capture = recorder
    try:
        yield recorder
    finally:
        context.weights_capture = None


@torch.no_grad()
def collect_routing_profiles(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    task_names: Optional[Sequence[str]] = None,
    adapter_name: Optional[str] = None,
) -> dict[str, RoutingProfile]:
    """Mean mixing weights (after selection) of the valid tokens, overall and per task, in every LiME layer.

    The model runs in eval mode without gradients (the training mode is restored after). Modulation is linear in
    the weights, so a profile's weights give the mean modulation of the tokens they were measured on.

    Args:
        model: the PeftModel (or any model with LiME layers) to run; called as ``model(**batch)``.
        batches: model inputs (e.g. a DataLoader); with ``task_names``, each batch holds ``task_ids`` (one integer
            id per row, an index into ``task_names``), which is removed before the call.
        task_names: names of the task ids; None measures the "global" profile only.
        adapter_name: the LiME adapter (default: the active one).

    Returns:
        {"global": profile, task name: profile, ...}, each {layer name: (E,) weights}.
    """
    was_training = model.training
    model.eval()
    try:
        with recording_routing_profiles(model, task_names, adapter_name) as recorder:
            context = recorder._context
            for batch in batches:
                batch = dict(batch)
                task_ids = batch.pop("task_ids", None)
                if task_names and task_ids is None:
                    raise ValueError("batches: task_names were given, so every batch needs task_ids")
                # read by the wrapped model's pre-hook, as enable_task_ids does with a PeftModel's task_ids
                context.pending_task_ids = torch.as_tensor(task_ids) if task_names else None
                model(**batch)
    finally:
        model.train(was_training)
    return recorder.profiles()


def save_routing_profiles(profiles: Mapping[str, Mapping[str, torch.Tensor]], path: Union[str, Path]) -> None:
    """Write profiles (as returned by ``collect_routing_profiles``) to one safetensors file."""
    from safetensors.torch import save_file

    tensors = {}
    for profile, weights in profiles.items():
        if _KEY_SEPARATOR in profile or not profile:
            raise ValueError(f"profiles: profile names must be non-empty and free of {_KEY_SEPARATOR!r}: {profile!r}")
        for layer, w in weights.items():
            tensors[f"{profile}{_KEY_SEPARATOR}{layer}"] = torch.as_tensor(w, dtype=torch.float32).contiguous()
    save_file(tensors, str(path), metadata={"format": "peft_lime.routing_profiles"})


def load_routing_profiles(path: Union[str, Path]) -> dict[str, RoutingProfile]:
    """Read a file written by ``save_routing_profiles``; ValueError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:  # its message names no file; the command line shows this one line
        raise ValueError(f"{path}: not a safetensors file of routing profiles ({exc})") from exc
    profiles: dict[str, RoutingProfile] = {}
    for key, w in tensors.items():
        profile, sep, layer = key.partition(_KEY_SEPARATOR)
        if not sep:
            raise ValueError(f"{path}: {key!r} is not a routing-profile key (written by save_routing_profiles?)")
        profiles.setdefault(profile, {})[layer] = w
    return profiles

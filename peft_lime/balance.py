"""Global-batch load balancing: ``LimeConfig.balance_scope="global"``.

A balance loss computed over each micro-batch pushes every micro-batch (and so every sequence, every single-task
batch) towards uniform routing, which kills expert specialisation. Qiu et al. 2025 ("Demons in the Detail", used in
Qwen3-MoE) and Megatron-core's global aux loss compute it over the global batch instead: the routing statistics
summed over the gradient-accumulation window and all data-parallel ranks. Here, per wrapped layer and adapter:

- ``S_r`` (E,) = sum of the routing probabilities of rank r's valid tokens in the current micro-batch, ``n_r`` their
  count. ONE all-reduce of the (E + 1,) vector ``[S_r, n_r]`` gives ``S = sum_r S_r`` and ``n = sum_r n_r``.
- A running window adds the all-reduced sums of the micro-batches seen since the last optimizer step (detached,
  Megatron-style): the reference statistics of micro-batch k are those of micro-batches 1..k of all ranks,
  ``pbar_ref = S_1..k / N_1..k``. On the last micro-batch of the window they are exactly the global batch's.
- The term's VALUE is ``f(pbar_ref)`` (importance and kl_uniform, see routing.balance_terms_of_mean); its gradient
  w.r.t. this rank's probabilities is ``W * grad f(pbar_ref) / n`` (W ranks), obtained by evaluating f at
  ``pbar_ref + (S_r - S_r.detach()) * W / n``. DDP / FSDP average gradients over ranks, which cancels W: the averaged
  gradient is ``grad f(pbar_ref) / n * sum_r dS_r``, the gradient of one big batch holding every rank's tokens.
- Per-token weight under accumulation: the gradient is normalised by the CURRENT micro-batch's global token count n
  (as Megatron does), not by the window's N_1..k. With ``aux_loss_scale = 1 / accumulation steps`` every token of
  the window then weighs ``1 / (steps * n)``, which is the big-batch weight ``1 / N_window`` when the micro-batches
  hold equal numbers of valid tokens, and the same per-token weight the "micro_batch" scope uses. (Normalising by
  N_1..k would weigh micro-batch k's tokens k times too little.) The gradient DIRECTION is exact on the last
  micro-batch of a window; earlier micro-batches use the partial reference (nothing later is known yet).

Without accumulation and data parallelism the global term equals the micro-batch term, value and gradient.

The window closes at every optimizer step: a global ``torch.optim`` step post-hook, installed once, the first time
a global-scope layer trains, resets every window of the process, so Trainer, TRL, accelerate and plain loops need
no action. Any optimizer's step closes every window (a second optimizer stepping mid-window would cut it short).
A step that is skipped (fp16 GradScaler overflow) does not close it. Custom loops that do not step a
``torch.optim.Optimizer`` call :func:`reset_balance_window` (a window that passes ``MAX_WINDOW_FORWARDS`` training
forwards warns, once per process, that nothing closes it). Every training-mode forward between two steps joins
the window, with or without gradient (not under ``torch.inference_mode``, which uses the micro-batch terms);
evaluation runs in eval mode and never does.

Limitations: the reduction runs over all ranks of the default process group, i.e. assumes pure data parallelism
(DDP, FSDP, ZeRO); under tensor / pipeline / context parallelism ranks that see the same tokens would be counted
twice. It runs eagerly: under ``torch.compile`` this function is a graph break (so ``fullgraph=True`` refuses the
global scope; the default "micro_batch" scope compiles without break). Every rank must make the same training
forwards, as data parallelism requires anyway: each one is a collective.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from .routing import balance_terms, balance_terms_of_mean


class BalanceWindow:
    """The routing statistics of one layer and adapter since the last optimizer step (all ranks, detached)."""

    def __init__(self) -> None:
        # (E + 1,) float32: summed routing probabilities of the valid tokens of the window's micro-batches so far,
        # the current one included, over all ranks; the last entry is their token count. None: the window is empty.
        self.sums: Optional[torch.Tensor] = None
        # World size / global token count of the current micro-batch: the gradient multiplier, kept so that the
        # recomputation of a checkpointed forward (inside backward) neither communicates nor counts twice. The
        # recomputation reuses the layer's LATEST forward: right when each forward's backward follows it (trainers),
        # not when several forwards precede one backward with checkpointing.
        self.grad_scale: Optional[torch.Tensor] = None
        self.forwards = 0  # training forwards in the window: a window that never closes is a loop without a step

    def reset(self) -> None:
        self.sums, self.grad_scale, self.forwards = None, None, 0


# Windows per LiME layer (weakly held: a deleted model takes its windows with it), then per adapter name.
_WINDOWS: weakref.WeakKeyDictionary[nn.Module, dict[str, BalanceWindow]] = weakref.WeakKeyDictionary()
_STEP_HOOK: Optional[RemovableHandle] = None
# More training forwards than this in one window means no optimizer step closes it (see _warn_if_never_closed).
MAX_WINDOW_FORWARDS = 1000
_warned_never_closed = False


def window_of(layer: nn.Module, adapter: str) -> BalanceWindow:
    """The balance window of one layer and adapter (created empty on first use)."""
    windows = _WINDOWS.get(layer)
    if windows is None:
        windows = _WINDOWS[layer] = {}
    return windows.setdefault(adapter, BalanceWindow())


def data_parallel_sum(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of ``local`` over the data-parallel ranks, number of ranks): one all-reduce, none on a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return local, 1
    world = dist.get_world_size()
    if world == 1:
        return local, 1
    reduced = local.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced, world


def reset_balance_window(model: nn.Module) -> None:
    """Close the balance window of every LiME layer of ``model``: the next micro-batch starts a new global batch.

    Needed only by custom loops whose update is not a ``torch.optim.Optimizer.step`` (any optimizer step closes the
    windows by itself, see the module docstring); call it where the optimizer step would be, on every rank.
    """
    for module in model.modules():
        for window in _WINDOWS.get(module, {}).values():
            window.reset()


def _close_all_windows(optimizer: Any, args: Any, kwargs: Any) -> None:
    for windows in list(_WINDOWS.values()):
        for window in windows.values():
            window.reset()


def ensure_step_hook() -> None:
    """Install (once per process) the optimizer step post-hook that closes the windows."""
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_close_all_windows)


def _warn_if_never_closed(window: BalanceWindow, adapter: str) -> None:
    """Warn once per process when a window outgrows any real accumulation: the loop updates the weights without a
    ``torch.optim`` step, so the window (its token count too) grows forever and the balance loss goes stale."""
    global _warned_never_closed
    if window.forwards <= MAX_WINDOW_FORWARDS or _warned_never_closed:
        return
    _warned_never_closed = True
    warnings.warn(
        f"LiME adapter '{adapter}' (balance_scope='global'): {window.forwards} training forwards without an optimizer "
        "step closing the balance window; the load-balance statistics now span all of them. If your loop updates "
        "the weights without torch.optim.Optimizer.step, call peft_lime.reset_balance_window(model) where the step "
        "would be (see peft_lime.balance)",
        stacklevel=3,
    )


@torch.compiler.disable  # Python state and a collective per call: runs eagerly (a graph break) under torch.compile
def global_balance_terms(
    layer: nn.Module, adapter: str, probs: torch.Tensor, valid: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance, kl_uniform) of the global batch so far, with this rank's share of their gradient (see above).

    probs: (N, E) routing probabilities of this call; valid: (N,) bool (False for padding) or None.
    """
    if torch.is_inference_mode_enabled():
        # Nothing can be learned from it, and inference tensors kept in the window could not be saved for backward.
        importance, kl, _ = balance_terms(probs, valid)
        return importance, kl
    E = probs.shape[-1]
    if valid is None:
        local_sums, count = probs.sum(0), probs.new_tensor(float(probs.shape[0]))
    else:
        weights = valid.to(probs.dtype)
        local_sums, count = weights @ probs, weights.sum()
    window = window_of(layer, adapter)
    # The recomputation of a checkpointed forward runs inside backward: it reuses what the forward found.
    recomputing = torch._C._current_graph_task_id() != -1
    if not recomputing or window.sums is None:
        local = torch.cat([local_sums.detach(), count.reshape(1).detach()]).float()
        reduced, world = data_parallel_sum(local)
        window.sums = reduced if window.sums is None else window.sums + reduced
        window.grad_scale = world / reduced[E].clamp_min(1.0)
        window.forwards += 1
        _warn_if_never_closed(window, adapter)
        ensure_step_hook()
    n_ref = window.sums[E]
    pbar_ref = window.sums[:E] / n_ref.clamp_min(1.0)
    # Value pbar_ref exactly; gradient grad_scale * dS_local (other ranks' and earlier micro-batches' parts are data).
    pbar = pbar_ref + (local_sums - local_sums.detach()).float() * window.grad_scale
    importance, kl = balance_terms_of_mean(pbar)
    # An empty window (all padding so far) has no balance terms: 0, not importance = -1.
    return importance * (n_ref > 0).to(importance.dtype), kl


# Training forwards seen per LiME layer and adapter, for LimeConfig.balance_interval (weakly held, like the windows).
_BALANCE_CALLS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def balance_due(layer: nn.Module, adapter: str, interval: int, first_pass: bool) -> bool:
    """Whether this training forward applies the balance losses: with ``balance_interval=n`` the 1st, (n+1)-th, ...
    training forward of the layer (the authors' schedule applies them on one micro-batch in 50).

    A checkpointed forward's recomputation (``first_pass`` False) repeats the decision of the layer's latest forward,
    which is the one whose backward runs when each forward's backward follows it (trainers).
    """
    if interval == 1:
        return True
    calls = _BALANCE_CALLS.setdefault(layer, {})
    seen = calls.get(adapter, 0)
    if not first_pass:
        return (seen - 1) % interval == 0
    calls[adapter] = seen + 1
    return seen % interval == 0

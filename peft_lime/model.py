"""LimeModel: the BaseTuner of LiME. It holds no math (see layer.py / routing.py).

It drives a headless instance of the base tuner (LoraModel, IA3Model, ...) to create that tuner's own adapter layers,
so every backend and variant the base tuner supports (bitsandbytes 4-bit / 8-bit, DoRA, Conv1D, ...) is created
exactly as the base tuner would, then wraps each adapted layer in a LimeLayer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import LimeConfig
from .config_checks import revalidate_config
from .context import RoutingContext, track_model_calls
from .decode_state import ASSISTED_DECODING_ERROR, CANDIDATE_DECODING_KWARGS
from .layer import LimeLayer
from .load_checks import check_checkpoint
from .peft_type import LIME_PREFIX
from .windowing import pools_over_sequence
from .wrappable import ADAPTER_NAMES_ERROR, MERGE_ERROR, check_wrappable


def _base_tuner_cls(config: LimeConfig) -> type[BaseTuner]:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING[config.base.peft_type]


class LimeModel(BaseTuner):
    """Creates a LiME (Lightweight Mixture of Experts) model from a pretrained transformers model.

    Each layer targeted by ``config.base`` gets ONE adapter of the base method plus E expert vectors; a router
    without parameters mixes the vectors per token and the mix multiplies the adapter output.

    Args:
        model: the model to adapt.
        config: a LimeConfig.
        adapter_name: name of the adapter, "default" by default.
    """

    prefix: str = LIME_PREFIX
    tuner_layer_cls = LimeLayer
    target_module_mapping: dict = {}

    # --- setup --------------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: LimeConfig, adapter_name: str) -> None:
        # PeftModel reads peft_config[active_adapter] on every call; once all adapters are deleted that is a bare
        # KeyError 'default' (for every PEFT tuner): this dict's KeyError says what happened.
        self.peft_config = AdapterConfigs(self.peft_config)
        self.__dict__["routing_context"] = RoutingContext()
        self.__dict__["_inner_tuners"] = {}
        self.__dict__["_hook_handles"] = None

    def _post_injection_hook(self, model: nn.Module, config: LimeConfig, adapter_name: str) -> None:
        # Mask, positions and cache state reach the layers through hooks on the wrapped model and its sub-models
        # (context.py), so they are seen by every call, including the ones generate() makes, without wrapping the
        # user's forward.
        if self.__dict__.get("_hook_handles") is None:
            self.__dict__["_hook_handles"] = track_model_calls(model, self.routing_context)
        self._update_window_tracking()

    def _update_window_tracking(self) -> None:
        # The KV cache is followed (its methods wrapped) only when some adapter routes with n-gram windows.
        self.routing_context.track_windows = any(
            pools_over_sequence(conf.n_gram, conf.ngram_mode) for conf in self.peft_config.values()
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # A failed injection (a target LiME cannot wrap, a variant without delta, ...) must leave the model as it
        # was: PEFT replaces targets one by one, so the layers already created for this adapter are removed again.
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            remove_partial_adapter(model, adapter_name)
            self.routing_context.layers_per_adapter.pop(adapter_name, None)
            raise

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # PeftModel.forward / generate hand their kwargs here first and then drop ``adapter_names`` before the base
        # model sees it: refuse it here, or the batch would silently run with the active adapter.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(ADAPTER_NAMES_ERROR)
        pooled = [self.peft_config[name] for name in self.active_adapters]
        pooled = [c for c in pooled if pools_over_sequence(c.n_gram, c.ngram_mode)]
        if pooled:
            n_gram = max(c.n_gram for c in pooled)
            for option in CANDIDATE_DECODING_KWARGS:
                if kwargs.get(option) is not None:
                    raise ValueError(ASSISTED_DECODING_ERROR.format(n_gram=n_gram, option=option))
        yield

    def _inner_tuner(self, config: LimeConfig, adapter_name: str) -> BaseTuner:
        """A headless instance of the base tuner class: used only for its layer-creation logic."""
        tuner_cls = _base_tuner_cls(config)
        inner = self._inner_tuners.get(tuner_cls)
        if inner is None:
            inner = tuner_cls.__new__(tuner_cls)
            nn.Module.__init__(inner)
            inner.__dict__["model"] = self.model  # not a registered child: the model belongs to self
            inner.peft_config = {}
            inner.targeted_module_names = []
            inner.targeted_parameter_names = []
            self._inner_tuners[tuner_cls] = inner
        inner.peft_config[adapter_name] = config.base
        inner.active_adapter = list(self.active_adapters)
        return inner

    def _check_new_adapter_config(self, config: LimeConfig) -> None:
        revalidate_config(config)
        super()._check_new_adapter_config(config)
        base_types = {conf.base.peft_type for conf in self.peft_config.values()}
        if len(base_types) > 1:
            raise ValueError(
                "base: all LiME adapters of one model must wrap the same tuner type, got "
                f"{sorted(t.value for t in base_types)}"
            )

    def _prepare_adapter_config(self, peft_config: LimeConfig, model_config: dict) -> LimeConfig:
        adapter_name = next(name for name, conf in self.peft_config.items() if conf is peft_config)
        inner = self._inner_tuner(peft_config, adapter_name)
        inner._prepare_adapter_config(peft_config.base, model_config)
        return peft_config

    def _prepare_model(self, peft_config: LimeConfig, model: nn.Module) -> None:
        adapter_name = next(name for name, conf in self.peft_config.items() if conf is peft_config)
        self._inner_tuner(peft_config, adapter_name)._prepare_model(peft_config.base, model)

    def _create_and_replace(
        self,
        lime_config: LimeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        inner = self._inner_tuner(lime_config, adapter_name)
        if isinstance(target, LimeLayer):
            # Another adapter on an already wrapped layer: the base tuner updates its own layer, we add experts.
            inner._create_and_replace(
                lime_config.base, adapter_name, target.base_layer, "base_layer", target, current_key=current_key
            )
            target.update_layer(adapter_name, lime_config)
        else:
            check_wrappable(target, current_key)  # before the base tuner replaces anything
            inner._create_and_replace(
                lime_config.base, adapter_name, target, target_name, parent, current_key=current_key
            )
            tuner_layer = getattr(parent, target_name)
            new_module = LimeLayer(tuner_layer, adapter_name, lime_config, self.routing_context, current_key)
            if adapter_name not in self.active_adapters:
                new_module.lime_experts.requires_grad_(False)
            setattr(parent, target_name, new_module)
        counts = self.routing_context.layers_per_adapter
        counts[adapter_name] = counts.get(adapter_name, 0) + 1

    # --- adapter lifecycle --------------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.routing_context.layers_per_adapter.pop(adapter_name, None)
        for inner in self._inner_tuners.values():
            inner.peft_config.pop(adapter_name, None)
        self._update_window_tracking()

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            raise ValueError(MERGE_ERROR)
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        for handle in self.__dict__.get("_hook_handles") or ():
            handle.remove()
        self.__dict__["_hook_handles"] = None
        return model

    # --- state dict hooks: the base tuner's key conventions ---------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # PEFT finds adapter keys by module names, and only strips a LEADING "_fsdp_wrapped_module.". FSDP1's nested
        # units and torch's activation-checkpoint wrappers put such segments in the middle of names, while
        # state_dict() keys never contain them: without the view below the saved adapter would be empty.
        return _base_tuner_cls(config)._get_adapter_state_dict(
            _StateDictNamesView(model), config.base, adapter_name, state_dict, unwanted_adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = _base_tuner_cls(config)._remap_adapter_state_dict_for_load(
            model, config.base, adapter_name, state_dict
        )
        check_checkpoint(model, config, adapter_name, remapped)
        return remapped


class AdapterNotFoundError(KeyError):
    """A KeyError (what PEFT and callers catch) whose message is shown as written, not quoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterConfigs(dict):
    """LimeModel.peft_config: {adapter name: LimeConfig}; a missing name raises a KeyError that says why."""

    def __missing__(self, key: Any) -> Any:
        if not self:
            raise AdapterNotFoundError(
                f"LiME: no adapter {key!r}, the model has no adapter left (the last one was deleted). Add one "
                "(add_adapter / load_adapter, then set_adapter) or get the base model back with unload()"
            )
        raise AdapterNotFoundError(f"LiME: no adapter {key!r}; the model has {sorted(self)} (see set_adapter)")


# Name segments that wrapper modules add to module names but that their state_dict() hooks remove from keys.
_WRAPPER_NAME_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class _StateDictNamesView:
    """A model whose ``named_modules`` yields names as its ``state_dict()`` keys spell them (wrappers removed)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def named_modules(self, *args: Any, **kwargs: Any):
        for name, module in self._model.named_modules(*args, **kwargs):
            for segment in _WRAPPER_NAME_SEGMENTS:
                name = name.replace(segment, "")
            yield name, module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def remove_partial_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo a failed injection of ``adapter_name``: layers that held only it go back to their frozen base layer,
    layers shared with other adapters drop it (LiME layers first, then base-tuner layers not yet wrapped)."""
    for wrapper_cls in (LimeLayer, BaseTunerLayer):
        for name, module in list(model.named_modules()):
            if not isinstance(module, wrapper_cls) or adapter_name not in module._all_available_adapter_names():
                continue
            if module._all_available_adapter_names() == [adapter_name]:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
            else:
                module.delete_adapter(adapter_name)


def find_lime_model(model: nn.Module) -> LimeModel:
    """The LimeModel inside a PeftModel (or the LimeModel itself); clear error when there is none."""
    for module in model.modules():
        if isinstance(module, LimeModel):
            return module
    raise ValueError("model: no LiME adapter found (expected a model returned by get_peft_model with a LimeConfig)")


def enable_task_ids(peft_model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let ``task_ids`` passed to the PeftModel's forward reach LiME's per-task routing telemetry.

    PeftModel.forward consumes a ``task_ids`` argument itself (for prompt-learning methods) and does not pass it on;
    this pre-hook on the PeftModel reads it first. Idempotent: a second call returns the first call's handle.
    """
    existing = peft_model.__dict__.get("_lime_task_ids_hook")
    if existing is not None and existing.id in peft_model._forward_pre_hooks:
        return existing
    context = find_lime_model(peft_model).routing_context

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        task_ids = kwargs.get("task_ids")
        context.pending_task_ids = task_ids if torch.is_tensor(task_ids) else None

    handle = peft_model.register_forward_pre_hook(capture, with_kwargs=True)
    peft_model.__dict__["_lime_task_ids_hook"] = handle
    return handle

"""A third-party tuner plugs into LiME through ``peft_lime.register_delta``: its checks, delta and fast path."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import peft_lime
from peft_lime import LimeLayer, LowRankDelta, low_rank_mix, routing
from peft_lime.context import RoutingContext

from ._models import lime, lora


class ToyLowRankLayer(nn.Module, BaseTunerLayer):
    """A minimal third-party tuner layer: y = W x + up(down(x)) * 0.5, adapters keyed by name as PEFT does."""

    adapter_layer_names = ("toy_down", "toy_up")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, rank: int = 3) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.toy_down = nn.ModuleDict({adapter_name: nn.Linear(base_layer.in_features, rank, bias=False)})
        self.toy_up = nn.ModuleDict({adapter_name: nn.Linear(rank, base_layer.out_features, bias=False)})
        nn.init.normal_(self.toy_up[adapter_name].weight)
        self._active_adapter = adapter_name
        self.refuse = set()


calls = {"delta": 0, "factors": 0}


def toy_check(layer: ToyLowRankLayer, adapter: str) -> None:
    if adapter in layer.refuse:
        raise TypeError(f"toy: adapter {adapter} uses a variant LiME cannot wrap")


def toy_factors(layer: ToyLowRankLayer, adapter: str, x: torch.Tensor) -> LowRankDelta | None:
    calls["factors"] += 1
    if getattr(layer, "no_factors", False):  # e.g. a variant without a low-rank form: the generic path
        return None
    return LowRankDelta(layer.toy_down[adapter](x), layer.toy_up[adapter].weight, 0.5)


@peft_lime.register_delta(ToyLowRankLayer, check=toy_check, factors=toy_factors)
def toy_delta(layer: ToyLowRankLayer, x: torch.Tensor, adapter: str, h: torch.Tensor) -> torch.Tensor:
    calls["delta"] += 1
    return layer.toy_up[adapter](layer.toy_down[adapter](x)) * 0.5


def _layer(E: int = 4) -> LimeLayer:
    torch.manual_seed(0)
    toy = ToyLowRankLayer(nn.Linear(16, 12), "default")
    config = lime(lora(), num_experts=E, expert_init_std=0.5, auto_topk=False, top_k=2, selection="hard")
    layer = LimeLayer(toy, "default", config, RoutingContext(), layer_name="toy")
    with torch.no_grad():
        layer.lime_experts["default"].shared.normal_()
        layer.lime_experts["default"].gate.fill_(0.7)
    return layer


def _naive(layer: LimeLayer, x: torch.Tensor) -> torch.Tensor:
    toy, experts, s = layer.base_layer, layer.lime_experts["default"], layer.lime_routing["default"]
    h = toy.base_layer(x)
    delta = toy.toy_up["default"](toy.toy_down["default"](x)) * 0.5
    E = s.num_experts
    logits = routing.routing_logits(h[..., :E], delta[..., :E], gamma=s.routing_gamma, temperature=s.temperature,
                                    norm="token")
    probs = torch.softmax(logits, -1)
    top = probs.topk(s.top_k, -1)
    w = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    w = w / w.sum(-1, keepdim=True)
    modulation = 1.0 + w @ experts.weight + experts.gate * experts.shared
    return h + delta * modulation


def test_toy_tuner_routes_like_the_naive_definition_on_every_path(monkeypatch):
    layer = _layer().eval()
    x = torch.randn(2, 5, 16)
    calls.update(delta=0, factors=0)
    with torch.no_grad():
        decoded = layer(x)
        # a small no-grad call (decoding): delta built from the factors, its scaling passed to the native call
        assert calls == {"delta": 0, "factors": 1}
        monkeypatch.setattr(low_rank_mix, "LOW_RANK_MIX_MIN_ELEMENTS", 0)
        gemm = layer(x)
        assert calls == {"delta": 0, "factors": 2}  # a large no-grad call: the factors' single GEMM
        monkeypatch.undo()
        layer.base_layer.no_factors = True
        generic = layer(x)  # factors refused for this call: delta itself
        assert calls == {"delta": 1, "factors": 3}
    refused = layer(x)  # grad enabled but factors refused for this call: the generic path
    assert calls == {"delta": 2, "factors": 4}
    layer.base_layer.no_factors = False
    fast = layer(x)  # grad enabled: the low-rank fast path
    assert calls == {"delta": 2, "factors": 5}
    expected = _naive(layer, x)
    torch.testing.assert_close(decoded, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generic, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemm, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(refused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    # the fast path's own backward gives autograd's gradients of the naive definition
    params = [p for p in layer.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    g_ref = torch.autograd.grad(expected.square().sum(), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_toy_tuner_check_refuses_a_variant_by_its_own_message():
    toy = ToyLowRankLayer(nn.Linear(16, 12), "default")
    toy.refuse.add("default")
    with pytest.raises(TypeError, match="toy: adapter default uses a variant"):
        LimeLayer(toy, "default", lime(lora()), RoutingContext())


def test_unregistered_tuner_gets_the_registry_error():
    class Unknown(ToyLowRankLayer):
        pass

    class Other(nn.Module, BaseTunerLayer):
        adapter_layer_names = ("x",)

        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(4, 4)
            self.x = nn.ModuleDict()

    assert LimeLayer(Unknown(nn.Linear(16, 12), "default"), "default", lime(lora()), RoutingContext()) is not None
    with pytest.raises(TypeError, match="register_delta"):
        LimeLayer(Other(), "default", lime(lora(), num_experts=2), RoutingContext())


def test_plain_linear_weight_refuses_biased_subclassed_and_deepspeed_partitioned_weights():
    from peft_lime.deltas import plain_linear_weight

    linear = nn.Linear(4, 3, bias=False)
    assert plain_linear_weight(linear) is linear.weight
    assert plain_linear_weight(nn.Linear(4, 3)) is None  # a bias
    assert plain_linear_weight(type("Wrapped", (nn.Linear,), {})(4, 3, bias=False)) is None  # another class
    linear.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    assert plain_linear_weight(linear) is None

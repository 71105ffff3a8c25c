"""Issue 23: ``routing_mode="centroid"``: a router with no trainable parameters that reads the whole frozen output.

Checked against its written definition, and for what every LiME router must keep: batch / padding invariance,
packed sequences, cached decoding equal to a full forward (n_gram 1 and 3), save / load. Tolerances: 1e-4 on logits
(as tests/test_generation.py: other matmul shapes, other summation orders), 1e-6 for the same ops reordered.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import routing
from peft_lime.centroids import spherical_kmeans

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama
from ._routing_checks import assert_cached_decoding_equals_full, assert_padding_invariant, assert_trains_and_reloads

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _batches(n: int = 3, rows: int = 4, length: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding, excluded from the calibration statistics
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _model(n_gram: int = 1, fit: bool = True, **kwargs):
    torch.manual_seed(0)
    config = lime(lora(target_modules=TARGETS), routing_mode="centroid", n_gram=n_gram, temperature=0.2, **kwargs)
    model = get_peft_model(tiny_llama(seed=3), config)
    scatter_experts(model, seed=2)
    if fit:
        peft_lime.fit_routing_centroids(model, _batches())
    return model.eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, peft_lime.LimeLayer)]


def test_fitted_centroids_are_unit_buffers_and_no_trainable_router():
    model = _model()
    plain = get_peft_model(tiny_llama(seed=3), lime(lora(target_modules=TARGETS)))
    assert model.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0]
    for layer in _layers(model):
        experts = layer.lime_experts["default"]
        assert not experts.centroids.requires_grad
        torch.testing.assert_close(experts.centroids.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)
        assert experts.centroid_center.abs().sum() > 0


def test_weights_equal_the_written_definition():
    """softmax-and-select of cos(h - mean, c_i) / tau, with h the frozen output of the layer's input."""
    model = _model(n_gram=1, auto_topk=False, top_k=2, selection="hard")
    layer = _layers(model)[0]
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    captured = []
    _layers(model)[0]._context.weights_capture = lambda lay, adapter, w, layout: captured.append((lay, w))
    ids = _batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
    _layers(model)[0]._context.weights_capture = None
    weights = next(w for lay, w in captured if lay is layer)
    experts = layer.lime_experts["default"]
    h = layer.base_layer.get_base_layer()(seen["x"]).reshape(-1, layer.out_features)
    u = (h - experts.centroid_center) / (h - experts.centroid_center).norm(dim=-1, keepdim=True)
    probs = torch.softmax(u @ experts.centroids.T / 0.2, dim=-1)
    top = probs.topk(2, dim=-1)
    want = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want, rtol=0, atol=1e-6)
    assert (weights > 0).sum(0).min() < weights.shape[0]  # the route varies across tokens


def test_unfitted_centroids_route_uniformly():
    model = _model(fit=False, auto_topk=True)
    captured = []
    _layers(model)[0]._context.weights_capture = lambda lay, adapter, w, layout: captured.append(w)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 5)))
    assert captured and all(torch.allclose(w, torch.full_like(w, 0.25)) for w in captured)


def test_spherical_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    points = directions.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 16, generator=gen)
    x = torch.nn.functional.normalize(points, dim=1)
    centroids = spherical_kmeans(x, 3, seed=1)
    assign = (x @ centroids.T).argmax(1).reshape(3, 50)
    assert all(len(set(row.tolist())) == 1 for row in assign)  # every planted cluster is one centroid's
    assert len({row[0].item() for row in assign}) == 3
    with pytest.raises(ValueError, match="batches: 2 calibration tokens cannot give 3 centroids"):
        spherical_kmeans(x[:2], 3)


def test_fit_needs_a_centroid_layer():
    model = get_peft_model(tiny_llama(seed=3), lime(lora(target_modules=TARGETS)))
    with pytest.raises(ValueError, match="routing_mode='centroid'"):
        peft_lime.fit_routing_centroids(model, _batches(1))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("n_gram", [1, 3])
def test_batch_and_padding_invariance(n_gram, side):
    model = _model(n_gram)
    assert_padding_invariant(model, side)


def test_packed_sequences_route_as_separate_sequences():
    model = _model(n_gram=3)
    a, b = torch.randint(3, VOCAB, (5,)), torch.randint(3, VOCAB, (6,))
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(6)])[None]
    captured = []
    _layers(model)[0]._context.weights_capture = lambda lay, adapter, w, layout: captured.append(w)
    with torch.no_grad():
        model(input_ids=packed, position_ids=position_ids)
        n = len(captured)
        model(input_ids=b[None])
    _layers(model)[0]._context.weights_capture = None
    # the first layer's routing of b's tokens inside the pack equals b alone (same inputs at layer 0's first target)
    torch.testing.assert_close(captured[0][5:], captured[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_cached_decoding_equals_full_forward(n_gram):
    model = _model(n_gram)
    assert_cached_decoding_equals_full(model)


def test_training_step_and_save_load(tmp_path):
    model = _model(n_gram=3)
    assert_trains_and_reloads(model, tmp_path, lambda: tiny_llama(seed=3))


def test_window_pooling_used_in_fit_is_the_routers():
    """k-means runs on causal window means of the normalised features: the same windows the router averages."""
    u = torch.nn.functional.normalize(torch.randn(2, 7, 5), dim=-1)
    C = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    pooled = routing.causal_window_mean(u, 3)
    torch.testing.assert_close(pooled @ C.T, routing.causal_window_mean(u @ C.T, 3), rtol=0, atol=1e-6)

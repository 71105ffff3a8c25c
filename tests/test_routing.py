"""Pure routing math: windows, selection, balance terms, normaliser behaviour at delta = 0."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lime import routing


def naive_causal_window(logits, n, valid, segments):
    B, T, E = logits.shape
    out = torch.empty_like(logits)
    for b in range(B):
        for t in range(T):
            acc, count = logits[b, t].clone(), 1
            for k in range(1, n):
                j = t - k
                if j < 0:
                    break
                if valid[b, j] and segments[b, j] == segments[b, t]:
                    acc += logits[b, j]
                    count += 1
            out[b, t] = acc / count
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_causal_window_matches_naive_definition(n):
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 4)
    valid = torch.rand(3, 9) > 0.2
    segments = torch.tensor([[0] * 9, [0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    got = routing.causal_window_mean(logits, n, valid=valid, segments=segments)
    torch.testing.assert_close(got, naive_causal_window(logits, n, valid, segments))


def test_causal_window_with_decoding_tail_equals_full_sequence():
    torch.manual_seed(0)
    n = 4
    logits = torch.randn(2, 10, 3)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :2] = False  # left padding in row 1
    full = routing.causal_window_mean(logits, n, valid=valid)
    for t in range(n - 1, 10):
        step = routing.causal_window_mean(
            logits[:, t : t + 1],
            n,
            valid=valid[:, t : t + 1],
            past_logits=logits[:, t - n + 1 : t],
            past_valid=valid[:, t - n + 1 : t],
        )
        torch.testing.assert_close(step[:, 0], full[:, t])


def test_segments_from_positions_restart_at_packing_boundaries():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert routing.segment_ids_from_positions(pos).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]


def test_block_mode_routes_each_block_by_its_last_token():
    logits = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)
    pos = torch.arange(7).unsqueeze(0)
    got = routing.block_window_logits(logits, 3, pos)
    # blocks [0,1,2], [3,4,5], [6]
    expected_idx = [2, 2, 2, 5, 5, 5, 6]
    torch.testing.assert_close(got[0], logits[0, expected_idx])


def _select(probs, **kw):
    defaults = dict(top_k=2, auto_topk=False, threshold=0.5, max_active=None, mode="hard", selection_temperature=0.5)
    defaults.update(kw)
    return routing.select_experts(probs, **defaults)


def test_hard_topk_keeps_k_and_renormalises():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    sel = _select(probs, top_k=2)
    torch.testing.assert_close(sel.weights, torch.tensor([[0.0, 4 / 7, 3 / 7, 0.0]]))
    assert sel.selected.tolist() == [[False, True, True, False]]


def test_auto_topk_threshold_keeps_confident_experts_and_respects_cap():
    probs = torch.tensor([[0.05, 0.45, 0.30, 0.20]])
    sel = _select(probs, auto_topk=True, threshold=0.5)  # keep p >= 0.225
    assert sel.selected.tolist() == [[False, True, True, False]]
    sel = _select(probs, auto_topk=True, threshold=0.4)  # keep p >= 0.18 -> 3 experts
    assert sel.selected.sum().item() == 3
    sel = _select(probs, auto_topk=True, threshold=0.4, max_active=2)
    assert sel.selected.tolist() == [[False, True, True, False]]
    # threshold 1.0 == top-1
    one = _select(probs, auto_topk=True, threshold=1.0)
    torch.testing.assert_close(one.weights, _select(probs, top_k=1).weights)


def test_soft_selection_gives_every_expert_gradient():
    probs = torch.softmax(torch.randn(5, 4), -1).requires_grad_(True)
    sel = _select(probs, mode="soft", top_k=1)
    (sel.weights * torch.randn(5, 4)).sum().backward()
    assert torch.all(probs.grad.abs() > 0)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(5))


def test_balance_terms_zero_when_uniform_and_exclude_padding():
    E = 4
    uniform = torch.full((6, E), 1 / E)
    imp, kl, pbar = routing.balance_terms(uniform, None)
    assert abs(imp.item()) < 1e-6 and abs(kl.item()) < 1e-6
    skewed = torch.tensor([[1.0, 0, 0, 0]] * 2 + [[0.25] * 4] * 2)
    valid = torch.tensor([False, False, True, True])
    imp, kl, _ = routing.balance_terms(skewed, valid)
    assert abs(imp.item()) < 1e-6  # only the uniform (valid) rows count
    imp_all, kl_all, _ = routing.balance_terms(skewed, None)
    pbar = skewed.mean(0)
    assert imp_all.item() == pytest.approx(E * (pbar**2).sum().item() - 1)
    assert kl_all.item() == pytest.approx((pbar * torch.log(E * pbar)).sum().item())


def test_token_normaliser_is_finite_and_bounded_when_delta_is_zero():
    """The reference's 1/eps blow-up (spec 3.7): with delta = 0 the router gradient must stay moderate."""
    h = torch.randn(8, 4)
    delta = torch.zeros(8, 4, requires_grad=True)
    z = routing.routing_logits(h, delta, gamma=0.7, temperature=0.5, norm="token")
    torch.softmax(z, -1)[:, 0].sum().backward()
    assert torch.isfinite(delta.grad).all()
    scale_h = h.pow(2).mean(-1).sqrt()
    # d z / d delta = gamma / (tau * floor), floor = 1% of scale_h: bounded by 140 / scale_h
    bound = 0.7 / (0.5 * routing.ADAPTER_SCALE_FLOOR * scale_h)
    assert torch.all(delta.grad.abs().amax(-1) <= bound + 1e-4)
    assert delta.grad.abs().max() < 1e4  # the reference would give ~1e6


def test_token_norm_is_per_token_batch_norm_is_not():
    h = torch.randn(4, 4)
    d = torch.randn(4, 4)
    z_tok = routing.routing_logits(h, d, gamma=0.5, temperature=1.0, norm="token")
    z_tok_alone = routing.routing_logits(h[:1], d[:1], gamma=0.5, temperature=1.0, norm="token")
    torch.testing.assert_close(z_tok[:1], z_tok_alone)
    h2 = torch.cat([h, 100 * torch.ones(1, 4)])
    d2 = torch.cat([d, torch.zeros(1, 4)])
    z_batch = routing.routing_logits(h2, d2, gamma=0.5, temperature=1.0, norm="batch")
    z_batch_alone = routing.routing_logits(h[:1], d[:1], gamma=0.5, temperature=1.0, norm="batch")
    assert not torch.allclose(z_batch[:1], z_batch_alone)


def test_normalized_entropy_range():
    E = 8
    assert routing.normalized_entropy(torch.full((1, E), 1 / E)).item() == pytest.approx(1.0)
    one_hot = torch.zeros(1, E)
    one_hot[0, 3] = 1
    assert routing.normalized_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(routing.normalized_entropy(torch.softmax(torch.randn(3, E), -1)).sum().item())

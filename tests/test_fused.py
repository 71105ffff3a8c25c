"""The fast paths of LiME's forward equal the plain formulas they replace (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from peft_lime import routing
from peft_lime.deltas import LowRankDelta
from peft_lime.modulation import modulate
from peft_lime.stats import RoutingStats


def _reference_logits(h, d, gamma, temperature):
    scale_h = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().detach()
    floor = (routing.ADAPTER_SCALE_FLOOR * scale_h).pow(2)
    scale_d = d.pow(2).mean(-1, keepdim=True).add(floor).sqrt().detach()
    return ((1.0 - gamma) * h / scale_h + gamma * d / scale_d) / temperature


@pytest.mark.parametrize("gamma,temperature", [(0.7, 0.5), (0.0, 1.0), (1.0, 0.3), (0.3, 2.0)])
def test_token_logits_match_formula(gamma, temperature):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64)
    for d in (torch.randn(3, 5, 8, dtype=torch.float64) * 0.01, torch.zeros(3, 5, 8, dtype=torch.float64)):
        hh, dd = h.clone().float().requires_grad_(), d.clone().float().requires_grad_()
        fast = routing.routing_logits(hh, dd, gamma=gamma, temperature=temperature, norm="token")
        ref = _reference_logits(h.clone().requires_grad_(), d.clone().requires_grad_(), gamma, temperature)
        torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)
        g_fast = torch.autograd.grad(fast.sin().sum(), (hh, dd))
        hr, dr = h.clone().requires_grad_(), d.clone().requires_grad_()
        g_ref = torch.autograd.grad(_reference_logits(hr, dr, gamma, temperature).sin().sum(), (hr, dr))
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_soft_selection_through_logits_equals_renormalised_gate():
    torch.manual_seed(0)
    logits = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    kw = dict(top_k=2, auto_topk=True, threshold=0.5, max_active=None, mode="soft", selection_temperature=0.5)
    probs = torch.softmax(logits, -1)
    fast = routing.select_experts(probs, logits=logits, **kw).weights
    plain = routing.select_experts(probs, **kw).weights
    torch.testing.assert_close(fast, plain)
    g1 = torch.autograd.grad(fast[:, 0].sum(), logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(plain[:, 0].sum(), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_capped_selection_keeps_exactly_k_on_ties():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    sel = routing.select_experts(
        probs, top_k=2, auto_topk=True, threshold=0.1, max_active=2, mode="hard", selection_temperature=0.5
    )
    assert sel.selected.sum(-1).tolist() == [2, 2]
    assert sel.selected[1].tolist() == [True, True, False, False]


@pytest.mark.parametrize("lora", [False, True])
def test_modulate_gradcheck(lora):
    torch.manual_seed(0)
    N, r, E, d = 5, 3, 4, 6
    dt = dict(dtype=torch.float64, requires_grad=True)
    out = torch.randn(1, N, d, **dt)
    mix = torch.softmax(torch.randn(N, E, dtype=torch.float64), -1).requires_grad_()
    weight, offset = torch.randn(E, d, **dt), torch.randn(d, **dt)
    if lora:
        a, B = torch.randn(1, N, r, **dt), torch.randn(d, r, **dt)
        fn = lambda o, m, w, f, a, B: modulate(o, m, w, f, low_rank=LowRankDelta(a, B, 0.7))  # noqa: E731
        inputs = (out, mix, weight, offset, a, B)
        plain = out + (0.7 * a @ B.t()) * (offset + mix @ weight).view(1, N, d)
    else:
        delta = torch.randn(1, N, d, **dt)
        fn = lambda o, m, w, f, dl: modulate(o, m, w, f, delta=dl)  # noqa: E731
        inputs = (out, mix, weight, offset, delta)
        plain = out + delta * (offset + mix @ weight).view(1, N, d)
    torch.testing.assert_close(fn(*inputs), plain)
    assert torch.autograd.gradcheck(fn, inputs)
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs), plain)


def test_stats_fold_matches_direct_sums():
    torch.manual_seed(0)
    E = 4
    stats = RoutingStats(E)
    calls = []
    for n, with_valid, with_tasks in [(6, True, True), (1, False, False), (3, False, True), (6, True, False)]:
        probs = torch.softmax(torch.randn(n, E), -1)
        selected = probs >= 0.5 * probs.amax(-1, keepdim=True)
        valid = torch.rand(n) > 0.3 if with_valid else None
        tasks = torch.randint(0, 3, (n,)) if with_tasks else None
        stats.record(probs, selected, valid, token_tasks=tasks)
        calls.append((probs, selected, valid, tasks))
    out = stats.summary()
    tokens = sum(float(v.sum()) if v is not None else p.shape[0] for p, _, v, _ in calls)
    assert out["tokens"] == pytest.approx(tokens)
    imp = [float(routing.balance_terms(p, v)[0]) for p, _, v, _ in calls]
    kl = [float(routing.balance_terms(p, v)[1]) for p, _, v, _ in calls]
    assert out["importance_loss"] == pytest.approx(sum(imp) / 4, rel=1e-5, abs=1e-7)
    assert out["kl_loss"] == pytest.approx(sum(kl) / 4, rel=1e-5, abs=1e-7)
    w = [v.float() if v is not None else torch.ones(p.shape[0]) for p, _, v, _ in calls]
    active = sum(float((s.sum(-1).float() * wi).sum()) for (_, s, _, _), wi in zip(calls, w))
    assert out["active_experts"] == pytest.approx(active / tokens, rel=1e-6)
    ent = sum(float((routing.normalized_entropy(p) * wi).sum()) for (p, _, _, _), wi in zip(calls, w))
    assert out["routing_entropy"] == pytest.approx(ent / tokens, rel=1e-5)
    task_tokens: dict[int, float] = {}
    for (_, _, _, t), wi in zip(calls, w):
        if t is not None:
            for ti, wv in zip(t.tolist(), wi.tolist()):
                task_tokens[ti] = task_tokens.get(ti, 0.0) + wv
    assert out["task_tokens"] == pytest.approx({k: v for k, v in task_tokens.items() if v > 0})
    assert sum(out["active_histogram"]) == pytest.approx(tokens)

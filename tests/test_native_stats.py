"""The native routing statistics and balance loss (native_stats.py, native_balance.py, csrc/lime_stats.c) equal the
tensor ops they replace (stats.py's sums, routing.balance_terms).

Every sum of a fold of several calls (padding masks, an all-padding call, a non-finite row, one and 64 experts), the
balance loss and its gradient (no mask, a mask, no valid token, an expert no token uses: the clamp's branch); their
custom ops through torch.library.opcheck; and where they must leave the work to the tensor ops.
"""

from __future__ import annotations

import pytest
import torch

from peft_lime import native_balance, native_route, native_stats, routing
from peft_lime.stats import RoutingStats

pytestmark = pytest.mark.usefixtures("one_thread", "native_on")
TOL = dict(atol=1e-5, rtol=1e-5)
OPS = torch.ops.peft_lime


def _calls(E: int, seed: int = 0):
    """(probs, selected, valid) of five layer calls: masks, an all-padding call, a row with a NaN."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for n, mask in [(6, "some"), (1, None), (5, "none"), (7, None), (9, "some")]:
        probs = torch.softmax(torch.randn(n, E, generator=g) * 3, -1)
        if n == 7:
            probs[2, E - 1] = float("nan")
        selected = probs >= 0.5 * probs.amax(-1, keepdim=True)
        valid = {"some": torch.rand(n, generator=g) > 0.3, "none": torch.zeros(n, dtype=torch.bool), None: None}[mask]
        calls.append((probs, selected, valid))
    return calls


def _sums(native: bool, calls, E: int) -> dict[str, torch.Tensor]:
    native_route.set_native(native)
    stats = RoutingStats(E)
    for probs, selected, valid in calls:
        stats.record(probs, selected, valid)
    return {k: v.clone() for k, v in stats.sums(torch.device("cpu")).items()}


@pytest.mark.parametrize("E", [8, 1, 3, 64])
def test_every_sum_of_a_fold_equals_the_tensor_ops(E, monkeypatch) -> None:
    calls, ran = _calls(E), []
    original = native_route.stats_kernel
    monkeypatch.setattr(native_route, "stats_kernel", lambda *a: ran.append(a) or original(*a))
    want = _sums(False, calls, E)
    assert ran == []
    have = _sums(True, calls, E)
    assert len(ran) == 1 and ran[0][4] == len(calls)  # one call of the kernel for the fold of five layer calls
    assert float(want["nonfinite"]) == 1.0 and float(want["calls"]) == 4.0  # the NaN row; the all-padding call
    for name, ref in want.items():
        torch.testing.assert_close(have[name], ref, **TOL, msg=name)


def test_the_op_adds_one_call_in_place() -> None:
    E = 8
    stats_ref = _sums(False, _calls(E)[:1], E)
    stats = RoutingStats(E, device=torch.device("cpu"))
    probs, selected, valid = _calls(E)[0]
    OPS.record_routing_stats(stats._flat, probs, selected, valid)
    for name, ref in stats_ref.items():
        torch.testing.assert_close(stats.sums(torch.device("cpu"))[name], ref, **TOL, msg=name)
    torch.library.opcheck(OPS.record_routing_stats, (torch.zeros_like(stats._flat), probs, selected, valid))
    torch.library.opcheck(OPS.record_routing_stats, (torch.zeros_like(stats._flat), probs, selected, None))


def test_tasks_and_other_tensors_keep_the_tensor_ops(monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(native_route, "stats_kernel", lambda *a: ran.append(a))
    probs = torch.softmax(torch.randn(4, 8), -1)
    stats = RoutingStats(8)
    stats.record(probs, probs > 0.1, None, token_tasks=torch.tensor([0, 1, 1, 0]))  # the task table: tensor ops
    stats.record(probs.double(), probs > 0.1, None)
    assert stats.summary()["tokens"] == 8 and ran == []
    assert not native_stats.applies(torch.zeros(2, 65))
    native_route.set_native(False)
    assert not native_stats.applies(probs)
    native_route.set_native(True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native_stats.applies(probs)  # a ctypes call inside a trace: never (the op is the traced form)


def _torch_aux(probs, valid, c_imp, c_kl, layers):
    importance, kl, _ = routing.balance_terms(probs, valid)
    return (c_imp * importance + c_kl * kl) / layers


BALANCE_CASES = {
    "no mask": (None, False),
    "mask": ("some", False),
    "no valid token": ("none", False),
    "an unused expert (clamped pbar)": ("some", True),
}


@pytest.mark.parametrize("case", list(BALANCE_CASES))
@pytest.mark.parametrize("E", [8, 1, 5])
def test_the_balance_loss_and_its_gradient_equal_the_tensor_ops(case, E, monkeypatch) -> None:
    mask, unused = BALANCE_CASES[case]
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(13, E, generator=g) * 2, -1)
    if unused and E > 1:
        probs[:, 1] = 0.0
    valid = {"some": torch.rand(13, generator=g) > 0.4, "none": torch.zeros(13, dtype=torch.bool), None: None}[mask]
    ran = []
    original = native_balance._NativeBalance.apply
    monkeypatch.setattr(native_balance._NativeBalance, "apply", lambda *a: ran.append(1) or original(*a))
    p_ref, p_nat = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    want = _torch_aux(p_ref, valid, 0.1, 0.01, 7)
    have = native_balance.micro_batch_aux(p_nat, valid, 0.1, 0.01, 7)
    assert ran == [1]
    torch.testing.assert_close(have, want, **TOL)
    (want * 3.0).backward()
    (have * 3.0).backward()
    torch.testing.assert_close(p_nat.grad, p_ref.grad, **TOL)
    if mask == "none":
        assert float(have) == 0.0 and not p_nat.grad.any()


def test_the_balance_ops_and_their_autograd() -> None:
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(11, 6, generator=g), -1).requires_grad_()
    w = (torch.rand(11, generator=g) > 0.3).float()
    aux = OPS.balance_aux(probs, w, 0.1, 0.01, 0.5)
    ref = _torch_aux(probs, w.bool(), 0.1, 0.01, 2)
    torch.testing.assert_close(aux, ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(aux, probs)[0], torch.autograd.grad(ref, probs)[0], **TOL)
    torch.library.opcheck(OPS.balance_aux, (probs, w, 0.1, 0.01, 0.5))
    torch.library.opcheck(OPS.balance_aux, (probs, None, 0.1, 0.01, 0.5))


def test_where_the_balance_kernels_must_not_run(monkeypatch) -> None:
    probs = torch.softmax(torch.randn(5, 4), -1)
    assert native_balance._native_aux(probs.bfloat16(), None, 0.1, 0.01, 1) is None
    assert native_balance._native_aux(torch.zeros(0, 4), None, 0.1, 0.01, 1) is None
    assert native_balance._native_aux(torch.softmax(torch.randn(5, 65), -1), None, 0.1, 0.01, 1) is None
    native_route.set_native(False)
    assert native_balance._native_aux(probs, None, 0.1, 0.01, 1) is None
    native_route.set_native(True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert native_balance._native_aux(probs, None, 0.1, 0.01, 1) is None  # see native_low_rank.in_distributed_run
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert native_balance._native_aux(probs, None, 0.1, 0.01, 1) is None  # torch.export: the tensor ops
    # And the fallback is the tensor ops' value.
    torch.testing.assert_close(native_balance.micro_batch_aux(probs, None, 0.1, 0.01, 1),
                               _torch_aux(probs, None, 0.1, 0.01, 1))

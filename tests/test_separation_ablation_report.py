"""The routing-ablation verdict (lime_examples/bench/separation_ablation.py) follows the intervals it is given.

Synthetic differences (fractions, as the summary stores them), so each sentence's reading is known in advance.
"""

from __future__ import annotations

from lime_examples.bench import separation_ablation as ab


def _pair(a: str, b: str, diff: tuple[float, float, float]) -> dict:
    return {"a": a, "b": b, "diff": diff}


def _summary(mi: dict[str, float]) -> dict:
    return {name: {"routing": {"mi_mean": value}} for name, value in mi.items()}


def test_every_balance_row_gets_its_sentence():
    pairs = [
        _pair(ab.NO_BALANCE, ab.LIME_DEFAULT, (-0.12, -0.18, -0.08)),
        _pair(ab.REF_BALANCE, ab.LIME_DEFAULT, (-0.13, -0.19, -0.08)),
    ]
    lines = ab.ablation_verdict({}, pairs)
    assert any("vs the balance loss off: +12.0 points [+8.0, +18.0]: higher" in x for x in lines)
    assert any("vs the authors' balance schedule: +13.0 points [+8.0, +19.0]: higher" in x for x in lines)


def test_recovery_bar_met_needs_half_the_gap_a_resolved_gain_and_mi():
    gap = _pair(ab.ORACLE_FAST, ab.UNIFORM_FAST, (0.04, 0.02, 0.06))
    pairs = [
        gap,
        _pair(ab.OPENING_CENTROID, ab.UNIFORM_FAST, (0.03, 0.01, 0.05)),  # 75% of the gap, resolved
        _pair(ab.OPENING_TOKEN, ab.UNIFORM_FAST, (0.03, -0.01, 0.07)),  # 75% but not resolved
    ]
    lines = ab.ablation_verdict(_summary({ab.OPENING_CENTROID: 0.9, ab.OPENING_TOKEN: 0.9}), pairs)
    centroid = next(x for x in lines if x.startswith(ab.OPENING_CENTROID + ": gains"))
    token = next(x for x in lines if x.startswith(ab.OPENING_TOKEN + ": gains"))
    assert "75% of the oracle's +4.0 points" in centroid and centroid.endswith("is met.")
    assert token.endswith("is not met.")
    low_mi = ab.ablation_verdict(_summary({ab.OPENING_CENTROID: 0.2}), pairs[:2])
    assert next(x for x in low_mi if x.startswith(ab.OPENING_CENTROID + ": gains")).endswith("is not met.")
    small = [gap, _pair(ab.OPENING_CENTROID, ab.UNIFORM_FAST, (0.015, 0.005, 0.03))]  # 38% of the gap
    line = next(x for x in ab.ablation_verdict(_summary({ab.OPENING_CENTROID: 0.9}), small) if "gains" in x)
    assert "38% of the oracle's" in line and line.endswith("is not met.")

"""Token-weighted totals of the routing statistics logged during a run (what LimeRoutingCallback's figures draw)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RunTotals:
    """Host-side, token-weighted totals of the statistics logged so far in this run (for the figures)."""

    def __init__(self) -> None:
        self.layer_tokens: dict[str, float] = {}
        self.layer_load: dict[str, list[float]] = {}
        self.task_probs: dict[str, dict[int, list[float]]] = {}
        self.task_tokens: dict[str, dict[int, float]] = {}
        self.histogram: list[float] = []

    def add(self, layers: Mapping[str, Mapping[str, Any]]) -> None:
        for name, v in layers.items():
            n = v["tokens"]
            self.layer_tokens[name] = self.layer_tokens.get(name, 0.0) + n
            load = self.layer_load.setdefault(name, [0.0] * len(v["load"]))
            self.layer_load[name] = [a + n * b for a, b in zip(load, v["load"])]
            probs, tokens = self.task_probs.setdefault(name, {}), self.task_tokens.setdefault(name, {})
            for t, usage in v["task_usage"].items():
                w = v["task_tokens"][t]
                acc = probs.get(t, [0.0] * len(usage))
                probs[t] = [a + w * u for a, u in zip(acc, usage)]
                tokens[t] = tokens.get(t, 0.0) + w
            hist = v.get("active_histogram", [])
            if len(self.histogram) < len(hist):
                self.histogram += [0.0] * (len(hist) - len(self.histogram))
            for i, c in enumerate(hist):
                self.histogram[i] += c

    def layer_usage(self) -> dict[str, list[float]]:
        return {n: [x / max(self.layer_tokens[n], 1e-12) for x in load] for n, load in self.layer_load.items()}

    def layer_task_summaries(self) -> list[dict[str, Any]]:
        out = []
        for name, probs in self.task_probs.items():
            tokens = self.task_tokens[name]
            out.append(
                {"task_usage": {t: [x / tokens[t] for x in p] for t, p in probs.items()}, "task_tokens": tokens}
            )
        return out

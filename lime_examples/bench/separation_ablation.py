"""Routing ablations of the separation benchmark (``benchmarks/separation.py --ablation``): what LiME's experts buy.

Rows, all LiME E=8 over LoRA r=8 on the same protocol, lr searched per row: the default router; "uniform" (no
router: every token mixes all experts equally, the experts are one learned output scale); the two task oracles
(each task's tokens to a fixed expert, or a learned per-task mix: the ceiling of what routing can add with
modulation experts); the authors' balance schedule (balance 0.01 x (importance 0.1, kl 0.01) on one micro-batch in
50, expert vectors at 2.5x the adapter lr); balance off; jitter off; uniform and oracle again with the expert vectors
at 10x the lr (they move little at the adapter's lr in 60 steps); the centroid router (routing_mode="centroid", no
trainable router parameters). LoRA r=8 is kept as the common reference.

The questions the intervals answer: does the router beat uniform mixing (routing content), does the oracle beat
uniform (headroom for routing), does the balance schedule matter.
"""

from __future__ import annotations

from typing import Any

from .paired_stats import call
from .separation_report import ci, fmt_lr, pts
from .separation_summary import LIME_MICRO, REFERENCE
from .separation_train import Row

LIME_DEFAULT = LIME_MICRO
UNIFORM = "LiME E=8 uniform routing (no router)"
ORACLE = "LiME E=8 oracle: task -> fixed expert"
ORACLE_MIX = "LiME E=8 oracle: learned mix per task"
REF_BALANCE = "LiME E=8 authors' balance schedule + expert lr x2.5"
NO_BALANCE = "LiME E=8 balance off"
NO_JITTER = "LiME E=8 jitter off"
UNIFORM_FAST = "LiME E=8 uniform routing, expert lr x10"
ORACLE_FAST = "LiME E=8 oracle: task -> fixed expert, expert lr x10"
CENTROID = "LiME E=8 centroid router (n_gram 8, tau 0.1, balance off)"
OPENING_CENTROID = "LiME E=8 centroid router on the opening (prefix 2, tau 0.1, balance off), expert lr x10"
OPENING_SHARP = "LiME E=8 centroid router on the opening (prefix 2, tau 0.01, balance off), expert lr x10"
OPENING_TOKEN = "LiME E=8 paper's router on the opening (prefix 2), expert lr x10"
# The gap (points) between the oracle and uniform routing at which a better router is worth building (issue 23).
ORACLE_GAP_POINTS = 3.0
RECOVERY_MI = 0.3  # nats: the task-expert mutual information a router must reach to count as routing by task

# The authors' schedule: their balance factor 0.01 on top of importance 0.1 / kl 0.01, on one micro-batch in 50.
OFF = {"importance_loss_coef": 0.0, "kl_loss_coef": 0.0}
AUTHORS_BALANCE = {"importance_loss_coef": 0.001, "kl_loss_coef": 0.0001, "balance_interval": 50}


def ablation_rows(num_tasks: int) -> list[Row]:
    """The reference LoRA and the LiME routing / balance variants."""
    return [
        Row(REFERENCE, "lora"),
        Row(LIME_DEFAULT, "lime", lime={"balance_scope": "micro_batch"}),
        Row(UNIFORM, "lime", lime={"routing_mode": "uniform"}),
        Row(ORACLE, "lime", lime={"routing_mode": "task"}),
        Row(ORACLE_MIX, "lime", lime={"routing_mode": "task_learned", "num_tasks": num_tasks}),
        Row(REF_BALANCE, "lime", lime=dict(AUTHORS_BALANCE), expert_lr_scale=2.5),
        Row(NO_BALANCE, "lime", lime=dict(OFF)),
        Row(NO_JITTER, "lime", lime={"jitter_noise": 0.0}),
        # The experts move little at the adapter's lr in 60 steps: the same pair with experts 10x faster.
        Row(UNIFORM_FAST, "lime", lime={"routing_mode": "uniform"}, expert_lr_scale=10.0),
        Row(ORACLE_FAST, "lime", lime={"routing_mode": "task"}, expert_lr_scale=10.0),
        # Zero trainable router parameters: cosine of the whole (centred) frozen output to k-means centroids fitted
        # on unlabelled calibration draws, pooled causally over the sequence (n_gram 8 covers these inputs).
        Row(CENTROID, "lime", lime={"routing_mode": "centroid", "n_gram": 8, "temperature": 0.1, **OFF}),
        # Sequence-level routes read from the opening ([CLS] and the task word: ngram_mode="prefix", n_gram 2), at
        # the expert lr where the oracle shows headroom: the zero-parameter centroid router, and the paper's router.
        Row(
            OPENING_CENTROID,
            "lime",
            expert_lr_scale=10.0,
            lime={"routing_mode": "centroid", "ngram_mode": "prefix", "n_gram": 2, "temperature": 0.1, **OFF},
        ),
        # tau 0.1 leaves the route soft (MI 0.19 before training); 0.01 makes it follow the opening (MI 1.16).
        Row(
            OPENING_SHARP,
            "lime",
            expert_lr_scale=10.0,
            lime={"routing_mode": "centroid", "ngram_mode": "prefix", "n_gram": 2, "temperature": 0.01, **OFF},
        ),
        Row(
            OPENING_TOKEN,
            "lime",
            expert_lr_scale=10.0,
            lime={"balance_scope": "micro_batch", "ngram_mode": "prefix", "n_gram": 2},
        ),
    ]


def ablation_pairs() -> list[tuple[str, str]]:
    """(a, b): the differences a - b the report gives with intervals."""
    pairs = [(LIME_DEFAULT, UNIFORM), (ORACLE, UNIFORM), (ORACLE_MIX, UNIFORM), (ORACLE, LIME_DEFAULT)]
    pairs += [(ORACLE_MIX, LIME_DEFAULT), (REF_BALANCE, LIME_DEFAULT), (NO_BALANCE, LIME_DEFAULT)]
    pairs += [(ORACLE_FAST, UNIFORM_FAST), (UNIFORM_FAST, UNIFORM)]
    pairs += [(NO_JITTER, LIME_DEFAULT), (CENTROID, UNIFORM), (CENTROID, LIME_DEFAULT), (ORACLE, CENTROID)]
    pairs += [(OPENING_CENTROID, UNIFORM_FAST), (ORACLE_FAST, OPENING_CENTROID), (OPENING_TOKEN, UNIFORM_FAST)]
    pairs += [(OPENING_SHARP, UNIFORM_FAST), (ORACLE_FAST, OPENING_SHARP), (OPENING_SHARP, LIME_DEFAULT)]
    pairs += [(ORACLE_FAST, OPENING_TOKEN), (OPENING_CENTROID, LIME_DEFAULT), (OPENING_TOKEN, LIME_DEFAULT)]
    return pairs + [(UNIFORM, REFERENCE)]


def _said(diff: tuple[float, float, float]) -> str:
    word = {"higher": "higher", "lower": "lower"}.get(call(diff), "not resolved (the interval contains 0)")
    return f"{pts(diff[0])} points [{pts(diff[1])}, {pts(diff[2])}]: {word}"


def _neg(diff: tuple[float, float, float]) -> tuple[float, float, float]:
    """b - a from a - b (estimate and interval)."""
    return -diff[0], -diff[2], -diff[1]


def ablation_verdict(summary: dict[str, Any], pairs: list[dict[str, Any]]) -> list[str]:
    """Sentences that follow the intervals: routing content, oracle headroom, balance schedule."""
    by = {(p["a"], p["b"]): p["diff"] for p in pairs}
    lines = [f"{a} vs {b}: {_said(d)}." for (a, b), d in by.items()]
    oracle_pairs = ((ORACLE, UNIFORM), (ORACLE_MIX, UNIFORM), (ORACLE_FAST, UNIFORM_FAST))
    best_oracle = max((by[k] for k in oracle_pairs if k in by), default=None, key=lambda d: d[0])
    if best_oracle is not None:
        if 100 * best_oracle[0] >= ORACLE_GAP_POINTS and call(best_oracle) == "higher":
            lines.append(
                f"Headroom for routing: the best task oracle beats uniform mixing by {_said(best_oracle)} (at least "
                f"{ORACLE_GAP_POINTS:.0f} points): a router that knew the task would gain on this benchmark."
            )
        else:
            lines.append(
                f"Headroom for routing: the best task oracle vs uniform mixing is {_said(best_oracle)}, under the "
                f"{ORACLE_GAP_POINTS:.0f}-point bar: even a router that knows each token's task gains nothing measurable "
                "with modulation experts here, so a better router has nothing to recover."
            )
    scale = by.get((UNIFORM, REFERENCE))
    if scale is not None:
        lines.append(
            f"Experts as a learned per-channel scale (uniform mixing) vs LoRA r=8: {_said(scale)}"
            + ("; the expert vectors alone buy nothing measurable." if call(scale) == "not resolved" else ".")
        )
    for other, what in ((NO_BALANCE, "the balance loss off"), (REF_BALANCE, "the authors' balance schedule")):
        diff = by.get((other, LIME_DEFAULT))
        if diff is not None:
            lines.append(f"The default (micro-batch balance, every micro-batch) vs {what}: {_said(_neg(diff))}.")
    return lines + recovery_verdict(summary, by)


def recovery_verdict(summary: dict[str, Any], by: dict[tuple[str, str], Any]) -> list[str]:
    """Issue 23's bar for a router without trainable parameters: it recovers at least half of the oracle's gap over
    uniform mixing (same expert lr) with task-expert mutual information >= 0.3 nats."""
    gap = by.get((ORACLE_FAST, UNIFORM_FAST))
    lines = []
    for router in (OPENING_CENTROID, OPENING_SHARP, OPENING_TOKEN):
        gain = by.get((router, UNIFORM_FAST))
        if gap is None or gain is None or gap[0] <= 0:
            continue
        share = gain[0] / gap[0]
        mi = summary.get(router, {}).get("routing", {}).get("mi_mean")
        met = share >= 0.5 and mi is not None and mi >= RECOVERY_MI and call(gain) == "higher"
        lines.append(
            f"{router}: gains {_said(gain)} over uniform mixing, {100 * share:.0f}% of the oracle's {pts(gap[0])} "
            f"points, MI {mi if mi is None else round(mi, 3)} nats: the bar (half the gap, resolved above 0, MI >= "
            f"{RECOVERY_MI}) is {'met' if met else 'not met'}."
        )
    return lines


def ablation_markdown(result: dict[str, Any]) -> str:
    """The ablation report: protocol pointer, table with MI, paired differences, verdict."""
    a, m, s = result["args"], result["machine"], result["summary"]
    names = [t["name"] for t in result["tasks"]]
    lines = [
        "# Separation benchmark, routing ablations: what LiME's experts buy"
        + (" (quick smoke run: numbers are not meaningful)" if a["quick"] else ""),
        "",
        f"Command: `{result['command']}`.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {a['threads']} torch threads; torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']} ({m['commit']}); {m['date']}. Wall time {result['seconds'] / 60:.1f} "
        f"min ({result['reused_runs']} runs reused with --resume, {result['new_runs']} trained)."
        + (f" Note: {a['note']}" if a.get("note") else ""),
        "",
        "Protocol: as in separation.md (single-task micro-batches of "
        f"{a['micro_batch']}, one per task per step, {a['steps']} steps, AdamW, warm-up 10% then cosine, clipping 1.0); "
        f"lr grid {', '.join(fmt_lr(x) for x in a['lrs'])} searched per row with seed {a['search_seed']} on validation "
        f"(widened at an edge), reporting seeds {a['seeds']}; paired two-level bootstrap ({a['bootstrap']} replicates: "
        "seeds and test items resampled, the same draws for every row), 95% percentile intervals. Mutual information "
        "I(task; expert) from the test-set routing weights (mean over layers, mean over seeds; max log(4) = 1.386).",
        "",
        "| row | lr | macro [95% CI] | seed std | vs LiME default, points [95% CI] | MI (nats) | "
        + " | ".join(names)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    by = {(p["a"], p["b"]): p["diff"] for p in result["pairs"]}
    for name, e in s.items():
        vs = by.get((name, LIME_DEFAULT))
        vs_text = "reference" if name == LIME_DEFAULT else (ci(*vs, points=True) if vs else "")
        mi = e.get("routing", {}).get("mi_mean")
        mi_text = "" if mi is None else f"{mi:.3f}"
        lines.append(
            f"| {name} | {fmt_lr(e['lr'])} | {ci(*e['macro'])} | {e['seed_std']:.3f} | {vs_text} | {mi_text} | "
            + " | ".join(f"{x:.3f}" for x in e["per_task"])
            + " |"
        )
    lines += [
        "",
        "## Paired differences (points, 95% CI)",
        "",
        "| difference | points [95% CI] | reading |",
        "|---|---:|---|",
    ]
    lines += [f"| {p['a']} - {p['b']} | {ci(*p['diff'], points=True)} | {p['call']} |" for p in result["pairs"]]
    lines += ["", "## lr search (validation items correct, seed " + str(a["search_seed"]) + ")", ""]
    for name, srch in result["lr_search"].items():
        grid = ", ".join(f"{k}: {v}" for k, v in srch["correct"].items())
        lines.append(
            f"- {name}: {grid}; chosen {fmt_lr(srch['chosen'])}"
            + (f" (widened: {'; '.join(srch['widened'])})" if srch["widened"] else "")
        )
    lines += ["", "## Verdict", ""] + [f"- {x}" for x in result["verdict"]]
    return "\n".join(lines) + "\n"

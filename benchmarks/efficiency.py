"""Efficiency of LiME E=8 against plain PEFT LoRA r=8 (and the MoLoRA-style and MixLoRA mixtures), on SmolLM2-135M's
architecture at full depth, eager and compiled.

    python benchmarks/efficiency.py                        # full CPU run: results/efficiency.{md,json}
    python benchmarks/efficiency.py --no-compile           # without the torch.compile table (it compiles for long)
    python benchmarks/efficiency.py --quick --out /tmp/x   # smoke run (2 layers, tiny batches, no compile)
    python benchmarks/efficiency.py --from-json benchmarks/results/efficiency.json   # rewrite the markdown only
    python benchmarks/efficiency.py --variants             # the 8-layer variants comparison: efficiency_variants.*

efficiency.md, in order: the machine (CPU, cores, threads, versions, date, git commit, command); the eager headline
table at --layers (default 30) layers: trainable params, train step (forward + backward + AdamW), no-grad eval
forward with LiME's routing statistics off and on, decode ms/token (dynamic KV cache), peak train memory, every method
measured once per repetition in a rotating order, ratios = medians of per-repetition ratios to LoRA [min-max]; the
compiled table (torch.compile inductor, compiled LiME vs compiled LoRA at --compiled-layers, train step and
static-cache decode, compile seconds); the targets for LiME E=8 (reported, never asserted); the per-op profile of one
LiME layer before / after from benchmarks/layer_ops.py JSON files (--ops-before / --ops-after) when both exist.
efficiency.json holds the raw samples, parameters, peak bytes, compiled samples, machine, arguments and target rows.
Measurements: lime_examples/bench/headline.py; tables: lime_examples/bench/headline_report.py; variants:
lime_examples/bench/variants.py and report.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from lime_examples.bench import headline, headline_report, report, variants
from lime_examples.bench.machine import machine_info

LOGGER = logging.getLogger("benchmarks.efficiency")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPS_BEFORE, OPS_AFTER = RESULTS / "layer_ops_before.json", RESULTS / "layer_ops_after.json"
# Headline sizes that the command line can override (None: the Workload's full or quick default).
SIZES = ("layers", "batch", "seq", "eval_batch", "eval_seq", "prompt", "new_tokens", "reps", "steps", "compiled_layers")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (every workload size can be overridden)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, tiny batches, 2 repetitions, no compile")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/, with --quick results/quick/)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="only rewrite the report from a saved efficiency.json (or efficiency_variants.json)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (headline 30, variants 8)")
    p.add_argument("--batch", type=int, default=None, help="train batch (default 4)")
    p.add_argument("--seq", type=int, default=None, help="train sequence length (default 128)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (headline 5, variants 7)")
    g = p.add_argument_group("headline (the default run)")
    g.add_argument("--eval-batch", type=int, default=None, help="eval forward batch (default 16)")
    g.add_argument("--eval-seq", type=int, default=None, help="eval forward length (default 80)")
    g.add_argument("--prompt", type=int, default=None, help="decode prompt tokens (default 32)")
    g.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32)")
    g.add_argument("--steps", type=int, default=None, help="timed train steps per repetition (default 2)")
    g.add_argument("--compiled-layers", type=int, default=None, help="layers of the compiled model (default 8)")
    g.add_argument("--no-compile", action="store_true", help="skip the torch.compile table")
    g.add_argument("--fused", action="store_true",
                   help="eager rows LoRA, LiME E=8, LiME E=8 with the native kernel off and with the fused routing "
                   "region (efficiency_fused.*)")
    g.add_argument("--compile-quick", action="store_true", help="with --quick: do run the compiled table")
    g.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend (inductor; the others only to check the code path quickly)")
    g.add_argument("--ops-before", type=Path, default=None, help=f"layer_ops.py JSON (default {OPS_BEFORE})")
    g.add_argument("--ops-after", type=Path, default=None, help=f"layer_ops.py JSON (default {OPS_AFTER})")
    v = p.add_argument_group("variants (--variants)")
    v.add_argument("--variants", action="store_true", help="the variants comparison: efficiency_variants.*")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds a 1B-class Llama in bf16")
    v.add_argument("--methods", nargs="*", default=None, help="subset of method names (LoRA is always included)")
    v.add_argument("--no-package", action="store_true", help="skip the pip mixlora row even if installed")
    v.add_argument("--no-profile", action="store_true", help="skip the torch.profiler comparison (full CPU run)")
    v.add_argument("--smollm-only", action="store_true", help="on CUDA, skip the 1B-class model")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.device != "cpu" and not args.variants:
        p.error("--device cuda: only with --variants (the headline tables are CPU measurements)")
    return args


def workload(args: argparse.Namespace) -> headline.Workload:
    """The headline sizes: full or quick defaults, overridden by the command line."""
    w = headline.Workload.quick() if args.quick else headline.Workload()
    for name in SIZES:
        if getattr(args, name) is not None:
            setattr(w, name, getattr(args, name))
    w.compile_backend = args.compile_backend
    if w.new_tokens < 2:
        raise SystemExit("--new-tokens: at least 2 (ms/token = (t(n) - t(1)) / (n - 1))")
    return w


def load_layer_ops(before: Path, after: Path) -> dict[str, Any]:
    """Both layer_ops.py JSON files (None for a missing one) and their paths."""
    out: dict[str, Any] = {"before_path": str(before), "after_path": str(after)}
    for key, path in (("before", before), ("after", after)):
        out[key] = json.loads(path.read_text()) if path.is_file() else None
    return out


def run_headline(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Machine (and commit, before anything is written), eager table, compiled table, layer ops, targets."""
    w = workload(args)
    no_compile = args.no_compile or (args.quick and not args.compile_quick)
    result: dict[str, Any] = {
        "command": command,
        "machine": machine_info("cpu", ROOT),
        "args": {**w.to_dict(), "quick": args.quick, "no_compile": no_compile},
    }
    started = time.time()
    names = headline.FUSED_METHODS if args.fused else headline.HEADLINE_METHODS
    LOGGER.info("eager: %s at %d layers, %d repetitions", ", ".join(names), w.layers, w.reps)
    result["eager"] = headline.measure_eager(w, names)
    result["compiled"] = None
    if not no_compile:
        LOGGER.info("compiled (%s): %d layers; compiling takes minutes", w.compile_backend, w.compiled_layers)
        result["compiled"] = headline.measure_compiled(w)
    result["wall_seconds"] = time.time() - started
    result["layer_ops"] = load_layer_ops(args.ops_before or OPS_BEFORE, args.ops_after or OPS_AFTER)
    result["targets"] = headline_report.target_rows(result)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """The headline run (default), the variants comparison (--variants) or a report rewrite (--from-json)."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if "setups" in result:  # a variants JSON
            markdown = report.write_all(result, out_dir, quick="--quick" in result["command"].split())
        else:
            if args.ops_before or args.ops_after:  # newer layer_ops files than the embedded ones
                result["layer_ops"] = load_layer_ops(args.ops_before or OPS_BEFORE, args.ops_after or OPS_AFTER)
            markdown = headline_report.to_markdown(result)
            (out_dir / "efficiency.md").write_text(markdown)
        print(markdown)
        return 0
    if args.variants:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        markdown = report.write_all(variants.run(args, device, command, ROOT), out_dir, quick=args.quick)
        print(markdown)
        return 0
    result = run_headline(args, command)
    stem = "efficiency_fused" if args.fused else "efficiency"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    markdown = headline_report.to_markdown(result)
    (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

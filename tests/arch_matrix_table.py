"""Run the architecture matrix (tests/test_arch_matrix.py) and print it as a markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.arch_matrix_table > /tmp/table.md

The output is README.md's "Supported architectures" section body. Each cell: "pass", "fails in base transformers too"
(the base model without adapter fails the same check: BASE_FAILURES), "refused" (LiME refuses the configuration with a
clear error), "FAIL [n]" (the message is listed under the table) or "n/a" (the check does not apply: no generation in
an encoder, no padding in a vision encoder).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from ._arch_models import ARCHS, FAMILY_OF  # noqa: E402
from .test_arch_matrix import (  # noqa: E402
    BASE_FAILURES,
    GENERATE_CHECKS,
    applicable,
    check_target_parameters,
    run_check,
)

# table column -> the checks it shows (several when they are variants: padding side, or no padding at all)
COLUMNS = {
    "wrap": ("wrap",),
    "train step": ("train_step",),
    "save / load": ("save_load",),
    "batch n=1": ("batch_left_n1", "batch_right_n1", "batch_n1"),
    "batch n=3": ("batch_left_n3", "batch_right_n3", "batch_n3"),
    "batch prefix n=3": ("batch_left_p3", "batch_right_p3", "batch_p3"),
    "generate n=1": (GENERATE_CHECKS[0],),
    "generate n=3": (GENERATE_CHECKS[1],),
    "generate prefix n=3": (GENERATE_CHECKS[2],),
    "disable_adapter": ("disable_adapter",),
    "fused MoE experts": ("target_parameters",),
}
VARIANT = {"left": "left", "right": "right"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), "")
    return f"{type(exc).__name__}: {line}"[:200]


REFUSALS: dict[str, str] = {}  # architecture -> LiME's refusal of its fused expert parameters


def cell(name: str, check: str, failures: list[str]) -> str:
    """The status of one (architecture, check) cell; failure messages are appended to `failures`."""
    if check == "target_parameters":
        try:
            REFUSALS[name] = check_target_parameters(name)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            failures.append(f"{name} / {check}: {_first_line(exc)}")
            return f"FAIL [{len(failures)}]"
        return "refused (below)"
    with tempfile.TemporaryDirectory() as tmp:
        reason = BASE_FAILURES.get((name, check))
        if reason is not None:
            try:
                run_check(name, check, os.path.join(tmp, "base"), adapter=False)
            except AssertionError:
                return "fails in base transformers too"
            failures.append(f"{name} / {check}: the base model passes now: remove it from BASE_FAILURES")
            return f"FAIL [{len(failures)}]"
        try:
            run_check(name, check, tmp)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            failures.append(f"{name} / {check}: {_first_line(exc)}")
            return f"FAIL [{len(failures)}]"
    return "pass"


def column(name: str, checks: tuple[str, ...], failures: list[str]) -> str:
    present = [c for c in checks if applicable(name, c)]
    if not present:
        return "n/a"
    statuses = {c: cell(name, c, failures) for c in present}
    if len(set(statuses.values())) == 1:
        status = next(iter(statuses.values()))
        return status if len(present) == 1 or "left" not in present[0] else f"{status} (left, right)"
    return "; ".join(f"{c.split('_')[1]}: {s}" for c, s in statuses.items())


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    failures: list[str] = []
    lines = [
        "| architecture | family | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for name in ARCHS:
        row = [column(name, checks, failures) for checks in COLUMNS.values()]
        lines.append(f"| {name} | {FAMILY_OF[name]} | " + " | ".join(row) + " |")
        print(f"{name} done", file=sys.stderr, flush=True)
    print("\n".join(lines))
    print()
    print(
        f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__.split('+')[0]}."
    )
    if REFUSALS:
        print()
        names = ", ".join(sorted(REFUSALS))
        print(
            f"Fused MoE experts ({names}: `LoraConfig(target_parameters=[...])`) are refused: `{REFUSALS[min(REFUSALS)]}`"
        )
    if failures:
        print()
        for i, failure in enumerate(failures, 1):
            print(f"{i}. {failure}")
    if BASE_FAILURES:
        print()
        print("Failing in base transformers too (the tests assert the base model fails the same check):")
        print()
        for (name, check), reason in sorted(BASE_FAILURES.items()):
            print(f"- {name} / {check}: {reason}")


if __name__ == "__main__":
    main()

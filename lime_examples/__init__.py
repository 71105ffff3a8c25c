"""What the runnable scripts in examples/ and benchmarks/ share, installed with peft-lime so that they import it.

- ``assets``: weights and data shipped inside pip packages (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2,
  chatterbot-corpus), located without the Hub.
- ``mini_mmt``: the offline multimodal multi-task suite of ``examples/demo.py`` and ``benchmarks/quality.py``.
- ``bench``: the measurement harness, baselines and report writers of ``benchmarks/``.

Optional dependencies (the ``demo`` and ``bench`` extras) are imported only when a loader needs them.
"""

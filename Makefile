# The two commands of the README: `make demo` (the main job) and `make test` (the suite). Both set up .venv/ first.
demo:
	bash scripts/setup.sh && HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py

test:
	bash scripts/setup.sh && .venv/bin/ruff check . && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q --durations=15

.PHONY: demo test

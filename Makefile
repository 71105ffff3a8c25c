# The two commands of the README: `make demo` (the main job) and `make test` (the suite, what CI runs). Both set up
# .venv/ first (scripts/setup.sh: the exact versions of constraints.txt).
#   make test-fast     the suite without the tests marked slow (subprocesses, torchrun, benchmark / demo / example runs)
#   make test-latest   the whole suite in .venv-latest/, set up with the newest versions pyproject.toml allows
#   make constraints   rewrite constraints.txt from .venv/, or from FROM=.venv-latest after test-latest passed
# PYTEST_ARGS adds pytest arguments, e.g. make test-fast PYTEST_ARGS="-x tests/test_layer.py"

# PEFT_LIME_DEPS is set here, so that one left in the environment cannot send the set-up to the other venv
setup = PEFT_LIME_DEPS=$(1) bash scripts/setup.sh
# ruff, then pytest, with the tools of virtual environment $(1) and the extra pytest arguments $(2)
check = $(1)/bin/ruff check . && HF_HUB_OFFLINE=1 $(1)/bin/python -m pytest -q --durations=15 $(2) $(PYTEST_ARGS)

demo:
	$(call setup,pinned) && HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py

test:
	$(call setup,pinned) && $(call check,.venv)

test-fast:
	$(call setup,pinned) && $(call check,.venv,-m "not slow")

test-latest:
	$(call setup,latest) && $(call check,.venv-latest)

constraints:
	bash scripts/freeze_constraints.sh $(FROM)

.PHONY: demo test test-fast test-latest constraints

# `make demo` trains a LoHa on the built-in tiny model; `make test` runs the test suite. Both set up .venv first.
VENV_STAMP := .venv/.installed

$(VENV_STAMP): tools/setup-venv.sh tools/requirements-dev.txt tools/constraints.txt
	bash tools/setup-venv.sh
	touch $(VENV_STAMP)

.PHONY: demo test
demo: $(VENV_STAMP)
	.venv/bin/python -m lohatrain train --demo --output-dir out

test: $(VENV_STAMP)
	bash tools/install-chromium.sh
	.venv/bin/python -m pytest -q

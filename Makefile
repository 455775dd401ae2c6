# `make demo` trains a LoHa on the built-in tiny model; `make test` runs the test suite in both environments
# (newest torch, and the stock WebUI's torch 2.1.2 on Python 3.10). Each sets up its venv first.
VENV_STAMP := .venv/.installed
STOCK_STAMP := .venv-stock/.installed

$(VENV_STAMP): tools/setup-venv.sh tools/requirements-dev.txt tools/constraints.txt install.py
	bash tools/setup-venv.sh
	touch $(VENV_STAMP)

$(STOCK_STAMP): tools/setup-venv-stock.sh tools/requirements-stock.txt tools/constraints-stock.txt install.py
	bash tools/setup-venv-stock.sh
	touch $(STOCK_STAMP)

.PHONY: demo test test-newest test-stock
demo: $(VENV_STAMP)
	.venv/bin/python -m lohatrain train --demo --output-dir out

test: test-newest test-stock

# Everything, the browser tests included, on the newest torch.
test-newest: $(VENV_STAMP)
	bash tools/install-chromium.sh
	.venv/bin/python -m pytest -q

# The engine, the host stand-in, the REST routes and install.py again as a stock WebUI v1.10.1 runs them
# (the browser tests run once, above; install.py's registry tests too).
test-stock: $(STOCK_STAMP)
	LOHATRAIN_FAST_TESTS=1 .venv-stock/bin/python -m pytest -q --ignore=tests/test_webui_browser.py

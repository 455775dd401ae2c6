# `make demo` trains a LoHa on the built-in tiny model; `make test` runs the test suite in three environments
# (newest torch, the stock WebUI's torch 2.1.2 on Python 3.10, and Forge 2's Gradio 4). Each sets up its venv first.
VENV_STAMP := .venv/.installed
STOCK_STAMP := .venv-stock/.installed
GRADIO4_STAMP := .venv-gradio4/.installed

$(VENV_STAMP): tools/setup-venv.sh tools/requirements-dev.txt tools/constraints.txt install.py
	bash tools/setup-venv.sh
	touch $(VENV_STAMP)

$(GRADIO4_STAMP): tools/setup-venv-gradio4.sh tools/requirements-gradio4.txt tools/constraints.txt install.py
	bash tools/setup-venv-gradio4.sh
	touch $(GRADIO4_STAMP)

$(STOCK_STAMP): tools/setup-venv-stock.sh tools/requirements-stock.txt tools/constraints-stock.txt install.py
	bash tools/setup-venv-stock.sh
	touch $(STOCK_STAMP)

.PHONY: demo test test-newest test-stock test-gradio4 screenshots
demo: $(VENV_STAMP)
	.venv/bin/python -m lohatrain train --demo --output-dir out

test: test-newest test-stock test-gradio4

# Two pytest workers, one torch thread each: the tiny models' steps are many small ops, so two processes
# nearly halve the time where two threads in one process gain little (and thrash against a second process).
PYTEST_ARGS := -q -n 2 --dist loadfile

# Everything, the browser tests included, on the newest torch.
test-newest: $(VENV_STAMP)
	bash tools/install-chromium.sh
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest $(PYTEST_ARGS)

# What depends on the torch and lycoris-lora versions, again as a stock WebUI v1.10.1 runs it (Python 3.10,
# torch 2.1.2, lycoris-lora 3.4 through install.py): the engine, every network type's maths, precision, the
# entry script, the installer, loading a checkpoint file (weights-only pickles, assigned weights), torchrun's
# data-parallel runs and the GPU benchmark's dry run (torch's FLOP counter differs by version). Gradio, the web
# stack and ldm are at the same pins in both environments, so the tab, the routes and the host stand-ins run once,
# above (Forge 2 installs torch 2.3.1 and reForge main torch 2.9.0, not 2.1.2: their tests run once too).
STOCK_TESTS := tests/test_allocator.py tests/test_engine.py tests/test_golden.py tests/test_network.py tests/test_methods.py \
	tests/test_precision.py tests/test_resume.py tests/test_entry.py tests/test_install.py tests/test_process_state.py \
	tests/test_dataset.py \
	tests/test_checkpoint.py tests/test_distributed.py tests/test_benchmarks.py tests/test_imports.py tests/test_targets.py \
	tests/test_loss_and_noise.py tests/test_optimizers.py tests/test_kohya_dataset.py tests/test_kohya_config.py \
	tests/test_memory_estimate.py
# The files of every type and family byte for byte (test_golden.py, hashes recorded per torch version) run here
# too. What differs by model family (the SD2 and SDXL cases: -m), by operating system or only in lohatrain's own
# logic (refusal messages) runs once, above: STOCK_SKIP.
STOCK_SKIP := on_sd2_and_sdxl or killed_command_line or changed_dataset or another_model or damaged_state \
	or keeps_the_runs_settings or any_file_a_run_saved or saved_demo or lowers_the_loss or another_seed \
	or a_lycoris_that or pip_failure or torch_too_old or does_not_divide or help_lists or options_override \
	or progress_bar or process_that_dies or rest_refuses or doctor_counts_masks or settings_that_cannot_work \
	or prodigy_takes_learning_rates or missing_package or the_rest_check_and_the_tab or doctor_reports_each_sub_folder \
	or kohya_over_rest or kohya_form_settings or leaves_the_file_as_it_was or prints_the_estimate or quick_dry_run
test-stock: $(STOCK_STAMP)
	LOHATRAIN_FAST_TESTS=1 OMP_NUM_THREADS=1 .venv-stock/bin/python -m pytest $(PYTEST_ARGS) $(STOCK_TESTS) \
		-m "not other_families" -k "not ($(STOCK_SKIP))"

# What depends on the Gradio version, under Forge 2's web stack (Gradio 4.40, FastAPI 0.104, pydantic 2): the tab in
# the browser and the REST routes, on a Forge host. The A1111 page under Gradio 3.41 runs above, in test-newest.
test-gradio4: $(GRADIO4_STAMP)
	bash tools/install-chromium.sh
	OMP_NUM_THREADS=1 .venv-gradio4/bin/python -m pytest -q tests/test_webui_browser_forge.py

# The README's pictures, taken by the browser tests after their runs, so they show the tab as it is: the A1111 page
# (docs/screenshot.png, grid.png, caption.png) and the Forge page under Gradio 4 (docs/screenshot-forge.png).
screenshots: $(VENV_STAMP) $(GRADIO4_STAMP)
	bash tools/install-chromium.sh
	LOHATRAIN_SCREENSHOTS=docs OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_webui_browser.py \
		-k "training_from_the_tab or caption_a_folder"
	LOHATRAIN_SCREENSHOTS=docs OMP_NUM_THREADS=1 .venv-gradio4/bin/python -m pytest -q tests/test_webui_browser_forge.py \
		-k "training_on_forge"

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

# What depends on the torch, lycoris-lora and Pillow versions, again as a stock WebUI v1.10.1 runs it (Python 3.10,
# torch 2.1.2, lycoris-lora 3.4 through install.py, Pillow 9.5): every type's and family's file byte for byte
# (test_golden.py, hashes recorded per torch version: any change of the engine's numbers on this torch shows there),
# every network type's maths and files read by lycoris 3.4, precision and autocast, resume's random states and loss
# scaler, the optimizers' packages, the memory estimate's fake tensors against a real step, checkpoint files
# (weights-only pickles), images, the entry script, the installer and torchrun. What is lohatrain's own logic
# (settings, dataset rules, kohya options, refusals, the tab and routes, the hosts) runs once, above: Gradio, the web
# stack and ldm are at the same pins in both environments, and Forge 2 (torch 2.3.1) and reForge (torch 2.9.0) do
# not run torch 2.1.2.
STOCK_TESTS := tests/test_golden.py tests/test_network.py tests/test_methods.py tests/test_precision.py \
	tests/test_optimizers.py tests/test_checkpoint.py tests/test_dataset.py tests/test_entry.py tests/test_install.py \
	tests/test_imports.py tests/test_process_state.py tests/test_allocator.py tests/test_distributed.py \
	tests/test_engine.py::test_train_dtype_is_the_unets_compute_dtype tests/test_engine.py::test_save_dtype_is_honoured \
	tests/test_engine.py::test_gradient_checkpointing_gives_the_same_result \
	tests/test_engine.py::test_model_is_left_exactly_as_found \
	tests/test_resume.py::test_stopped_at_any_step_and_resumed_the_files_are_the_uninterrupted_runs \
	tests/test_resume.py::test_resume_is_exact_in_fp16_with_its_loss_scaler \
	"tests/test_memory_estimate.py::test_the_estimate_is_what_a_real_step_holds[sd1-loha-bf16]" \
	tests/test_memory_estimate.py::test_the_fp8_change_is_the_estimate_of_the_model_held_in_fp8 \
	tests/test_memory_estimate.py::test_the_optimizer_state_counted_is_what_each_optimizer_keeps
# Of those, what differs only in lohatrain's own logic (refusal messages, help text) or by operating system, and the
# SD2 and SDXL cases (-m), runs once, above.
STOCK_SKIP := a_lycoris_that or pip_failure or torch_too_old or does_not_divide or help_lists or options_override \
	or progress_bar or process_that_dies or settings_that_cannot_work or prodigy_takes_learning_rates \
	or missing_package or demo_prints
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

"""The GPU queue: one FIFO lock around everything that uses the model, and the wrappers the host puts around
Gradio handlers.

What the host's wrappers do, kept here:
- `wrap_gradio_gpu_call`: a first argument "task(...)" is the job id (others: job None); waits for
  `queue_lock`, `state.begin(job=id)`, calls, records the result for the progress API, `state.end()` — but
  `state.end()` is skipped when the handler raises.
- `wrap_gradio_call`: afterwards (also on error) clears state.skipped / interrupted / stopping_generation,
  job_count = 0 and job = "".
- `wrap_gradio_call_no_job`: the handler's return value goes through `list(...)` (so a handler must return a
  list/tuple of outputs; a bare string would be split into characters); an exception is printed and turned into
  `extra_outputs + ["<div class='error'>Type: message</div>"]` (extra_outputs defaults to [None, '']) — so
  the handler's LAST output must be an HTML component. With add_stats (the gpu wrapper) a timing `<div>` is
  appended with `+=` to the last output, which therefore must be a string; the result is a tuple.
Ports modules/call_queue.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import html
import time
from functools import wraps

from modules import devices, errors, fifo_lock, progress, shared

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        if args and type(args[0]) is str and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None

        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        finally:
            state = shared.state
            state.skipped = state.interrupted = state.stopping_generation = False
            state.job_count = 0
            state.job = ""

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        started = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report(f"Error completing request\nArguments: {args} {kwargs}"[:131072], exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, '']
            res = extra_outputs_array + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]

        devices.torch_gc()
        if not add_stats:
            return tuple(res)

        elapsed = time.perf_counter() - started
        minutes, seconds = int(elapsed // 60), elapsed % 60
        text = (f"{minutes} min. " if minutes else "") + f"{seconds:.1f} sec."
        res[-1] += (f"<div class='performance'><p class='time'>Time taken: <wbr>"
                    f"<span class='measurement'>{text}</span></p></div>")
        return tuple(res)

    return f

"""modules/scripts.py's `ScriptRunner` (v1.10.1): the object `p.scripts` holds during a generation.

What processing calls on it: `before_process`, `process`, `before_process_batch`, `process_batch`, `postprocess`,
each running that hook of every always-on script with its slice of `p.script_args` (an error in a script is
reported, not raised), and reForge reads `alwayson_scripts` directly. The host fills a runner from the extensions'
scripts at start-up (`scripts_txt2img`); here no script is ever loaded, so a runner has none. Left out: the UI,
selectable scripts, user ordering of callbacks.
Ports modules/scripts.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from modules import errors


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]

    def _run(self, method_name, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, method_name)(p, *args, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)


scripts_txt2img: ScriptRunner = None

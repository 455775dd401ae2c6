"""`SdConditioning`: the list of prompts the host hands to `get_learned_conditioning`, carrying the generation's
width/height (SDXL puts them into its "vector") and whether these are negative prompts.

Left out: prompt editing / alternation schedules (`[a:b:0.5]`, `[a|b]`) and `get_learned_conditioning`'s
per-step schedules and caching; the stand-in's txt2img calls the model's `get_learned_conditioning` once per
batch with an `SdConditioning`.
Ports modules/prompt_parser.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)

"""`model_hijack`: on load the host wraps SD1's text encoder (see sd_hijack_clip) and undoes it before loading
other weights into the same model object."""


class StableDiffusionModelHijack:
    def __init__(self):
        self.comments = []
        self.extra_generation_params = {}
        self.fixes = None

    def hijack(self, m):
        from modules import sd_hijack_clip
        stage = getattr(m, "cond_stage_model", None)
        if stage is not None and sd_hijack_clip.is_sd1_clip(stage):
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(stage, self)

    def undo_hijack(self, m):
        from modules import sd_hijack_clip
        if isinstance(getattr(m, "cond_stage_model", None), sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
            m.cond_stage_model = m.cond_stage_model.wrapped

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()

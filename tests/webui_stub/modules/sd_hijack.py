"""`model_hijack`: on load the host wraps the text encoders (see sd_hijack_clip, sd_hijack_open_clip) and undoes it
before loading other weights into the same model object.

- SD1: `cond_stage_model` (ldm's FrozenCLIPEmbedder) becomes `FrozenCLIPEmbedderWithCustomWords(it)`; undo puts
  the embedder back.
- SD2: `cond_stage_model` (ldm's FrozenOpenCLIPEmbedder) becomes `sd_hijack_open_clip.
  FrozenOpenCLIPEmbedderWithCustomWords(it)`; undo puts the embedder back.
- SDXL (a model with a `conditioner`): each text embedder of `conditioner.embedders` is replaced IN THE LIST by
  its wrapper (CLIP-L: `FrozenCLIPEmbedderForSDXLWithCustomWords`, bigG: `FrozenOpenCLIPEmbedder2WithCustomWords`),
  the size embedders stay; `m.cond_stage_model = conditioner` (with two or more text embedders, as SDXL base).
  Undo puts the embedders back in the list and deletes `cond_stage_model`, as the host does.
Left out: the `EmbeddingsWithFixes` wrapper around token embeddings (textual inversion), cross-attention
optimizations, SD3/XLM-R wrappers, the flattened `layers` list.
Ports modules/sd_hijack.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""


class StableDiffusionModelHijack:
    def __init__(self):
        self.comments = []
        self.extra_generation_params = {}
        self.fixes = None

    def hijack(self, m):
        from modules import sd_hijack_clip, sd_hijack_open_clip
        conditioner = getattr(m, 'conditioner', None)
        if conditioner:
            text_cond_models = []
            for i, embedder in enumerate(conditioner.embedders):
                if sd_hijack_clip.is_sd1_clip(embedder):
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                elif sd_hijack_open_clip.is_open_clip2(embedder):
                    wrapper = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder, self)
                    conditioner.embedders[i] = wrapper
                    text_cond_models.append(conditioner.embedders[i])
            m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner

        stage = getattr(m, "cond_stage_model", None)
        if stage is not None and sd_hijack_clip.is_sd1_clip(stage):
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(stage, self)
        elif stage is not None and sd_hijack_open_clip.is_open_clip(stage):
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(stage, self)

    def undo_hijack(self, m):
        from modules import sd_hijack_clip, sd_hijack_open_clip
        conditioner = getattr(m, 'conditioner', None)
        if conditioner:
            for i, embedder in enumerate(conditioner.embedders):
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
                    conditioner.embedders[i] = embedder.wrapped
            if hasattr(m, 'cond_stage_model'):  # as the host: the SDXL model has none until the next hijack
                delattr(m, 'cond_stage_model')
        elif isinstance(getattr(m, "cond_stage_model", None), sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
            m.cond_stage_model = m.cond_stage_model.wrapped
        elif type(getattr(m, "cond_stage_model", None)) is sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords:
            m.cond_stage_model = m.cond_stage_model.wrapped

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()

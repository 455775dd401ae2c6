"""The steps × strength grid through the host stand-in's own txt2img and Lora extension."""

import numpy as np
import pytest
from PIL import Image

from a1111 import loaded
from runs import model_state, settings_for

from lohatrain import grid
from lohatrain.errors import LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.trainer import train
from lohatrain.webui import actions
from modules import processing, shared


@pytest.fixture
def trained(webui, sample_dataset):  # noqa: F811
    """A run saved at steps 2 and 4 in the Lora folder, with 3-step previews."""
    model = loaded(webui)
    settings = settings_for(sample_dataset, webui / "Lora", name="grid-run", steps=4, save_every_steps=2,
                            learning_rate=2e-2, preview_steps=3, preview_seed=11, preview_prompts=["blue circle"])
    train(ldm_parts(model), settings)
    return webui


def test_grid_has_a_column_per_saved_step_and_a_row_per_strength(trained):
    before = model_state(shared.sd_model)
    made = actions.make_grid("grid-run", strengths=[0, 1], seed=5)
    assert model_state(shared.sd_model) == before
    assert [c.label for c in made.plan.columns] == ["No LoRA", "Step 2", "Step 4"]
    assert made.plan.prompts == ["blue circle"] and made.plan.strengths == [0.0, 1.0]
    (rows,) = made.cells
    assert [len(row) for row in rows] == [3, 3]
    def px(image):
        return np.asarray(image, dtype=np.int16)

    plain = px(processing.process_images(processing.StableDiffusionProcessingTxt2Img(
        prompt="blue circle", seed=5, steps=3, sampler_name="DPM++ 2M", width=64, height=64, do_not_save_grid=True,
        do_not_save_samples=True)).images[0])

    for row in rows:  # the no-LoRA column is a plain txt2img with the same seed
        assert np.array_equal(px(row[0]), plain)
    assert all(np.array_equal(px(cell), plain) for cell in rows[0])  # strength 0 changes nothing
    assert not np.array_equal(px(rows[1][2]), plain)  # the trained file at strength 1 does
    assert not np.array_equal(px(rows[1][1]), px(rows[1][2]))  # step 2 is not step 4

    (saved,) = made.files
    assert saved == trained / "Lora" / "grid-run.grid.png"
    with Image.open(saved) as picture:  # labels above and to the left of the 3 × 2 cells
        assert picture.width > 3 * 64 and picture.height > 2 * 64


def test_grid_defaults_to_the_runs_preview_prompt_seed_and_three_strengths(trained):
    chosen = grid.plan(trained / "Lora", "grid-run")
    assert chosen.prompts == ["blue circle"] and chosen.seed == 11 and chosen.strengths == [0.5, 0.75, 1.0]
    assert chosen.cells == 1 + 2 * 3


def test_a_grid_that_cannot_be_made_says_why_and_saves_nothing(trained):
    for name, kwargs, message in [("no-such-run", {}, "no trained file named no-such-run"),
                                  ("../grid-run", {}, "name"),
                                  ("grid-run", {"strengths": [0.5, 9]}, "between -4 and 4"),
                                  ("grid-run", {"strengths": [0.1] * 61}, "more than 120 images")]:
        with pytest.raises(LohatrainError, match=message):
            actions.make_grid(name, **kwargs)
    assert not list((trained / "Lora").glob("*.png"))


def test_another_loras_file_with_a_similar_name_is_not_a_column(trained):
    lora = trained / "Lora"
    (lora / "grid-run-7.safetensors").write_bytes((lora / "grid-run-2.safetensors").read_bytes().replace(
        b'"ss_output_name":"grid-run"', b'"ss_output_name":"other-xx"'))
    assert [c.label for c in grid.plan(lora, "grid-run").columns] == ["No LoRA", "Step 2", "Step 4"]

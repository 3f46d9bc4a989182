"""datagen with models: a tiny Stable Diffusion pipeline and a tiny causal LM, built from configs,
saved locally and loaded back through the real `from_pretrained` (random weights, so outputs are noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen import DatagenError, DiffusionRenderer, GenerateConfig, load_pipeline, make_strip, run, template_story
from datagen.run import strip_seed
from datagen.story import LMStoryWriter
from datagen.testing import save_tiny_causal_lm, save_tiny_sd_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a 2-core machine shared with other jobs, two torch threads wait on each other:
    # the tiny UNet took 1.6 s per call with 2 threads and 0.03 s with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def pipeline(sd_folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_pipeline(str(sd_folder))


def test_tiny_pipeline_renders_a_strip(pipeline, sd_folder):
    assert type(pipeline).__name__ == "StableDiffusionPipeline"  # what AutoPipelineForText2Image chose
    renderer = DiffusionRenderer(pipeline, model_id=str(sd_folder), steps=2, batch_size=4)  # batches of 4 + 2
    strip = make_strip(5, panel_size=64, align=32, renderer=renderer)
    assert strip.image.size == (384, 64) and len(set(strip.letters)) == 6
    assert strip.meta["renderer"] == "diffusers" and strip.meta["model_id"] == str(sd_folder)
    assert strip.meta["object_boxes"] is None and strip.captions == template_story(5).captions
    again = make_strip(5, panel_size=64, align=32, renderer=renderer)
    assert strip.image.tobytes() == again.image.tobytes()  # seeded generators: bit-identical
    panels = [np.asarray(strip.image.crop(b)) for b in strip.panels]
    assert len({p.tobytes() for p in panels}) == 6  # six prompts, six different panels


def test_run_with_diffusers_and_story_model(tmp_path, sd_folder, lm_folder, pipeline):
    out = tmp_path / "ds"
    dsd = run(GenerateConfig(out=str(out), n_strips=2, eval_fraction=0.5, renderer="diffusers",
                             model_id=str(sd_folder), panel_size=64, steps=2, story_model=str(lm_folder)),
              progress=False)
    row = dsd["discovery"][0]
    assert row["renderer"] == "diffusers" and row["model_id"] == str(sd_folder) and row["object_boxes"] is None
    # A random-weight LM writes no six numbered lines: the template story is used, and says so.
    assert row["story"]["writer"] == f"template (lm:{lm_folder} unparseable)"
    assert row["captions"] == list(template_story(strip_seed(0, 0)).captions)
    # The run's pipeline (built from --model-id) draws what a caller-built one draws.
    strip = make_strip(strip_seed(0, 0), panel_size=64, align=32,
                       renderer=DiffusionRenderer(pipeline, model_id=str(sd_folder), steps=2))
    assert np.array_equal(np.asarray(row["image"]), np.asarray(strip.image))


def test_lm_writer_is_seeded(lm_folder):
    writer = LMStoryWriter(str(lm_folder), max_new_tokens=40)
    assert writer.write(3) == writer.write(3)


def test_models_that_cannot_load_are_clear_errors(tmp_path, pipeline, sd_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for bad in (str(tmp_path / "missing"), "nobody/no-such-model"):
        with pytest.raises(DatagenError, match="cannot load a text-to-image pipeline"):
            load_pipeline(bad)
        with pytest.raises(DatagenError, match="cannot load story model"):
            LMStoryWriter(bad)
    with pytest.raises(DatagenError, match="multiple of 4"):  # VAE scale 2, UNet halves once more
        make_strip(0, panel_size=62, renderer=DiffusionRenderer(pipeline, model_id=str(sd_folder)))
    out = tmp_path / "ds"
    with pytest.raises(DatagenError, match="cannot load"):
        run(GenerateConfig(out=str(out), renderer="diffusers", model_id="nobody/no-such-model", panel_size=64))
    assert not out.exists()  # nothing written for a model that does not load

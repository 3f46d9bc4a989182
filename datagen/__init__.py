"""datagen: six-panel comic strips for gaze-head discovery, in memory or as a Hugging Face dataset.

Stages, one module each: story -> panels -> letters -> strip -> dataset.

    story.py       seeded template stories (the vocabulary), optional LM writer
    procedural.py  offline PIL renderer (default); make_scene for multi-object images
    diffusion.py   any diffusers text-to-image checkpoint (the caller builds the pipeline)
    letters.py     a distinct, legible letter per panel
    assemble.py    panels -> gaze.strips.Strip on the model's patch grid
    dataset.py     Features, card, Parquet / save_to_disk / Hub, comicN/ folders
    run.py         make_strip (one strip) and run (a resumable dataset job)
    cli.py         python -m datagen generate | import | export | push

    >>> strip = make_strip(0, panel_size=64)
    >>> strip.captions[0], strip.letters[0]
"""

from datagen.diffusion import DiffusionRenderer, load_pipeline
from datagen.procedural import make_scene
from datagen.run import GenerateConfig, make_strip, run
from datagen.story import ACTIONS, CHARACTERS, OBJECTS, SCENES, DatagenError, Story, template_story

__all__ = [
    "make_strip", "make_scene", "template_story", "Story", "run", "GenerateConfig", "DiffusionRenderer",
    "load_pipeline", "DatagenError", "CHARACTERS", "ACTIONS", "OBJECTS", "SCENES",
]

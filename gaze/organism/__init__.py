"""The model organism: a tiny Qwen3-VL trained by this project, small enough to ship and run on a CPU.

    weights/   the shipped organism (`gaze.load("organism")`), with its tokenizer, processor,
               prompts.json (the prompts it was trained on), training.json and ranking.json
    train.py   the training recipe, one seeded command per stage (its docstring)
    check.py   does an organism have gaze heads? the mechanism first, then tasks and steering
               on held-out strips of every layout (`python -m gaze.organism.check`)
    NOTES.md   the recipes tried, dated, and what each showed

Nothing here is imported by `import gaze`.
"""

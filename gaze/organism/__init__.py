"""The model organism: a tiny Qwen3-VL trained by this project, small enough to ship and run on a CPU.

    weights/   the shipped organism (`gaze.load("organism")`), with its tokenizer, processor,
               prompts.json (the prompts it was trained on), training.json and ranking.json
    train.py   the training recipe (`python -m gaze.organism.train --out FOLDER`)
    check.py   does an organism have gaze heads? (`python -m gaze.organism.check`)
    NOTES.md   the recipes tried, dated, and what each showed

Nothing here is imported by `import gaze`.
"""

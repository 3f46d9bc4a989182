"""Evaluation of steering: the paper's protocols, judged offline, with CIs and a report.

    config      EvalConfig (one field per `gaze eval` flag), protocols, conditions
    protocols   vqa, narration, dynamic, region, sweep; `run_eval` (resumable)
    heads       the head sets of each condition (gaze, random, all, image, localization)
    judges      caption, letter, embedding and LLM judges
    statistics  the bootstrap CI and Spearman's rho
    records     the resumable record log
    report      README.md + figures from a run
    cli         `gaze eval`

Depends on the `gaze` core; the core never imports it.
"""

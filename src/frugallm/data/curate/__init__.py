"""``frugallm curate``: dedup, quality filters and decontamination on datatrove.

recipe.py (the ``Recipe`` dataclasses; ``default.toml`` lists every field with its reason, ``web.toml`` is
``--recipe web``) -> code.py (rules for source code), text.py (kinds of text and their rules, thresholds
measured in ``text_thresholds.toml``) and steps.py (the pipeline steps and the meters) -> pipeline.py
(``curate()``: the passes and their executors) -> report.py (funnel table, kinds, edits, figure) and cli.py
(``frugallm curate``); evalset.py builds the labelled stdlib set the tests judge the default recipe on.
Nothing is imported here, so ``frugallm curate --print-recipe`` does not load datatrove.
"""

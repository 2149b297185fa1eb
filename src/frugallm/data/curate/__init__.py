"""``frugallm curate``: dedup, quality filters and decontamination on datatrove.

recipe.py (the ``Recipe`` dataclasses; ``default.toml`` lists every field with its reason) -> code.py (rules for
source code) and steps.py (the pipeline steps and the meters) -> pipeline.py (``curate()``: the passes and
their executors) -> report.py (funnel table and figure) and cli.py (``frugallm curate``). Nothing is imported
here, so ``frugallm curate --print-recipe`` does not load datatrove.
"""

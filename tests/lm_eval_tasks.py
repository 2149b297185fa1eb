"""Two tiny lm-evaluation-harness tasks written as local YAML + JSON lines (nothing downloaded): a
multiple-choice task whose choices share each question's context, and a greedy ``generate_until`` task.
Shared by tests/test_serve_lm_eval.py and benchmarks/eval_vs_hf.py."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

WORDS = ["the", "cheapest", "token", "is", "one", "served", "from", "cache", "multi-head", "latent", "attention",
         "keeps", "a", "budget", "plan", "for", "money", "speculative", "decoding", "drafts", "with", "module"]


def write_tasks(root: Path, n_mc: int = 6, n_gen: int = 3, n_choices: int = 4, context_words: int = 24,
                seed: int = 0) -> Path:
    """Writes ``tiny_mc`` and ``tiny_gen`` under ``root``; returns the include path for ``TaskManager``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(root / "mc.jsonl", "w") as f:
        for _ in range(n_mc):
            choices = [sentence(rng.randint(1, 4)) for _ in range(n_choices)]
            f.write(json.dumps({"question": sentence(context_words), "choices": choices,
                                "answer": rng.randrange(n_choices)}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for _ in range(n_gen):
            f.write(json.dumps({"question": sentence(8), "answer": sentence(2)}) + "\n")
    common = "test_split: test\ndataset_path: json\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"money\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def evaluate(model: str, model_args: str, tasks: list[str], include_path: Path, batch_size: int = 1) -> dict:
    """lm_eval.simple_evaluate with the per-sample responses (``samples``); ``results["scoring_seconds"]`` is
    the time spent in the model's ``loglikelihood`` and ``generate_until`` calls alone (no task building,
    no model loading)."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm = get_model(model).create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})
    spent = [0.0]
    for name in ("loglikelihood", "generate_until"):
        inner = getattr(lm, name)

        def timed(*a, inner=inner, **kw):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(lm, name, timed)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, num_fewshot=0,
                                      task_manager=TaskManager(include_path=str(include_path),
                                                               include_defaults=False))  # indexing the built-in tasks took 28 s here
    results["scoring_seconds"] = spent[0]
    return results

"""The synthetic corpus the training tests learn from: templated code-like documents with structure a
model picks up in a few dozen steps. Plain Python (``random.Random`` with a fixed seed), so it is the same
on every host; ``conftest.corpus_dir`` and the golden loss curve both write it."""

from __future__ import annotations

import random
from pathlib import Path


def write_corpus(d: Path, n_docs: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        a, b = rng.choice(names), rng.choice(names)
        body = "\n".join(f"    {a}_{j} = {b}({j}, {rng.randint(0, 9)})" for j in range(rng.randint(3, 9)))
        (d / f"doc{i:03d}.py").write_text(f"def {a}_{b}_{i}(x):\n{body}\n    return {a}_0 + x\n")
    return d

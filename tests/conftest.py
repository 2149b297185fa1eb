import os
import random
import warnings

import pytest
import torch

# deterministic, and quiet on the 2-core CI machine
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny matmuls: a second thread only adds synchronisation, and the CI
    machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small synthetic corpus with learnable structure: templated code-like documents."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    for i in range(240):
        a, b = rng.choice(names), rng.choice(names)
        body = "\n".join(f"    {a}_{j} = {b}({j}, {rng.randint(0, 9)})" for j in range(rng.randint(3, 9)))
        (d / f"doc{i:03d}.py").write_text(f"def {a}_{b}_{i}(x):\n{body}\n    return {a}_0 + x\n")
    return d

import os
import warnings

import pytest
import torch

from corpus import write_corpus

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
    """A small synthetic corpus with learnable structure (``corpus.write_corpus``)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))

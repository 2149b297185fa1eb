import os
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

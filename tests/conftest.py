import pytest
import torch

# One intra-op thread: the test models are tiny, and on a small shared machine extra
# threads cost far more in synchronisation than they win (seen: 50x slower at 2 threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Run-signing keys (fxgrow.trust) live in a folder of this test session, never the user's;
# processes the tests start inherit it.
os.environ["FXGROW_CONFIG_DIR"] = tempfile.mkdtemp(prefix="fxgrow-test-config-")
atexit.register(shutil.rmtree, os.environ["FXGROW_CONFIG_DIR"], ignore_errors=True)

# One intra-op thread: the test models are tiny, and on a small shared machine extra
# threads cost far more in synchronisation than they win (seen: 50x slower at 2 threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

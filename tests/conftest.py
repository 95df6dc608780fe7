"""Shared test settings: offline, a throwaway model cache, and the benchmark data directory."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FARE_DATA_DIR", str(REPO.parent / "shared" / "data"))
if "FARE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FARE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fare-cache-")


# Tiny matmuls on a busy 2-core machine are far slower with several threads (oversubscription).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FARE_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"FARE_DATA_DIR={path} does not exist: point it at a copy of shared/data")
    return path


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """Local directory of the default ``fare-tiny`` (OLMoE) model + tokenizer."""
    from fare_core.tiny import tiny_model_path

    return tiny_model_path("fare-tiny")

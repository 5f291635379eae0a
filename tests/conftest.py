import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; it must be set before any kernel
# module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The checkout's folders are kairos's subpackages, not top-level packages: on sys.path (as
    # `python -m pytest` puts the working directory) they shadow distributions of the same
    # name, such as Hugging Face's `kernels`, which transformers imports.
    if any(Path(entry or ".").resolve() == ROOT for entry in sys.path):
        raise pytest.UsageError(f"{ROOT} is on sys.path, where its folders shadow other packages "
                                "(Hugging Face's kernels among them): run `pytest` or `make test`, "
                                "not `python -m pytest`")


@pytest.fixture(scope="session")
def tiny_path():
    from kairos.engine.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_llm():
    """One shared tiny engine for tests that only read from it."""
    from kairos.engine import LLM

    return LLM("tiny", num_kv_blocks=256, max_model_len=1024)

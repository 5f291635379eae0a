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
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_path():
    from engine.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_llm():
    """One shared tiny engine for tests that only read from it."""
    from engine import LLM

    return LLM("tiny", num_kv_blocks=256, max_model_len=1024)

"""The benchmark shapes shipped under bench/models, and dummy weights."""

import json
import subprocess
import sys

import pytest
import torch

from kairos.bench import shipped
from kairos.engine.config import ModelConfig
from kairos.engine.model import CausalLM
from kairos.kernels import get_backend

MODELS = shipped("models")


@pytest.mark.parametrize("name, params", [
    ("Llama-3.1-8B", 8_030_261_248),
    ("Qwen3-0.6B", 596_049_920),
    ("Qwen3-8B", 8_190_735_360),
])
def test_shapes_give_the_published_parameter_counts(name, params):
    cfg = ModelConfig.from_pretrained(MODELS / name)
    with torch.device("meta"):
        model = CausalLM(cfg, get_backend())
    model.tie_weights()
    assert sum(p.numel() for p in model.parameters()) == params


def test_dummy_weights_run_a_real_shape_on_cpu():
    run = subprocess.run(
        [sys.executable, "-m", "kairos.cli", "generate", "--model", str(MODELS / "Qwen3-0.6B"),
         "--load-format", "dummy", "--tokenizer", "tiny", "--max-model-len", "256",
         "--prompt", "Hello there", "--max-tokens", "3", "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) == 3 and all(0 <= t < 151936 for t in out["token_ids"])

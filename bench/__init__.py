"""The benchmarks (each run as `python -m kairos.bench.<name>`) and the files that ship with
kairos: step-time profiles, the Azure traces and the benchmark model shapes."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Results belong to a checkout (bench/results, committed with the code they measure); an
# installed kairos writes them under the working directory instead of into site-packages.
RESULTS = _HERE / "results" if (_HERE.parent / "pyproject.toml").is_file() else Path.cwd() / "bench" / "results"


def shipped(relative: str) -> Path:
    """A file that ships in kairos.bench (`profiles/...`, `traces/...`, `models/...`)."""
    path = Path(str(files(__name__).joinpath(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{relative} is not among the files installed with kairos.bench ({path})")
    return path


DEFAULT_PROFILE = shipped("profiles/Llama-3.1-8B_H200.json")
DEFAULT_TRACE = shipped("traces/AzureLLMInferenceTrace_conv.csv")

"""What installing kairos puts where: one import root, `kairos`, whose subpackages are the
checkout's top-level folders; the files the defaults need; and the parts that need no torch."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["bench", "cli", "engine", "kernels", "scheduler", "transport"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A plain (non-editable) install of this checkout into a folder of its own. The wheel is
    built from a copy, so that no build folder lands in the checkout (nor a stale one in it)."""
    out = tmp_path_factory.mktemp("install")
    source = out / "source"
    for name in LAYERS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", out / "wheel", source],
                   check=True, capture_output=True)
    (wheel,) = (out / "wheel").glob("kairos-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", out / "site", wheel],
                   check=True, capture_output=True)
    return out / "site"


def run_installed(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python with the stdlib and the installed kairos alone (-S: no site-packages)."""
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)})


def test_installing_kairos_adds_only_the_import_name_kairos(installed):
    names = {p.name for p in installed.iterdir()} - {"bin"}
    assert {n for n in names if not n.endswith(".dist-info")} == {"kairos"}
    assert sorted(p.name for p in (installed / "kairos").iterdir()) == LAYERS
    # The editable install of the suite maps the same names onto the checkout's folders.
    import kairos.engine
    import kairos.kernels

    assert Path(kairos.engine.__file__).parent == ROOT / "engine"
    assert Path(kairos.kernels.__file__).parent == ROOT / "kernels"
    assert importlib.metadata.distribution("kairos").read_text("top_level.txt").split() == ["kairos"]


def test_an_installed_kairos_finds_its_default_profile_and_trace_outside_a_checkout(installed, tmp_path):
    code = ("from kairos.bench import DEFAULT_PROFILE, DEFAULT_TRACE, RESULTS\n"
            "from kairos.scheduler.cost_model import CostModel\n"
            "from kairos.scheduler.simulator import SimConfig, simulate\n"
            "from kairos.scheduler.traces import load_azure, shape, with_slos\n"
            "import json\n"
            "trace = with_slos(shape(load_azure(DEFAULT_TRACE), limit=50), 1000, 100)\n"
            "report = simulate(trace, SimConfig(), CostModel.from_profile(json.loads(DEFAULT_PROFILE.read_text())))\n"
            "print(DEFAULT_PROFILE, DEFAULT_TRACE, RESULTS, report['requests'], sep='\\n')")
    run = run_installed(installed, code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    profile, trace, results, requests = run.stdout.split()
    assert Path(profile).is_relative_to(installed) and Path(trace).is_relative_to(installed)
    assert Path(results) == tmp_path / "bench" / "results"  # not into the installed package
    assert requests == "50"


def test_the_client_the_request_types_and_the_scheduler_import_without_torch():
    code = ("import sys\n"
            "sys.modules['torch'] = None  # any import of torch now fails\n"
            "import kairos.transport.client, kairos.scheduler.simulator\n"
            "from kairos.engine import RequestSLO, SamplingParams\n"
            "from kairos.cli.main import build_parser\n"
            "build_parser().parse_args(['client', 'hi', '--ttft-slo-ms', '500'])\n"
            "from kairos.transport.client import make_submit\n"
            "print(make_submit('hi', 'r1', slo=RequestSLO(500, 50)).slo)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "'ttft_ms': 500" in run.stdout
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; from kairos.engine "
                              "import LLM"], capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0 and "torch" in blocked.stderr  # the blocking itself works


def test_hugging_faces_kernels_distribution_and_kairos_kernels_live_side_by_side():
    """transformers imports Hugging Face's `kernels`; kairos's own are kairos.kernels."""
    pytest.importorskip("kernels")
    import kairos.kernels
    import kernels

    hub_kernels = importlib.metadata.distribution("kernels")
    assert Path(kernels.__file__) == Path(hub_kernels.locate_file("kernels/__init__.py"))
    assert Path(kernels.__file__).parent != ROOT / "kernels"
    assert hasattr(kairos.kernels, "get_backend") and not hasattr(kernels, "get_backend")

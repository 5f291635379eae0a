"""Shared pieces of the benchmarks: device ceilings, timing, and result files."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kairos.bench import RESULTS
from kairos.kernels import BACKENDS


def add_model_args(ap, model: str = "bench/models/Llama-3.1-8B") -> None:
    """The flags every engine benchmark takes: which model shape, and on what."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="the engine's kernels (as kairos serve)")


def backend_suffix(args) -> str:
    """A results file's suffix naming a kernel backend chosen on purpose ('' for auto)."""
    return "" if args.backend == "auto" else f"_{args.backend}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (a copy reads and writes each byte)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of one large square matmul in this dtype: the device's compute ceiling."""
    n = n if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn_like(a)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """The device in a result file's name: the GPU's model (NVIDIA_H200), or cpu."""
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot, drawing to files only; None (saying so) where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def profile_cost_model(path: str):
    """A step-time profile (kairos profile) and the cost model fitted to it, for a simulated run."""
    from kairos.scheduler.cost_model import CostModel

    profile = json.loads(Path(path).read_text())
    return profile, CostModel.from_profile(profile)

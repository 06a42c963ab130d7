"""scripts/gpu_bench.py's reading of a torch profiler trace (the engines' per-step device time, issue 25 goal 6)."""

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


def test_trace_summary_counts_overlapping_device_work_once(tmp_path):
    events = [
        _event("kernel", "gemm", 0, 100),           # 0-100
        _event("kernel", "attention", 50, 100),     # 50-150 on another stream: 50 us more
        _event("gpu_memcpy", "HtoD", 300, 20),      # 300-320
        _event("gpu_memset", "zero", 310, 5),       # inside the copy
        _event("cpu_op", "aten::mm", 0, 1000),      # host work is not device time
        _event("cuda_runtime", "cudaGraphLaunch", 0, 5),
        _event("cuda_runtime", "cudaGraphLaunch", 10, 5),
        _event("cuda_runtime", "cudaLaunchKernel", 20, 5),
        _event("cuda_driver", "cuLaunchKernelEx", 30, 5),
        {"ph": "i", "cat": "kernel", "name": "an instant, not a span", "ts": 5, "pid": 0, "tid": 0},
    ]
    path = tmp_path / "worker.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = _gpu_bench().trace_summary(path)
    assert summary["device_busy_s"] == (150 + 20) / 1e6
    assert summary["device_ops"] == 4
    assert summary["graph_launches"] == 2
    assert summary["kernel_launches"] == 2


def test_trace_summary_of_a_host_only_trace(tmp_path):
    """A CPU engine's trace has no device work: zero, not an error."""
    path = tmp_path / "worker.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": [_event("cpu_op", "aten::mm", 0, 10)]}))
    assert _gpu_bench().trace_summary(path) == {"device_busy_s": 0.0, "device_ops": 0, "graph_launches": 0,
                                               "kernel_launches": 0}

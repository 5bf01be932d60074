"""Shared helpers of the ``scripts/bench_*.py`` benchmarks: machine description, RSS, JSON output.

Peak memory is the process's own ``VmHWM`` from ``/proc/self/status`` (the kernel's high-water
mark of the resident set); benchmarks that need a clean number run the measured work in a fresh
child process (:func:`run_child`), since ``ru_maxrss`` survives fork + exec on Linux.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(key: str, pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def vmhwm_mb() -> float:
    """Peak resident set size of this process so far (MiB, /proc VmHWM)."""
    return _status_kb("VmHWM") / 1024


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size (MiB, /proc VmRSS)."""
    return _status_kb("VmRSS", pid) / 1024


def children_maxrss_mb() -> float:
    """Largest peak RSS among this process's finished, waited-for children (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions, native bf16 support and the load average now."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gb": round(_meminfo_kb("MemTotal") / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        from stellarnet.common.hardware import cpu_bf16_supported

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
        info["cpu_native_bf16"] = cpu_bf16_supported()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        pass
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _meminfo_kb(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def busy_warning(threshold: float = 0.7) -> str | None:
    """A warning string when the 1-minute load average says another job competes for the CPUs."""
    load1 = os.getloadavg()[0]
    if load1 > threshold:
        return (f"1-min load average {load1:.2f} > {threshold} before the run: other processes compete for "
                f"the CPUs and the timings are pessimistic")
    return None


class RSSSampler:
    """Sample the RSS of this process (and optionally others) in a background thread.

    ``with RSSSampler(0.2) as s: ...`` then ``s.max_mb``, ``s.samples`` ([(t, MiB)]).
    """

    def __init__(self, interval: float = 0.25, pids: list[int] | None = None):
        self.interval = interval
        self.pids = pids
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> float:
        if not self.pids:
            return rss_mb()
        return sum(max(0.0, rss_mb(p)) for p in self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, self._total()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._t0, self._total()))

    @property
    def max_mb(self) -> float:
        return max((m for _, m in self.samples), default=float("nan"))


def run_child(args: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line must be a JSON object."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                         cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"child process failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"child process printed no JSON:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_result(out: str | Path, res: dict[str, Any]) -> None:
    """Write ``res`` as indented JSON (creating the folder) and print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2, default=_default)
    out.write_text(text + "\n")
    print(text)


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def find_checkpoint(explicit: str | None = None) -> Path | None:
    """``explicit`` or the newest ``logs/*/runs/*/checkpoints/last.ckpt`` of this checkout."""
    if explicit:
        return Path(explicit)
    cands = sorted(ROOT.glob("logs/*/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return cands[-1] if cands else None


class ForeignCPU:
    """CPU time that *other* processes used during a measurement (from /proc/stat minus this
    process and its waited-for children): ``with ForeignCPU() as f: ...`` then ``f.result()``
    = {"wall_s", "foreign_cpu_s", "foreign_cpu_fraction"} (fraction of all cores' time). A run
    with a fraction above ~0.05 competed with other work and its rates are pessimistic."""

    def __enter__(self) -> "ForeignCPU":
        self._t = (time.perf_counter(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc: Any) -> None:
        t0, b0, o0 = self._t
        self.wall = time.perf_counter() - t0
        self.foreign = max(0.0, (_busy_seconds() - b0) - (_own_seconds() - o0))

    def result(self) -> dict[str, float]:
        n = os.cpu_count() or 1
        return {"wall_s": round(self.wall, 2), "foreign_cpu_s": round(self.foreign, 2),
                "foreign_cpu_fraction": round(self.foreign / max(self.wall * n, 1e-9), 4)}


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_child_measured(args: list[str], **kw: Any) -> dict[str, Any]:
    """:func:`run_child` plus the share of CPU other processes used meanwhile."""
    with ForeignCPU() as fc:
        r = run_child(args, **kw)
    r["foreign_cpu_fraction"] = fc.result()["foreign_cpu_fraction"]
    return r


def finish(res: dict[str, Any], session: ForeignCPU, out: str | Path) -> None:
    """Close the whole-run ForeignCPU measurement, record it and the load average, write the JSON."""
    session.__exit__(None, None, None)
    res["other_processes"] = session.result()
    res["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_result(out, res)

"""Shared helpers of the benchmark scripts: machine description, timing, plots and RESULTS.md.

Both ``bench_cpu.py`` and ``bench_gpu.py`` write their raw numbers as JSON (``results_cpu.json``,
``results_gpu.json``) and then re-render ``RESULTS.md`` from whichever JSON files exist, so the
report always matches the numbers beside it. Everything is written atomically.
"""

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from torchtune_gist._io import atomic_save_figure, atomic_write_json, atomic_write_text

CPU_JSON = "results_cpu.json"
GPU_JSON = "results_gpu.json"
RESULTS_MD = "RESULTS.md"
#: Hand-recorded runs (the demo, the SmolLM2 study) that RESULTS.md includes after the benchmarks.
RECORDED_RUNS = ("demo.md", "smollm2_study.md")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> Optional[Tuple[float, float, float]]:
    """The 1, 5 and 15 minute load averages (``uptime``), or ``None`` where unavailable."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def machine_info(threads: int) -> Dict[str, Any]:
    """What the numbers were measured on: date, CPU model, cores, memory, torch and thread count."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line() -> str:
    """The exact command this process runs (interpreter path relative to the working directory)."""
    exe = os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else sys.executable
    return " ".join(shlex.quote(a) for a in [exe, *sys.argv])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved(
    variants: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 1, progress: Optional[Any] = None
) -> Dict[str, List[float]]:
    """Time each variant ``reps`` times, round robin (A B C A B C ...), after ``warmup`` untimed rounds.

    Interleaving spreads any change in machine load over all variants alike, so their ratios stay fair.

    Returns:
        Dict[str, List[float]]: seconds per call, per variant.
    """
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(dt)
            if progress is not None:
                progress.update(1)
    return times


@contextmanager
def forward_stamps(
    model: torch.nn.Module, sync: Optional[Callable[[], None]] = None
) -> Iterator[List[Tuple[float, int]]]:
    """Record ``(time, seq_len)`` at each call of ``model.tok_embeddings`` (one per forward pass).

    Generation runs one embedding call per forward pass (the prefill, then one per new token), so
    the stamps split a generation call into prefill and per-token decode without touching its code.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each stamp, so queued device work is counted.
    """
    stamps: List[Tuple[float, int]] = []

    def hook(mod: torch.nn.Module, args: Tuple[Any, ...]) -> None:
        if sync is not None:
            sync()
        stamps.append((time.perf_counter(), int(args[0].shape[-1])))

    handle = model.tok_embeddings.register_forward_pre_hook(hook)
    try:
        yield stamps
    finally:
        handle.remove()


def decode_split(stamps: Sequence[Tuple[float, int]], start: float) -> Tuple[float, float, int]:
    """Prefill time and median per-token decode time from :func:`forward_stamps` of one generation call.

    Args:
        stamps: the stamps of one call: the prefill forwards (a long prompt's in chunks, then the continuation's),
            then one forward of one token per row for each new token but the first.
        start: when the call started.

    Returns:
        Tuple[float, float, int]: seconds from ``start`` to the first decode forward (every prefill chunk and the
        first token), the median seconds between consecutive decode forwards (one whole decode step each), and
        the number of intervals measured.
    """
    first = len(stamps)
    while first > 1 and stamps[first - 1][1] == 1:  # the decode forwards: the trailing one-token ones
        first -= 1
    decode_starts = [t for t, _ in stamps[first:]]
    if len(decode_starts) < 2:
        raise ValueError(f"need a prefill and at least two decode steps to time decoding, got {len(stamps)} forwards")
    steps = [b - a for a, b in zip(decode_starts, decode_starts[1:])]
    return decode_starts[0] - start, median(steps), len(steps)


def save_png(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a markdown table: integers with thousands separators, floats to ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 10**digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(obj: Any, path: Path) -> Path:
    return atomic_write_json(obj, path)


def render_results(out_dir: Path) -> Path:
    """Re-render ``out_dir/RESULTS.md`` from the JSON results there (CPU and, if present, GPU),
    followed by the recorded runs in :data:`RECORDED_RUNS` that exist."""
    import json

    from _cpu_report import render_cpu_markdown  # noqa: E402 (scripts directory on sys.path)
    from bench_gpu import render_gpu_markdown

    cpu_path, gpu_path = out_dir / CPU_JSON, out_dir / GPU_JSON
    cpu = json.loads(cpu_path.read_text()) if cpu_path.is_file() else None
    gpu = json.loads(gpu_path.read_text()) if gpu_path.is_file() else None
    parts = [
        "# Benchmarks: what gist compression costs and saves",
        "",
        "Generated by `benchmarks/bench_cpu.py` (`make bench`) and `benchmarks/bench_gpu.py`; do not edit by hand. "
        f"Raw numbers: [`{CPU_JSON}`]({CPU_JSON})" + (f", [`{GPU_JSON}`]({GPU_JSON})" if gpu else "") + ".",
        "",
        render_cpu_markdown(cpu) if cpu else "## CPU\n\nNo CPU run recorded yet: run `make bench`.\n",
        render_gpu_markdown(gpu),
    ]
    for name in RECORDED_RUNS:
        if (out_dir / name).is_file():
            parts += [
                f"<!-- included from {name}, a recorded run with its own date, machine and command -->",
                (out_dir / name).read_text(),
            ]
    return atomic_write_text("\n".join(parts), out_dir / RESULTS_MD)

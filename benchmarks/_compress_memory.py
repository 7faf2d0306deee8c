"""Peak memory and time of one ``compress`` call, in a fresh process (Linux; used by ``bench_cpu.py``).

Usage: ``python benchmarks/_compress_memory.py '{"arch": {...}, "rows": 4, "prompt_len": 4096, "k": 10,
"chunk_size": 512, "threads": 1}'``; prints one JSON line: ``peak_bytes`` (the resident set's high-water
mark above the resident set just before the call), ``time_s`` and ``baseline_rss_bytes``.

The model is built and a short prompt compressed first, so one-time allocations do not count; the
high-water mark is then reset through ``/proc/self/clear_refs``. Memory the allocator kept from the
warm-up and reuses is not counted again, so small transients may be missed; the large ones (masks,
scores, keys/values of a long prompt) are fresh mappings and are.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
from torchtune.models.llama3_1 import llama3_1

from torchtune_gist.generation import compress
from torchtune_gist.gist_tokens import default_gist_token_ids


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Compress ``spec['rows']`` random prompts of ``spec['prompt_len']`` tokens + K gists once."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = llama3_1(**spec["arch"]).eval()
    ids = default_gist_token_ids(spec["arch"]["vocab_size"], spec["k"])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (spec["prompt_len"],), generator=gen).tolist() + ids for _ in range(spec["rows"])]
    compress(model, [prompts[0][:32] + ids], gist_token_ids=ids, chunk_size=spec["chunk_size"])
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    compress(model, prompts, gist_token_ids=ids, chunk_size=spec["chunk_size"])
    elapsed = time.perf_counter() - t0
    return {"peak_bytes": _status_bytes("VmHWM") - baseline, "time_s": elapsed, "baseline_rss_bytes": baseline}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

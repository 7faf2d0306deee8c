"""Peak memory and time of one call, in a fresh process (Linux; used by ``bench_cpu.py``).

Usage: ``python benchmarks/_peak_memory.py '{"op": "compress", "arch": {...}, "rows": 4, "prompt_len": 4096,
"k": 10, "chunk_size": 512, "threads": 1}'``; prints one JSON line: ``peak_bytes`` (the resident set's high-water
mark above the resident set just before the call), ``time_s`` and ``baseline_rss_bytes``. ``op`` is one of

- ``compress``: :func:`compress` of ``rows`` prompts of ``prompt_len`` tokens + K gists, ``chunk_size`` per pass;
- ``score``: :func:`score_continuations` in ``gist`` mode of ``cont_len``-token continuations after those prompts,
  the last ``scored`` tokens scored (what lm-eval's ``loglikelihood`` runs);
- ``score_dense``: the same scores from one full-sequence forward under the dense ``[b, s, s]`` gist mask, logits
  only at the scored positions (how ``loglikelihood`` scored before ``score_continuations``).

The model is built and a short call made first, so one-time allocations do not count; the high-water mark is then
reset through ``/proc/self/clear_refs``. Memory the allocator kept from the warm-up and reuses is not counted
again, so small transients may be missed; the large ones (masks, scores, keys/values of a long prompt) are fresh
mappings and are.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torchtune.models.llama3_1 import llama3_1

from torchtune_gist.generation import compress, score_continuations
from torchtune_gist.gist_tokens import default_gist_token_ids
from torchtune_gist.masks import make_gist_mask
from torchtune_gist.modules import output_at


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


@torch.no_grad()
def _score_dense(
    model: torch.nn.Module, prompts: List[List[int]], conts: List[List[int]], scored: int, ids: List[int]
) -> List[float]:
    tokens = torch.tensor([p + c for p, c in zip(prompts, conts)])
    at = torch.zeros_like(tokens, dtype=torch.bool)
    at[:, -scored - 1 : -1] = True
    with output_at(model, at):
        logits = model(tokens, mask=make_gist_mask(tokens, ids)).float()
    targets = tokens[:, -scored:].reshape(-1)
    return F.log_softmax(logits, -1).gather(-1, targets[:, None]).view(len(prompts), scored).sum(-1).tolist()


def _call(
    spec: Dict[str, Any], model: torch.nn.Module, prompts: List[List[int]], conts: List[List[int]], ids: List[int]
) -> Callable[[], Any]:
    chunk, scored = spec["chunk_size"], spec.get("scored", 1)
    if spec["op"] == "compress":
        return lambda: compress(model, prompts, gist_token_ids=ids, chunk_size=chunk)
    if spec["op"] == "score":
        return lambda: score_continuations(
            model, prompts, conts, [scored] * len(prompts), mode="gist", gist_token_ids=ids, chunk_size=chunk
        )
    if spec["op"] == "score_dense":
        return lambda: _score_dense(model, prompts, conts, scored, ids)
    raise ValueError(f"unknown op {spec['op']!r}")


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``spec['op']`` once on ``spec['rows']`` random prompts of ``spec['prompt_len']`` tokens + K gists."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = llama3_1(**spec["arch"]).eval()
    ids = default_gist_token_ids(spec["arch"]["vocab_size"], spec["k"])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (spec["prompt_len"],), generator=gen).tolist() + ids for _ in range(spec["rows"])]
    conts = [torch.randint(0, 256, (spec.get("cont_len", 2),), generator=gen).tolist() for _ in range(spec["rows"])]
    _call(spec, model, [p[-32:] for p in prompts], conts, ids)()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    _call(spec, model, prompts, conts, ids)()
    elapsed = time.perf_counter() - t0
    return {"peak_bytes": _status_bytes("VmHWM") - baseline, "time_s": elapsed, "baseline_rss_bytes": baseline}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

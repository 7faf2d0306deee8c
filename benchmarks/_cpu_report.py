"""The CPU benchmark's goals, plots and RESULTS.md section, from ``results_cpu.json``."""

import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from _common import fmt, median, save_png, table

#: The compress-once-reuse-many variants, in the order the tables and plots show them.
REUSE_VARIANTS = ("recompute_full_prompt", "compress_once_reuse_sequential", "compress_once_reuse_batched")


def _fastest_ratio(step_s: Dict[str, List[float]], gist: str = "gist") -> float:
    """``mask=None`` / gist of the fastest step of each: a second estimate, less sensitive to bursts of load."""
    return min(step_s["causal_none"]) / min(step_s[gist])


def _spread(step_s: Dict[str, List[float]]) -> float:
    """Half the interquartile range of the step times over their median, the worst variant's."""
    out = 0.0
    for times in step_s.values():
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        out = max(out, (q[2] - q[0]) / 2 / q[1])
    return out


def _variant_order(name: str) -> Tuple[int, int]:
    """batch_size_1, padded_bsN, packed_L and packed_L_segments (by L): JSON stores variants sorted by name."""
    if name == "batch_size_1":
        return (0, 0, 0)
    parts = name.split("_")
    number = int("".join(c for c in parts[1] if c.isdigit()))
    return (1 if parts[0] == "padded" else 2, number, int(parts[-1] == "segments"))


def bytes_read_ratio(shape: Dict[str, Any], prompt_len: int, k: int, rows: int = 1) -> float:
    """Full prompt / gist cache: the bytes a mid-generation decode step reads, the weights once and each row's KV.

    What the decode speed-up would be if a step's time followed the bytes it reads (a memory-bound step); the
    prompt's KV saved is the only difference, so a large weight share caps what the gist cache can save.
    """
    held = k + shape["cont_len"] + shape["new_tokens"] / 2  # KV entries beside the prompt's, halfway through
    per_row = shape["kv_bytes_per_token"]
    full = shape["weight_bytes"] + rows * per_row * (prompt_len + held)
    return full / (shape["weight_bytes"] + rows * per_row * held)


def step_cost_fit(variants: Dict[str, Dict[str, Any]]) -> Tuple[float, float]:
    """Seconds per step and per token slot, least squares over batch size 1 and the segment-mask packed rows
    (whose attention grows with the tokens, not the row length): ``time_s ~ a * steps + b * token_slots``."""
    rows = [v for n, v in variants.items() if n == "batch_size_1" or n.endswith("_segments")]
    sxx = sum(v["steps"] ** 2 for v in rows)
    sxy = sum(v["steps"] * v["token_slots"] for v in rows)
    syy = sum(v["token_slots"] ** 2 for v in rows)
    sxt = sum(v["steps"] * v["time_s"] for v in rows)
    syt = sum(v["token_slots"] * v["time_s"] for v in rows)
    det = sxx * syy - sxy**2
    return (syy * sxt - sxy * syt) / det, (sxx * syt - sxy * sxt) / det


def packing_ceiling(variants: Dict[str, Dict[str, Any]]) -> float:
    """Batch size 1's time over its tokens' share alone (:func:`step_cost_fit`): what packing would gain if it
    removed every per-step cost and added no padding."""
    _, per_token = step_cost_fit(variants)
    base = variants["batch_size_1"]
    return base["time_s"] / (per_token * base["token_slots"])


def evaluate_goals(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each goal with its target, the measured value and whether it was met."""
    goals = []
    if "training" in res:
        for row in res["training"]["shapes"]:
            dense, segments = row["gist_vs_causal_none"], row["gist_segments_vs_causal_none"]
            r, variant = max((dense, "gist"), (segments, "gist_segments"))
            goals.append(
                {
                    "goal": (
                        f"training, {row['name']}: gist tokens/s vs causal (mask=None), medians, the faster gist mask "
                        "format"
                    ),
                    "target": ">= 0.9x",
                    "measured": f"{r:.3f}x with {'segments' if variant == 'gist_segments' else 'the dense mask'} "
                    f"(dense {dense:.3f}x, segments {segments:.3f}x; fastest steps: "
                    f"{_fastest_ratio(row['step_s'], variant):.3f}x; step times spread "
                    f"+-{100 * _spread(row['step_s']):.0f}%)",
                    "met": r >= 0.9,
                }
            )
    if "packing" in res:
        packed = {n: v for n, v in res["packing"]["variants"].items() if n.startswith("packed_")}
        lean = {n: v for n, v in packed.items() if v["padding_fraction"] < 0.1}
        name, pk = max((lean or packed).items(), key=lambda item: item[1]["speedup_vs_bs1"])
        goals.append(
            {
                "goal": (
                    "packing tokens/s vs batch size 1, with < 10% padding (best packed row length under 10% padding)"
                ),
                "target": ">= 3x, < 10% padding",
                "measured": f"{name}: {pk['speedup_vs_bs1']:.2f}x, {100 * pk['padding_fraction']:.1f}% padding"
                + ("" if lean else " (no row length gave < 10% padding)")
                + f"; batch size 1 without its per-step costs: {packing_ceiling(res['packing']['variants']):.2f}x",
                "met": pk["speedup_vs_bs1"] >= 3 and pk["padding_fraction"] < 0.1,
            }
        )
    if "inference" in res:
        inf = res["inference"]
        cells = [c for sh in inf["shapes"].values() for c in sh["cells"]]
        goals.append(
            {
                "goal": (
                    "KV bytes gist / full prompt == (K + n) / (P + K + n) exactly, every P and K (and truncation == "
                    "gist)"
                ),
                "target": "exact",
                "measured": (
                    f"{sum(c['kv_ratio']['exact'] and c['kv_truncate_equals_gist'] for c in cells)}/{len(cells)} exact"
                ),
                "met": all(c["kv_ratio"]["exact"] and c["kv_truncate_equals_gist"] for c in cells),
            }
        )
        for name, sh in inf["shapes"].items():
            longest = max(c["prompt_len"] for c in sh["cells"])
            at_longest = [c for c in sh["cells"] if c["prompt_len"] == longest]
            speedups = [c["decode_speedup_gist_vs_full"] for c in at_longest]
            r = median(speedups)
            spread = f" (K cells: {min(speedups):.2f}-{max(speedups):.2f}x)" if len(speedups) > 1 else ""
            read = median([bytes_read_ratio(sh, longest, c["k"]) for c in at_longest])
            goals.append(
                {
                    "goal": f"decode at {longest}-token prompts, {name} shape: full-prompt / gist-cache ms per token",
                    "target": ">= 2x",
                    "measured": f"{r:.2f}x{spread}; bytes a step reads, full / gist: {read:.2f}x",
                    "met": r >= 2,
                }
            )
        if "batched" in inf:
            b = inf["batched"]
            r = b["decode_speedup_gist_vs_full"]
            goals.append(
                {
                    "goal": f"decode at {b['prompt_len']}-token prompts, gqa shape, {b['rows']} rows per batch (each "
                    "its own prompt): full-prompt / gist-cache ms per step",
                    "target": ">= 2x",
                    "measured": f"{r:.2f}x (K={b['k']}); bytes a step reads, full / gist: "
                    f"{bytes_read_ratio(inf['shapes']['gqa'], b['prompt_len'], b['k'], b['rows']):.2f}x",
                    "met": r >= 2,
                }
            )
    return goals


def make_plots(res: Dict[str, Any], out: Path) -> List[str]:
    """Write the PNG plots; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "training" in res:
        shapes = res["training"]["shapes"]
        cols = min(3, len(shapes))
        rows = -(-len(shapes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False, layout="constrained")
        for ax in axes.flat[len(shapes) :]:
            ax.axis("off")
        labels = {
            "causal_none": "causal\nmask=None",
            "causal_dense": "causal\ndense mask",
            "gist": "gist\ndense mask",
            "gist_segments": "gist\nsegments",
        }
        for ax, row in zip(axes.flat, shapes):
            names = list(labels)
            vals = [row["tokens_per_s"][n] for n in names]
            bars = ax.bar([labels[n] for n in names], vals, color=["#888", "#aab", "#c44", "#e83"])
            base = row["tokens_per_s"]["causal_none"]
            for bar, v in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v / base:.2f}x", ha="center", va="bottom")
            ax.set_title(f"{row['name']}\nbatch {row['batch'][0]}x{row['batch'][1]}", fontsize=9)
            ax.set_ylabel("training tokens/s (real tokens)")
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle("Training step throughput (CPU, fp32)")
        files.append(save_png(fig, out / "train_throughput.png").name)
    if "packing" in res:
        pk = res["packing"]["variants"]
        names = sorted(pk, key=_variant_order)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        colors = [
            "#888"
            if n == "batch_size_1"
            else "#aab"
            if n.startswith("padded")
            else "#e83"
            if n.endswith("segments")
            else "#4a4"
            for n in names
        ]
        bars = a1.bar(names, [pk[n]["tokens_per_s"] for n in names], color=colors)
        for bar, n in zip(bars, names):
            a1.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                f"{pk[n]['speedup_vs_bs1']:.1f}x",
                ha="center",
                va="bottom",
            )
        a1.set_ylabel("training tokens/s (real tokens)")
        a2.bar(names, [100 * pk[n]["padding_fraction"] for n in names], color=colors)
        a2.axhline(10, color="k", ls="--", lw=0.8)
        a2.set_ylabel("padding %")
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelsize=8, labelrotation=40)
            plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        fig.suptitle(f"Same {res['packing']['examples']} examples ({res['packing']['real_tokens']:,} real tokens)")
        files.append(save_png(fig, out / "packing.png").name)
    if "inference" in res:
        inf = res["inference"]
        main = inf["shapes"]["gqa"]
        ks = sorted({c["k"] for c in main["cells"]})
        k_ref = inf["shapes"]["mha"]["cells"][0]["k"]
        fig, ax = plt.subplots(figsize=(6, 4))
        full = [c for c in main["cells"] if c["k"] == k_ref]
        ax.plot(
            [c["prompt_len"] for c in full],
            [c["full"]["kv_bytes"] for c in full],
            "o-",
            color="k",
            label=f"full prompt (K={k_ref})",
        )
        for k in ks:
            cs = [c for c in main["cells"] if c["k"] == k]
            ax.plot(
                [c["prompt_len"] for c in cs], [c["gist"]["kv_bytes"] for c in cs], "s-", label=f"gist cache, K={k}"
            )
        ax.plot(
            [c["prompt_len"] for c in full],
            [c["truncate"]["kv_bytes"] for c in full],
            "x--",
            color="gray",
            label=f"truncation, K={k_ref}",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length P (tokens)")
        ax.set_ylabel("KV bytes held while generating")
        ax.set_title(f"KV bytes, gqa shape, n = {main['n']} continuation + generated tokens", fontsize=9)
        ax.legend(fontsize=7)
        files.append(save_png(fig, out / "kv_bytes.png").name)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
        for ax, (name, sh) in zip(axes, inf["shapes"].items()):
            cs = [c for c in sh["cells"] if c["k"] == k_ref]
            x = [c["prompt_len"] for c in cs]
            for key, style, label in (
                ("full", "o-k", "full prompt"),
                ("gist", "s-r", "gist cache"),
                ("truncate", "x--", "truncation"),
            ):
                ax.plot(x, [1e3 * c[key]["decode_s_per_token"] for c in cs], style, label=label)
            if name == "gqa" and inf["stock"]:
                ax.plot(
                    [r["prompt_len"] for r in inf["stock"]],
                    [1e3 * r["decode_s_per_token"] for r in inf["stock"]],
                    "^:b",
                    label=f"torchtune stock, cache {inf['max_seq_len']} slots",
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length P (tokens)")
            ax.set_ylabel("decode ms / token (batch 1)")
            ax.set_title(
                f"{name}: {sh['shape']['num_heads']} heads / {sh['shape']['num_kv_heads']} KV heads, K={k_ref}",
                fontsize=9,
            )
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        files.append(save_png(fig, out / "decode.png").name)

        rv = inf["reuse"]["variants"]
        names = list(REUSE_VARIANTS)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        bars = ax.bar(
            ["recompute\nfull prompt", "compress once,\nreuse (sequential)", "compress once,\nreuse (batched)"],
            [rv[n]["inputs_per_s"] for n in names],
            color=["#888", "#c44", "#a22"],
        )
        for bar, n in zip(bars, names):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                f"{rv[n]['speedup']:.1f}x",
                ha="center",
                va="bottom",
            )
        ax.set_ylabel("inputs / s")
        r = inf["reuse"]
        ax.set_title(
            f"One {r['prompt_len']}-token prompt, {r['inputs']} inputs, {r['new_tokens']} new tokens each", fontsize=9
        )
        files.append(save_png(fig, out / "reuse_many.png").name)

        if "compress_memory" in inf:
            cm = inf["compress_memory"]
            variants = (("one_pass", "o-k", "one pass"), ("chunked", "s-r", f"chunks of {cm['chunk_size']}"))
            title = f"compress: {cm['rows_per_call']} prompts per call, K={cm['k']}, gqa shape (CPU, fp32)"
            files.append(_memory_plot(cm["cells"], variants, "compress time (s)", title, out / "compress_memory.png"))
        if "score_memory" in inf:
            sm = inf["score_memory"]
            variants = (("dense", "o-k", "one forward, dense gist mask"), ("stores", "s-r", "score_continuations"))
            title = (
                f"loglikelihood (gist mode): {sm['rows_per_call']} requests per call, {sm['scored']} of "
                f"{sm['cont_len']} continuation tokens scored, K={sm['k']}, gqa shape (CPU, fp32)"
            )
            files.append(_memory_plot(sm["cells"], variants, "scoring time (s)", title, out / "score_memory.png"))
    return files


def _memory_plot(
    cells: List[Dict[str, Any]], variants: Sequence[Tuple[str, str, str]], time_label: str, title: str, path: Path
) -> str:
    """Peak memory and time against the prompt length, one line per ``(key, style, label)`` variant."""
    import matplotlib.pyplot as plt  # after make_plots chose the Agg backend

    x = [c["prompt_len"] for c in cells]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for key, style, label in variants:
        a1.plot(x, [c[key]["peak_bytes"] / 2**20 for c in cells], style, label=label)
        a2.plot(x, [c[key]["time_s"] for c in cells], style, label=label)
    for ax, ylabel in ((a1, "peak memory above baseline (MiB)"), (a2, time_label)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length P (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path).name


def _ms(x: float) -> str:
    return fmt(1e3 * x)


def render_cpu_markdown(res: Dict[str, Any]) -> str:
    """The CPU section of RESULTS.md from ``results_cpu.json``."""
    m = res["meta"]
    mach = m["machine"]
    la0, la1 = m.get("load_before"), m.get("load_after")
    loaded = any(la is not None and la[0] > mach["cores"] for la in (la0, la1)) or any(
        la is not None and la[0] > mach["cores"] for la in m.get("load_sections", {}).values()
    )
    out = [
        "## CPU" + (" (quick smoke run: sizes too small to mean anything)" if m["quick"] else ""),
        "",
        f"- Date: {mach['date']}",
        f"- Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['memory_gib']} GiB; torch {mach['torch']} "
        f"(Python {mach['python']}), fp32; `torch.set_num_threads({mach['torch_threads']})`.",
        f"- Command: `{m['command']}` ({fmt(m['duration_s'])} s"
        + (
            "; by section: " + ", ".join(f"{name} {fmt(sec)} s" for name, sec in m["section_s"].items())
            if m.get("section_s")
            else ""
        )
        + ")",
        f"- Load average (1/5/15 min) before: {la0}, after: {la1}, at each section: {m.get('load_sections')}. "
        + (
            "**The machine was loaded** (other jobs shared the CPU during the run): absolute numbers are low and "
            "noisy; ratios compare variants measured side by side, interleaved."
            if loaded
            else "The machine was otherwise idle."
        ),
        f"- Threads: {m['threads_note']}",
        "- Method: every comparison is measured in this run, variants interleaved (A B C A B C ...) after a warm-up, "
        "medians of the timed repetitions; goals are ratios of numbers measured together.",
        "",
        "### Goals",
        "",
        table(
            ["goal", "target", "measured", "met"],
            [[g["goal"], g["target"], g["measured"], g["met"]] for g in res["goals"]],
        ),
        "",
    ]
    if "training" in res:
        tr = res["training"]
        out += [
            "### 1. Training cost of the gist mask",
            "",
            "One optimizer step of the recipe (`masked_loss`, backward, AdamW on LoRA q/k/v/output rank 16 + "
            f"K={tr['num_gist_tokens']} gist rows), collation included (as the recipe's data loader does it "
            "in-process): `padded_gist_collate` (gist: dense `[b, s, s]` gist mask; gist segments: "
            "`segment_mask=True`, the recipe's `mask_format: segments`, causal SDPA per segment; dense causal: "
            "`mask_mode=pos_control`) or torchtune's `padded_collate_sft` (`mask=None`: torchtune's causal SDPA path, "
            "`is_causal=True`). Same model, batch and optimizer; tokens/s counts real tokens.",
            "",
            table(
                [
                    "shape",
                    "params",
                    "batch",
                    "real tokens",
                    "data",
                    "mask=None tok/s",
                    "dense causal tok/s",
                    "gist tok/s",
                    "gist segments tok/s",
                    "gist / mask=None",
                    "gist segments / mask=None",
                    "gist / dense causal",
                    "gist / mask=None, fastest steps",
                    "step-time spread",
                ],
                [
                    [
                        r["name"],
                        r["params"],
                        f"{r['batch'][0]}x{r['batch'][1]}",
                        r["real_tokens_per_step"],
                        r["data"],
                        r["tokens_per_s"]["causal_none"],
                        r["tokens_per_s"]["causal_dense"],
                        r["tokens_per_s"]["gist"],
                        r["tokens_per_s"]["gist_segments"],
                        f"{r['gist_vs_causal_none']:.3f}x",
                        f"{r['gist_segments_vs_causal_none']:.3f}x",
                        f"{r['gist_vs_causal_dense']:.3f}x",
                        f"{_fastest_ratio(r['step_s']):.3f}x",
                        f"+-{100 * _spread(r['step_s']):.0f}%",
                    ]
                    for r in tr["shapes"]
                ],
            ),
            "",
            "Ratios are of median step times (the goal) and, as a check, of the fastest step of each variant; the "
            "spread is half the interquartile range of a variant's step times over its median (the worst variant's), "
            "a rough measure of how far load alone moves a median. Median step seconds: "
            + "; ".join(
                f"{r['name']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["median_step_s"].items())
                for r in tr["shapes"]
            )
            + ". On CPU, SDPA with `is_causal=True` skips the upper triangle (in key blocks of 512); with any explicit "
            "mask it computes every block and applies the mask, so both dense masks cost the same and the gap to "
            "`mask=None` grows with the attention share of the step (longer rows, wider models). Segments cut the gist "
            "mask into causal SDPA calls per row (prompt and gists; gists and what follows), which skip the masked "
            "blocks too: for rows of 512 tokens and more they come close to `mask=None`; for short rows the per-row "
            "calls cost more than they skip and the dense mask is the faster choice (the recipe's `mask_format: auto` "
            "picks segments from 512 positions on CPU, dense below). On CUDA the gist mask goes through FlexAttention "
            "`BlockMask`s, which skip masked blocks (see the GPU section).",
            "",
            "![training throughput](train_throughput.png)",
            "",
        ]
    if "packing" in res:
        pk = res["packing"]
        fit, ceiling = step_cost_fit(pk["variants"]), packing_ceiling(pk["variants"])
        out += [
            "### 2. Batching and packing",
            "",
            f"{pk['examples']} examples ({pk['data']}), {pk['real_tokens']:,} real tokens, processed once by each "
            f"variant ({pk['model']}; one optimizer step per batch; collation with the gist mask included; variants "
            "interleaved in chunks). Padded batches keep the data order (no length bucketing); packed rows hold whole "
            "examples (`PackedGistDataset`, no attention across documents, one gist span per document), with the dense "
            "mask or, `packed_<L>_segments`, with segment masks (`segment_mask=True`).",
            "",
            table(
                [
                    "variant",
                    "steps",
                    "token slots",
                    "padding",
                    "attention work (q-k pairs) vs bs 1",
                    "time s",
                    "tokens/s",
                    "vs batch size 1",
                ],
                [
                    [
                        n,
                        v["steps"],
                        v["token_slots"],
                        f"{100 * v['padding_fraction']:.1f}%",
                        f"{v['qk_pairs_vs_bs1']:.1f}x",
                        v["time_s"],
                        v["tokens_per_s"],
                        f"{v['speedup_vs_bs1']:.2f}x",
                    ]
                    for n, v in sorted(pk["variants"].items(), key=lambda item: _variant_order(item[0]))
                ],
            ),
            "",
            "Attention work counts the query-key pairs the attention calls span: `b * s^2` per step for a dense "
            "`[b, s, s]` mask (a packed row computes attention between all its documents and masks most of it away, so "
            "its attention work grows with the row length), the sum of the causal blocks' squares for segment masks "
            "(which compute each document alone). On a CPU a step's cost follows its arithmetic, and a batch-size-1 "
            "step of a few hundred tokens already keeps the core busy, so packing saves only per-step overhead and "
            "padding: with dense masks it pays more for the masked-away attention than it saves, with segments it "
            "gains a little. A least-squares line through batch size 1 and the segment-mask rows puts a step at "
            f"{1e3 * fit[0]:.1f} ms plus {1e3 * fit[1]:.3f} ms per token slot: batch size 1 spends "
            f"{100 / ceiling:.0f}% of its time on its tokens, so even packing that removed "
            f"every per-step cost would run at most {ceiling:.2f}x batch size 1 on this CPU. "
            "On a GPU, batch size 1 leaves the device mostly idle and FlexAttention `BlockMask`s skip the masked "
            "blocks, which is where packing pays (`bench_gpu.py` measures the attention side).",
            "",
            "![packing](packing.png)",
            "",
        ]
    if "inference" in res:
        out += _render_inference(res["inference"])
    if "masks" in res:
        mk = res["masks"]
        out += [
            "### 4. Mask construction cost",
            "",
            f"`make_gist_mask` for one example per row (gist span a quarter in) and for packed rows (documents of "
            f"{mk['doc_len']} tokens, each with its own K={mk['num_gist_tokens']} span; `document_ids`), as a share of "
            f"one training step of the demo-shaped model ({mk['model']}) on the packed batch of that size (one step, "
            "timed once; the model is already warm from smaller batches). The dense `[b, s, s]` mask is built once per "
            "batch by the collator and shared by all layers.",
            "",
            table(
                [
                    "mask",
                    "bool bytes",
                    "dense gist build s",
                    "packed gist build s",
                    "train step s",
                    "dense share",
                    "packed share",
                ],
                [
                    [
                        f"[{r['batch'][0]}, {r['batch'][1]}, {r['batch'][1]}]",
                        r["mask_bytes"],
                        r["median_build_s"]["dense_gist"],
                        r["median_build_s"]["packed_gist"],
                        r["train_step_s"],
                        f"{100 * r['share_of_step']['dense_gist']:.1f}%",
                        f"{100 * r['share_of_step']['packed_gist']:.1f}%",
                    ]
                    for r in mk["sizes"]
                ],
            ),
            "",
        ]
    return "\n".join(out)


def _render_inference(inf: Dict[str, Any]) -> List[str]:
    main, attn = inf["shapes"]["gqa"], inf["shapes"]["mha"]
    n = main["n"]
    out = [
        "### 3. Inference: full prompt vs gist cache vs truncation",
        "",
        f"Batch 1, fp32, greedy; continuation of {main['cont_len']} tokens and {main['new_tokens']} new tokens, so "
        f"n = {n} continuation + generated tokens held beside the prompt's KV (the last new token is never fed back). "
        "Everything goes through `torchtune_gist.generation`: full prompt = `generate(mode='pos_control')`, gist = "
        "`compress` then `generate_from_cache`, truncation = `generate(mode='truncate')` (the prompt's last K tokens). "
        "Prefill = from the call to the first decode step (every prefill chunk and the first token); decode = median "
        "time between one-token decode forwards (one whole step each); end-to-end for gist includes `compress`."
        + (
            f" At the longest prompt (the cells the decode goals read) the three run {rounds} times, interleaved, and "
            "each variant's call with the median decode time counts (single calls varied by a third between reruns)."
            if (rounds := max(c.get("rounds", 1) for c in main["cells"])) > 1
            else ""
        ),
        "",
    ]
    for name, sh, why in (
        ("gqa", main, "Llama 3.1's layout: grouped-query attention"),
        ("mha", attn, "one KV head per query head: more KV bytes per token"),
    ):
        out += [
            f"#### Shape `{name}`: {sh['shape']['num_layers']} layers, width {sh['shape']['embed_dim']}, "
            f"{sh['shape']['num_heads']} heads / {sh['shape']['num_kv_heads']} KV heads of size "
            f"{sh['shape']['embed_dim'] // sh['shape']['num_heads']}, MLP {sh['shape']['intermediate_dim']} "
            f"({sh['params']:,} parameters, {sh['weight_bytes'] / 2**20:.0f} MiB of fp32 weights; "
            f"{sh['kv_bytes_per_token']:,} KV bytes per token) — {why}",
            "",
            table(
                [
                    "P",
                    "K",
                    "KV full",
                    "KV gist",
                    "KV trunc",
                    "gist/full (exact)",
                    "== (K+n)/(P+K+n)",
                    "prefill full ms",
                    "compress ms",
                    "prefill trunc ms",
                    "decode full ms/tok",
                    "decode gist ms/tok",
                    "decode trunc ms/tok",
                    "full / gist decode",
                    "e2e full ms",
                    "e2e gist ms (incl. compress)",
                    "e2e gist from cache ms",
                    "e2e trunc ms",
                ],
                [
                    [
                        c["prompt_len"],
                        c["k"],
                        c["full"]["kv_bytes"],
                        c["gist"]["kv_bytes"],
                        c["truncate"]["kv_bytes"],
                        c["kv_ratio"]["measured"],
                        c["kv_ratio"]["exact"],
                        _ms(c["full"]["prefill_s"]),
                        _ms(c["gist"]["compress_s"]),
                        _ms(c["truncate"]["prefill_s"]),
                        _ms(c["full"]["decode_s_per_token"]),
                        _ms(c["gist"]["decode_s_per_token"]),
                        _ms(c["truncate"]["decode_s_per_token"]),
                        f"{c['decode_speedup_gist_vs_full']:.2f}x",
                        _ms(c["full"]["e2e_s"]),
                        _ms(c["gist"]["e2e_s"]),
                        _ms(c["gist"]["e2e_from_cache_s"]),
                        _ms(c["truncate"]["e2e_s"]),
                    ]
                    for c in sh["cells"]
                ],
            ),
            "",
        ]
    weights = main["weight_bytes"]
    longest = max(c["prompt_len"] for c in main["cells"])
    kv_long = main["kv_bytes_per_token"] * longest
    kv_long_mha = attn["kv_bytes_per_token"] * longest
    out += [
        "Where the time goes: a batch-1 decode step reads every weight once "
        f"({weights / 2**20:.0f} MiB here) plus the KV it attends to. At P = {longest} the full prompt's KV is "
        f"{kv_long / 2**20:.0f} MiB in the `gqa` shape ({kv_long / weights:.2f}x the weights) and "
        f"{kv_long_mha / 2**20:.0f} MiB in the `mha` shape ({kv_long_mha / attn['weight_bytes']:.2f}x its weights), so "
        "the gist cache can at best remove that share of the step: batch-1 decoding stays "
        "weight-bound while the prompt's KV is small beside the weights, and the gain grows with the KV heads, the "
        "prompt length and the batch (KV is per row, weights are shared), where attention dominates. Fixed per-step "
        "costs (Python, per-layer dispatch) also count against both equally. The goals table gives, beside each "
        "decode ratio, the ratio of the bytes a step reads (weights + KV, full prompt / gist cache): what a purely "
        "memory-bound step would gain. In the `gqa` shape it is below 2x at batch 1, so no implementation can reach "
        "the 2x goal there on a memory-bound step (the measured ratio may exceed it only where attention costs more "
        "than reading its KV). Llama 3.1 8B in bf16 reads about 15 GB of weights per step and 0.5 GiB of KV per row "
        "at P = 4096: 1.04x at batch 1, 2x from about 28 rows.",
        "",
        "![KV bytes](kv_bytes.png)",
        "",
        "![decode](decode.png)",
        "",
    ]
    if "batched" in inf:
        b = inf["batched"]
        out += [
            f"#### Batched decode: {b['rows']} rows, each with its own {b['prompt_len']}-token prompt, K={b['k']} "
            "(`gqa` shape)",
            "",
            table(
                [
                    "variant",
                    "KV bytes held",
                    "prefill / compress ms",
                    "decode ms/step (all rows)",
                    "full / gist decode",
                ],
                [
                    [
                        "full prompt",
                        b["full"]["kv_bytes"],
                        _ms(b["full"]["prefill_s"]),
                        _ms(b["full"]["decode_s_per_step"]),
                        "1.00x",
                    ],
                    [
                        "gist cache",
                        b["gist"]["kv_bytes"],
                        _ms(b["gist"]["compress_s"]),
                        _ms(b["gist"]["decode_s_per_step"]),
                        f"{b['decode_speedup_gist_vs_full']:.2f}x",
                    ],
                ],
            ),
            "",
            "A decode step reads the weights once for all rows, and each row's own prompt KV: with several rows (a "
            "server's usual case) the prompts' KV outweighs the weights and dropping it pays most."
            + (
                f" Each side ran {b['rounds']} times, interleaved; the table gives the median call (median steps per "
                f"call: full {', '.join(_ms(x) for x in b['full']['decode_s_per_step_each_round'])} ms, gist "
                f"{', '.join(_ms(x) for x in b['gist']['decode_s_per_step_each_round'])} ms)."
                if "rounds" in b
                else ""
            ),
            "",
        ]
    if inf["stock"]:
        out += [
            f"#### torchtune's stock decode (`torchtune.generation.generate`, `setup_caches` at the model's full "
            f"`max_seq_len` = {inf['max_seq_len']} slots, `gqa` shape, plain causal)",
            "",
            table(
                [
                    "P",
                    "cache slots",
                    "KV bytes",
                    "prefill ms",
                    "decode ms/tok",
                    "ours, full prompt: decode ms/tok",
                    "stock / ours",
                ],
                [
                    [
                        r["prompt_len"],
                        r["cache_slots"],
                        r["kv_bytes"],
                        _ms(r["prefill_s"]),
                        _ms(r["decode_s_per_token"]),
                        _ms(ours),
                        f"{r['decode_s_per_token'] / ours:.2f}x",
                    ]
                    for r in inf["stock"]
                    for ours in [
                        next(
                            c["full"]["decode_s_per_token"]
                            for c in main["cells"]
                            if c["prompt_len"] == r["prompt_len"] and c["k"] == r["k"]
                        )
                    ]
                ],
            ),
            "",
            "torchtune's cached attention attends over every allocated slot and expands the keys/values of all of them "
            "for grouped-query attention at every step, so its per-token cost follows the allocated length, not the "
            "prompt.",
            "",
        ]
    r = inf["reuse"]
    out += [
        f"#### Compress once, reuse many (`gqa` shape, one {r['prompt_len']}-token prompt, K={r['k']}, {r['inputs']} "
        f"inputs of {r['cont_len']} tokens, {r['new_tokens']} new tokens each; compression time included; each variant "
        "once, after a one-input warm-up of each)",
        "",
        table(
            ["variant", "time s", "inputs/s", "speedup", "KV bytes held (largest call)"],
            [
                [n, v["time_s"], v["inputs_per_s"], f"{v['speedup']:.2f}x", v["kv_bytes_held"]]
                for n, v in ((n, r["variants"][n]) for n in REUSE_VARIANTS)
            ],
        ),
        "",
        "![reuse many](reuse_many.png)",
        "",
    ]
    if "compress_memory" in inf:
        cm = inf["compress_memory"]
        out += [
            f"#### Memory of `compress`: one pass vs chunks of {cm['chunk_size']} tokens (`gqa` shape, "
            f"{cm['rows_per_call']} prompts per call, K={cm['k']})",
            "",
            _memory_table(cm["cells"], ("one_pass", "one pass"), ("chunked", "chunked")),
            "",
            "Each call runs in a fresh process (`benchmarks/_peak_memory.py`); peak = the resident set's high-water "
            "mark above the resident set just before the call. `compress` goes layer by layer (one layer's prompt "
            "keys/values held at a time) and, within a layer, `chunk_size` tokens per pass; one pass = `chunk_size` >= "
            "the prompt. A pass of `c` tokens over `t` cached ones builds a `[b, c, t]` mask (folded to "
            "`[b, 1, g*c, t]` for grouped-query attention) and scores of that size, so one pass grows with the square "
            "of the prompt, chunks with the prompt. Chunks also skip the masked upper half of the score matrix a "
            "single pass computes.",
            "",
            "![compress memory](compress_memory.png)",
            "",
        ]
    if "score_memory" in inf:
        sm = inf["score_memory"]
        out += [
            f"#### Memory of lm-eval's `loglikelihood` scoring (gist mode): one full-sequence forward vs "
            f"`score_continuations` (`gqa` shape, {sm['rows_per_call']} requests per call, {sm['scored']} of "
            f"{sm['cont_len']} continuation tokens scored, K={sm['k']}, chunks of {sm['chunk_size']})",
            "",
            _memory_table(sm["cells"], ("dense", "dense forward"), ("stores", "score_continuations")),
            "",
            "Same process protocol as above. The dense forward is how `loglikelihood` scored before "
            "`score_continuations`: one pass over `[BOS] prompt G continuation` under the `[b, s, s]` gist mask "
            "(logits only at the scored positions). `score_continuations` compresses the prompt as `compress` does, "
            "then feeds the continuation after the K gist entries and computes logits only where tokens are scored: "
            "the scores are the same (tests/test_generation.py compares them with full-sequence references).",
            "",
            "![score memory](score_memory.png)",
            "",
        ]
    return out


def _memory_table(cells: List[Dict[str, Any]], baseline: Tuple[str, str], other: Tuple[str, str]) -> str:
    """The table of :func:`_memory_cells`' cells; ``baseline`` and ``other`` are ``(key, column label)``."""
    (a, la), (b, lb) = baseline, other
    return table(
        [
            "P",
            f"{la}: peak MiB",
            f"{lb}: peak MiB",
            f"{la} / {lb} (memory)",
            f"{la} s",
            f"{lb} s",
            f"{la} / {lb} (time)",
        ],
        [
            [
                c["prompt_len"],
                fmt(c[a]["peak_bytes"] / 2**20),
                fmt(c[b]["peak_bytes"] / 2**20),
                f"{c[f'peak_ratio_{a}_vs_{b}']:.2f}x",
                fmt(c[a]["time_s"]),
                fmt(c[b]["time_s"]),
                f"{c[f'time_ratio_{a}_vs_{b}']:.2f}x",
            ]
            for c in cells
        ],
    )

"""Turn pytest-benchmark's JSON into bench/RESULTS.md.

    pytest bench/ --benchmark-json=bench/results.json
    python bench/report.py bench/results.json -o bench/RESULTS.md

One table per benchmark group (implementations side by side), the device, torch/triton versions and date,
time per call (mean and median), the throughput (GB/s for the op, questions/s for the step and the loader,
TFLOP/s for the generator) and speed-ups (median time of reference or compile ÷ median time of triton).
When the benchmarks ran on a CPU the report says, at the top, that its numbers are a shape-check only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from typing import Any

IMPL_ORDER = ["reference", "compile", "triton", "cache", "png", "fwd", "fwdbwd"]
KIND_TITLES = {
    "op": "Fused ResBlock op: `kernels.bn_film_relu` (BN → FiLM → ReLU → + residual), train mode",
    "train_step": "One training step of the raw-pixel model (forward, loss, backward, Adam)",
    "generator": "FiLM generator alone (embedding → GRU → linear)",
    "loader": "Loader alone (one epoch of the train split)",
    "flops": "Work per question: GFLOP (FlopCounterMode, matmuls and convolutions)",
    "ceiling": "The machine's ceiling: square matmul per dtype (sized by a probe), same threads, same run",
    "original": "Against the original code (ethanjperez/film), same machine, same run",
    "other": "Other benchmarks",
}
KIND_ORDER = ["flops", "ceiling", "original", "op", "train_step", "generator", "loader", "other"]


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def kind_of(b: dict[str, Any]) -> str:
    kind = b.get("extra_info", {}).get("kind")
    return kind if kind in KIND_TITLES else "other"


def impl_of(b: dict[str, Any]) -> str:
    info = b.get("extra_info", {})
    if info.get("kind") == "generator":
        return info.get("pass", b["name"])
    return info.get("impl", b["name"])


def throughput(b: dict[str, Any]) -> tuple[str, float | None]:
    """(unit, value) of the benchmark's throughput from extra_info (None: none recorded)."""
    info = b.get("extra_info", {})
    for key, unit in (
        ("gb_per_s", "GB/s"),
        ("tflop_per_s", "TFLOP/s"),
        ("questions_per_s", "questions/s"),
        ("gflop_per_s", "GFLOP/s"),
    ):
        if info.get(key) is not None:
            return unit, float(info[key])
    return "", None


def natural_key(text: str) -> list:
    """Sort "N=64" before "N=256" (numbers as numbers)."""
    return [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", text)]


def _order(name: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(name) if name in IMPL_ORDER else len(IMPL_ORDER), name)


def environment(data: dict[str, Any]) -> tuple[list[str], bool]:
    """The header lines and whether the run was on a CPU."""
    mi = data.get("machine_info", {})
    ff = mi.get("fastfilm", {})
    device_type = ff.get("device_type")
    if device_type is None:  # not written by bench/conftest.py: guess from the benchmarks
        devices = {b.get("extra_info", {}).get("device", "") for b in data.get("benchmarks", [])}
        device_type = "cpu" if any(d.startswith("CPU") for d in devices) or not devices else "cuda"
    is_cpu = device_type != "cuda"
    device = ff.get("device") or mi.get("cpu", {}).get("brand_raw", "unknown")
    commit = data.get("commit_info", {})
    lines = []
    if is_cpu:
        lines += [
            "> [!WARNING]",
            "> **CPU RUN: THESE NUMBERS ARE A SHAPE-CHECK ONLY, NOT PERFORMANCE RESULTS.**",
            "> They come from a CPU with small shapes and a small model; Triton runs only in its interpreter",
            "> there (those cases are skipped, or timed only with `--bench-include-interpreter`, and then",
            "> measure the interpreter, not a kernel). Nothing here predicts GPU speed: rerun on a GPU",
            "> (`bench/gpu_run.sh OUTDIR`) for real results.",
            "",
        ]
    if ff.get("quick"):
        lines += ["Run with `--bench-quick`: fewest sizes and rounds.", ""]
    rows = [
        ("device", device),
        ("torch", ff.get("torch", "?")),
        ("triton", ff.get("triton", "?")),
        ("CUDA / cuDNN", f"{ff.get('cuda')} / {ff.get('cudnn')}" if not is_cpu else "— (no GPU)"),
        ("deepspeed / DALI", f"{ff.get('deepspeed') or 'absent'} / {ff.get('dali') or 'absent'}"),
        ("python", ff.get("python") or mi.get("python_version", "?")),
        ("torch intra-op threads", ff.get("torch_threads", "?")),
        (
            "float32 matmul precision / cuDNN TF32",
            f"{ff.get('float32_matmul_precision', '?')} / {ff.get('cudnn_allow_tf32', '?')}",
        ),
        ("host", f"{mi.get('node', '?')} ({mi.get('system', '?')} {mi.get('release', '')})".strip()),
        ("date", data.get("datetime", "?")),
        (
            "commit",
            f"{commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''} "
            f"{commit.get('branch', '')}".strip(),
        ),
        ("pytest-benchmark", data.get("version", "?")),
    ]
    if ff.get("triton_interpret"):
        rows.append(("TRITON_INTERPRET", ff["triton_interpret"]))
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return lines, is_cpu


def group_table(benches: list[dict[str, Any]], ratios: bool = True) -> list[str]:
    """All benchmarks of one group, one row each; with `ratios`, the speed-ups where both sides exist."""
    by_impl = {impl_of(b): b for b in benches}
    med = {k: b["stats"]["median"] for k, b in by_impl.items()}
    head = "| implementation | mean | median | stddev | rounds × iterations | throughput |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if ratios:
        head += " speed-up vs reference | speed-up vs compile |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for impl in sorted(by_impl, key=_order):
        b = by_impl[impl]
        st = b["stats"]
        unit, tp = throughput(b)
        iters = st.get("iterations", b.get("extra_info", {}).get("iterations_per_round", 1))
        row = (
            f"| {impl} | {fmt_time(st['mean'])} | {fmt_time(st['median'])} | {fmt_time(st.get('stddev'))} "
            f"| {st.get('rounds', '?')} × {iters} | {fmt_num(tp)} {unit}".rstrip()
            + " |"
        )
        if ratios:
            vs_ref = med["reference"] / med[impl] if "reference" in med and impl != "reference" else None
            vs_cmp = med["compile"] / med[impl] if "compile" in med and impl != "compile" else None
            row += f" {fmt_ratio(vs_ref)} | {fmt_ratio(vs_cmp)} |"
        lines.append(row)
    return lines


def summary_table(kind: str, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Ops and train steps: one row per group, the implementations as columns, triton's speed-ups last."""
    present = {impl_of(b) for g in groups.values() for b in g}
    impls = sorted(present | {"reference", "compile", "triton"}, key=_order)  # a skipped mode still shows
    unit = "GB/s" if kind == "op" else "questions/s"
    head = "| case | " + " | ".join(f"{i}: median / {unit}" for i in impls)
    head += " | triton ÷ reference (speed-up) | triton ÷ compile (speed-up) |"
    lines = [head, "| --- |" + " ---: |" * (len(impls) + 2)]
    for name, benches in groups.items():
        by_impl = {impl_of(b): b for b in benches}
        cells = []
        for i in impls:
            b = by_impl.get(i)
            cells.append(
                "skipped / not run"
                if b is None
                else f"{fmt_time(b['stats']['median'])} / {fmt_num(throughput(b)[1])}"
            )
        med = {k: b["stats"]["median"] for k, b in by_impl.items()}
        t = med.get("triton")
        r_ref = med["reference"] / t if t and "reference" in med else None
        r_cmp = med["compile"] / t if t and "compile" in med else None
        case = name.split("/", 1)[-1]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {fmt_ratio(r_ref)} | {fmt_ratio(r_cmp)} |")
    return lines


def generator_share(benches: list[dict[str, Any]]) -> list[str]:
    """The generator's fwd+bwd time as a share of the train step's, per dtype and kernels mode."""
    steps = [b for b in benches if kind_of(b) == "train_step"]
    gens = [
        b for b in benches if kind_of(b) == "generator" and b.get("extra_info", {}).get("pass") == "fwdbwd"
    ]
    rows = []
    for g in gens:
        gi = g["extra_info"]
        for s in steps:
            si = s["extra_info"]
            if (si.get("dtype"), si.get("batch"), si.get("question_len")) != (
                gi.get("dtype"),
                gi.get("batch"),
                gi.get("question_len"),
            ):
                continue
            share = g["stats"]["median"] / s["stats"]["median"]
            rows.append(
                f"| {gi.get('dtype')} | {si.get('impl')} | {fmt_time(g['stats']['median'])} "
                f"| {fmt_time(s['stats']['median'])} | {share:.0%} |"
            )
    if not rows:
        return ["(no matching generator fwd+bwd and train-step results in this run)"]
    return [
        "| dtype | step's kernels mode | generator fwd+bwd (median) | train step (median) | generator share |",
        "| --- | --- | ---: | ---: | ---: |",
        *sorted(rows),
    ]


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def flops_section(benches: list[dict[str, Any]]) -> list[str]:
    """GFLOP per question per shipped config: packed (now), padded to a batch's longest (before packing),
    padded to the dataset's longest (the original), forward and forward + backward."""
    rows = []
    for b in sorted(benches, key=lambda b: b["extra_info"].get("config", "")):
        i = b["extra_info"]
        orig = i.get("original_fwdbwd_gflop")
        packed = i.get("packed_fwdbwd_gflop")
        tokens = (
            f"{i.get('mean_tokens', 0):.1f} / "
            + (f"{i['batch_longest_tokens']:.1f}" if "batch_longest_tokens" in i else "—")
            + f" / {i.get('padded_tokens', 0):.0f}"
        )
        rows.append(
            f"| {i.get('config')} | {i.get('lengths_source', '?')} | {tokens} "
            f"| {_g(i.get('packed_fwd_gflop'))} / {_g(i.get('batch_longest_fwd_gflop'))} / "
            f"{_g(i.get('original_fwd_gflop'))} "
            f"| **{_g(packed)}** / {_g(i.get('batch_longest_fwdbwd_gflop'))} / {_g(orig)} "
            f"| {fmt_ratio(packed / orig if packed and orig else None)} "
            f"| {_g(i.get('rnn_steps_shuffled'))} / {_g(i.get('rnn_steps_bucketed'))} |"
        )
    return [
        "Tokens include <START>/<END>. *Packed*: fastfilm now, each question's own tokens (at the mean length). "
        "*Batch-longest*: fastfilm before packing, padded to a shuffled batch's expected longest question "
        "(needs the length distribution: `--bench-lengths CACHE` for CLEVR). *Original*: padded to the dataset's "
        "longest, as `ethanjperez/film` runs. Counted on the meta device: matmuls and convolutions only. "
        "*RNN steps per batch*: the mean longest question of a batch over one epoch at the config's batch size, "
        "shuffled and with `data.bucket_by_length` (each step re-reads the GRU's hidden weights).",
        "",
        "| config | lengths | tokens: mean / batch-longest / padded | GFLOP fwd: packed / batch-longest / "
        "original | GFLOP fwd+bwd: packed / batch-longest / original | packed ÷ original "
        "| RNN steps per batch: shuffled / `bucket_by_length` |",
        "| --- | --- | --- | --- | --- | ---: | --- |",
        *rows,
    ]


def ceiling_section(benches: list[dict[str, Any]]) -> list[str]:
    """Each train step's achieved GFLOP/s (its counted forward + backward ÷ median time) beside the machine's
    own matmul GFLOP/s in the step's dtype, measured in the same run."""
    ceil = {
        b["extra_info"].get("dtype"): b["extra_info"].get("gflop_per_s")
        for b in benches
        if kind_of(b) == "ceiling" and b["extra_info"].get("gflop_per_s")
    }
    sizes = {
        b["extra_info"].get("dtype"): b["extra_info"].get("n")
        for b in benches
        if kind_of(b) == "ceiling" and b["extra_info"].get("gflop_per_s")
    }
    head = []
    if ceil:
        head = [
            "Matmul GFLOP/s per dtype: "
            + ", ".join(f"{d} {_g(v)} ({sizes.get(d) or '?'}²)" for d, v in sorted(ceil.items()))
            + ".",
            "",
        ]
        fast = max(ceil.values())
        for d, v in sorted(ceil.items()):
            if v * 2 < fast:  # a dtype the hardware does not run natively (bf16 on an AVX2-only CPU)
                head += [
                    f"**Finding: {d} is {fast / v:.0f}× slower than the fastest dtype on this machine.**",
                    "",
                ]
    rows = []
    for b in benches:
        i = b.get("extra_info", {})
        if i.get("gflop_per_step") is None or kind_of(b) == "ceiling":
            continue
        med = b["stats"]["median"]
        achieved = i["gflop_per_step"] / med if med else None
        c = ceil.get(i.get("dtype"))
        rows.append(
            f"| {b.get('group') or b['name']} | {i.get('impl', '?')} | {_g(i['gflop_per_step'])} "
            f"| {fmt_time(med)} | {_g(achieved)} | {_g(c)} "
            f"| {f'{achieved / c:.1%}' if achieved and c else '—'} |"
        )
    if not rows:
        return head
    return [
        *head,
        "Achieved: the step's counted GFLOP (forward + backward, packed) ÷ its median time; optimizer, BN and "
        "elementwise work are not counted, so the ratio is a lower bound on how busy the machine was.",
        "",
        "| train step | kernels | GFLOP / step | median | achieved GFLOP/s | matmul GFLOP/s (same dtype) "
        "| achieved ÷ matmul |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


def original_section(benches: list[dict[str, Any]]) -> list[str]:
    """Questions/s of the original code's train step and of fastfilm's, same batch, same run."""
    origs = [b for b in benches if str(b["extra_info"].get("impl", "")).startswith("original")]
    rows = []
    for o in origs:
        oi = o["extra_info"]
        for b in benches:
            i = b["extra_info"]
            if i.get("batch") != oi.get("batch") or i.get("setup") != oi.get("setup"):
                continue
            q = i.get("questions_per_s")
            ratio = q / oi["questions_per_s"] if q and oi.get("questions_per_s") else None
            rows.append(
                f"| {i.get('setup', '?')} | {i.get('impl')} | {fmt_time(b['stats']['median'])} "
                f"| {fmt_num(q)} | {fmt_ratio(ratio)} |"
            )
    if not rows:
        return []
    return [
        "| setup | code | median step | questions/s | × the original |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
    ]


def render(data: dict[str, Any], source: str = "") -> str:
    benches = data.get("benchmarks", [])
    env, is_cpu = environment(data)
    title = "# fastfilm benchmark results" + (
        " (CPU shape-check, not a performance result)" if is_cpu else ""
    )
    out = [title, "", *env]
    out += [
        "Time is per call (pytest-benchmark divides a round by its iterations). On a GPU the timer calls "
        "`torch.cuda.synchronize()` before each clock read, after untimed warm-up rounds (compilation, "
        "autotuning). Speed-ups compare medians: `reference ÷ triton` and `compile ÷ triton` (> 1 means "
        "triton is faster). Throughputs use the median time too. The op's GB/s is the minimum traffic ÷ time "
        "(`bench/benchlib.py:bn_film_relu_bytes`: forward 3·E·s, forward+backward 7·E·s, plus γ/β), a lower "
        "bound on the bandwidth actually used.",
        "",
    ]
    if source:
        out += [f"Source: `{source}`.", ""]

    by_kind: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for b in benches:
        by_kind[kind_of(b)][b.get("group") or b["name"]].append(b)

    if not benches:
        out += ["**No benchmark ran** (every case skipped or failed).", ""]
    for kind in KIND_ORDER:
        groups = by_kind.get(kind)
        if not groups:
            continue
        groups = dict(sorted(groups.items(), key=lambda kv: natural_key(kv[0])))
        out += [f"## {KIND_TITLES[kind]}", ""]
        if kind == "flops":
            out += [*flops_section([b for g in groups.values() for b in g]), ""]
            continue
        if kind == "ceiling":
            out += [*ceiling_section(benches), ""]
        if kind == "original":
            out += [*original_section([b for g in groups.values() for b in g]), ""]
        if kind in ("op", "train_step"):
            out += ["Summary (median time per call / throughput):", "", *summary_table(kind, groups), ""]
        if kind == "generator":
            out += ["Share of the train step's time:", "", *generator_share(benches), ""]
        if kind == "train_step":
            notes = {b["extra_info"].get("cuda_graphs") for g in groups.values() for b in g} - {None}
            for n in sorted(notes):
                out += [f"CUDA graphs: {n}.", ""]
        for name, group in groups.items():
            out += [f"### {name}", "", *group_table(group, ratios=kind in ("op", "train_step")), ""]

    skipped = data.get("fastfilm_skipped", [])
    if skipped:
        out += ["## Collected but not timed", "", "| test | reason |", "| --- | --- |"]
        out += [f"| `{s['test']}` | {s['reason']} |" for s in skipped]
        out += [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="pytest-benchmark JSON (pytest bench/ --benchmark-json=FILE)")
    p.add_argument("-o", "--out", default=None, help="Markdown file to write (default: print to stdout)")
    args = p.parse_args(argv)
    try:
        with open(args.json, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"report.py: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    text = render(data, source=os.path.basename(args.json))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out} ({len(data.get('benchmarks', []))} benchmarks)")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

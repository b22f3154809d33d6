"""Profile N training steps of the paper's raw-pixel model per kernels mode (PyTorch profiler).

    python bench/profile_step.py --out OUTDIR [--modes reference,compile,triton] [--steps 5] [--warmup 5]
                                 [--dtype bf16|fp32] [--config configs/clevr.json] [--set SECTION.KEY=VALUE]...

Per mode it writes OUTDIR/profile_<mode>_<dtype>.txt (the profiler's top-operator table and the top GPU
kernels), and for all modes OUTDIR/profile_summary.md / .json: time per step, questions/s, GPU kernels per
step, kernel launches per step (CUDA runtime launch calls seen on the CPU side) and the top kernels.

The step is the benchmark's (bench/benchlib.py: autocast forward, float32 loss, backward, the trainer's
Adam) on one fixed synthetic batch, so the loader is not in it. Without a GPU it profiles CPU operators only
(there are no kernel launches to count) and uses the small CPU model unless --config is given; Triton then
runs in its interpreter and its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _p in (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(__file__)),
):
    if _p not in sys.path:  # `fastfilm`, `kernels` and `benchlib` importable from a plain checkout
        sys.path.insert(0, _p)

import benchlib  # noqa: E402

if (
    not benchlib.CUDA
):  # as bench/conftest.py: one intra-op thread keeps CPU numbers stable on a shared machine
    torch.set_num_threads(int(os.environ.get("FASTFILM_BENCH_CPU_THREADS", "1")))

# CUDA runtime / driver calls that enqueue one kernel (or a whole graph) each.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch")


def _device_time(evt) -> float:
    """A GPU kernel event's duration in µs (the attribute names moved between torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    tr = getattr(evt, "time_range", None)
    return float(tr.elapsed_us()) if tr is not None else 0.0


def _is_device_event(evt) -> bool:
    dt = getattr(evt, "device_type", None)
    return dt is not None and getattr(dt, "name", str(dt)).upper().endswith("CUDA")


def profile_mode(cfg, mode: str, dtype: str, steps: int, warmup: int, top: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    benchlib.fresh_compile_state(mode)
    engine = benchlib.build_engine(cfg, mode, benchlib.DTYPES[dtype] if dtype != "fp32" else None)
    batch = benchlib.synthetic_batch(cfg)
    step = benchlib.make_train_step(engine, batch)
    n = batch["question"].shape[0]

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    benchlib.sync()
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    benchlib.sync()
    step_s = (time.perf_counter() - t0) / steps  # unprofiled: the profiler's own overhead is not in it
    final_loss = float(loss.detach())

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if benchlib.CUDA else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        benchlib.sync()

    events = prof.events()
    kernels_time: dict[str, float] = defaultdict(float)
    kernels_count: Counter = Counter()
    launches = graph_launches = 0
    for e in events:
        if _is_device_event(e):
            name = e.name
            if name.startswith(("Memcpy", "Memset")) or "memcpy" in name.lower():
                continue
            kernels_count[name] += 1
            kernels_time[name] += _device_time(e)
        elif e.name in LAUNCH_CALLS:
            launches += 1
        elif e.name in GRAPH_CALLS:
            graph_launches += 1
    total_kernel_us = sum(kernels_time.values())
    top_kernels = [
        {
            "kernel": name,
            "calls_per_step": kernels_count[name] / steps,
            "us_per_step": t / steps,
            "share": t / total_kernel_us if total_kernel_us else 0.0,
        }
        for name, t in sorted(kernels_time.items(), key=lambda kv: -kv[1])[:top]
    ]
    keys = ["self_device_time_total", "self_cuda_time_total"] if benchlib.CUDA else []
    table = ""
    for key in [*keys, "self_cpu_time_total"]:  # the sort key's name depends on the torch version
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=top)
            break
        except Exception:
            continue
    del engine, step
    if benchlib.CUDA:
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "dtype": dtype,
        "batch": n,
        "steps_profiled": steps,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "step_ms": step_s * 1e3,
        "questions_per_s": n / step_s,
        "loss_after": final_loss,
        "gpu_kernels_per_step": sum(kernels_count.values()) / steps if benchlib.CUDA else None,
        "kernel_launches_per_step": launches / steps if benchlib.CUDA else None,
        "graph_launches_per_step": graph_launches / steps if benchlib.CUDA else None,
        "gpu_kernel_us_per_step": total_kernel_us / steps if benchlib.CUDA else None,
        "top_kernels": top_kernels,
        "operator_table": table,
    }


def write_outputs(out: str, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    os.makedirs(out, exist_ok=True)
    for r in results:
        with open(os.path.join(out, f"profile_{r['mode']}_{r['dtype']}.txt"), "w", encoding="utf-8") as f:
            f.write(f"mode={r['mode']} dtype={r['dtype']} batch={r['batch']} steps={r['steps_profiled']}\n\n")
            f.write("Top GPU kernels (per step):\n")
            for k in r["top_kernels"]:
                f.write(
                    f"  {k['us_per_step']:10.1f} us  {k['calls_per_step']:6.1f} calls  "
                    f"{k['share']:6.1%}  {k['kernel']}\n"
                )
            f.write("\nProfiler operator table:\n")
            f.write(r["operator_table"])
    with open(os.path.join(out, "profile_summary.json"), "w", encoding="utf-8") as f:
        slim = [{k: v for k, v in r.items() if k != "operator_table"} for r in results]
        json.dump({"meta": meta, "results": slim}, f, indent=2)

    def num(x, fmt):
        return "n/a (no GPU)" if x is None else format(x, fmt)

    lines = [
        "# Train-step profile",
        "",
        f"device: {meta['device']}; torch {meta['versions'].get('torch')}, "
        f"triton {meta['versions'].get('triton')}; config {meta['config']}; "
        f"{meta['steps']} profiled steps after {meta['warmup']} warm-up steps.",
        "",
    ]
    if not benchlib.CUDA:
        lines += ["**CPU run: shape-check only; Triton runs in its interpreter, times mean nothing.**", ""]
    lines += [
        "| mode | dtype | ms/step (unprofiled) | questions/s | GPU kernels/step | kernel launches/step "
        "| GPU kernel time/step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['step_ms']:.2f} | {r['questions_per_s']:,.0f} "
            f"| {num(r['gpu_kernels_per_step'], '.1f')} | {num(r['kernel_launches_per_step'], '.1f')} "
            f"| {num(r['gpu_kernel_us_per_step'], ',.0f')}{' µs' if benchlib.CUDA else ''} |"
        )
    for r in results:
        lines += ["", f"## Top kernels: {r['mode']} {r['dtype']}", ""]
        if not r["top_kernels"]:
            lines.append("(no GPU kernels recorded)")
            continue
        lines += ["| µs/step | calls/step | share | kernel |", "| ---: | ---: | ---: | --- |"]
        for k in r["top_kernels"]:
            name = k["kernel"].replace("|", "\\|")
            if len(name) > 110:
                name = name[:107] + "..."
            lines.append(
                f"| {k['us_per_step']:,.1f} | {k['calls_per_step']:.1f} | {k['share']:.1%} | `{name}` |"
            )
    with open(os.path.join(out, "profile_summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--modes", default="reference,compile,triton", help="comma-separated kernels modes")
    p.add_argument("--dtype", choices=sorted(benchlib.DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (compilation, autotuning)")
    p.add_argument("--top", type=int, default=25, help="rows in the kernel and operator tables")
    p.add_argument(
        "--config",
        default=None,
        help="config file (default: configs/clevr.json on a GPU, the small bench model on a CPU)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    if args.config:
        from fastfilm.config import load_config

        cfg = load_config(args.config, args.overrides)
        config_name = args.config
    else:
        cfg = benchlib.bench_config(overrides=tuple(args.overrides))
        config_name = "configs/clevr.json" + ("" if benchlib.CUDA else " + bench small-model overrides (CPU)")
    meta = {
        "device": benchlib.device_name(),
        "versions": benchlib.versions(),
        "config": config_name,
        "steps": args.steps,
        "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results, failed = [], []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        print(f"profile_step: {mode} {args.dtype} ...", flush=True)
        try:
            r = profile_mode(cfg, mode, args.dtype, args.steps, args.warmup, args.top)
        except Exception as e:  # one failing mode must not hide the others' profiles
            import traceback

            traceback.print_exc()
            failed.append(f"{mode}: {type(e).__name__}: {e}")
            continue
        print(
            f"  {r['step_ms']:.2f} ms/step, {r['questions_per_s']:,.0f} questions/s, "
            f"kernels/step {r['gpu_kernels_per_step']}, launches/step {r['kernel_launches_per_step']}",
            flush=True,
        )
        results.append(r)
    meta["failed"] = failed
    write_outputs(args.out, results, meta)
    print(f"profile_step: wrote {args.out}/profile_summary.md", flush=True)
    for f in failed:
        print(f"profile_step: FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's train step as a GPU engineer looks at it, per case: eager NCHW, eager channels_last, graph mode.

    python bench/gpu_step.py --out results.json            # a GPU: configs/clevr.json, batch 64 (and 256), bf16
    python bench/gpu_step.py --tiny --out results.json     # a CPU: the small bench model, shape-check only

Per case: ms/step (median of `--steps` steps after warm-up, each synchronised), questions/s, achieved TFLOP/s
(the step's useful FLOPs — GRU over each question's real tokens, as `bench/workload.py` counts them — over the
median) and its share of this device's own measured bf16 matmul ceiling, kernel launches per step (CUDA runtime
launch calls + graph launches + async copies, from torch.profiler), GPU kernels executed per step, GPU-busy share
(kernel time ÷ the unprofiled median), ATen ops dispatched on the host per step (the CPU-side launch proxy), host
synchronisations per step (`torch.cuda.set_sync_debug_mode` warnings), peak memory, and the step's *floor*
(`bench/roofline.py`: each kernel at this device's measured matmul ceiling or copy bandwidth, summed; predicted) with
its share of the measured time (`floor_share`: 1 would be the hardware's speed). Each case runs in its own
try/except: one failure prints its traceback and the rest go on; the JSON (`--out`) is rewritten after each case;
the exit status is 1 when any case failed.

Cases: `eager_nchw` (DeepSpeed's engine step, the model NCHW: the reference), `eager_cl` (the same, channels_last),
`static_eager_cl` (graph mode's static-shape step, not captured), `graph_cl` (captured and replayed),
`graph_cl_gru_fp32` (graph_cl with the question encoder's GRU outside autocast, float32: its cost against cuDNN's
float16 RNN that autocast picks even under bf16), `graph_cl_gru_loop` (graph_cl with the GRU as a loop of cuBLAS
products in bf16, float32 gates: bench/loop_gru.py), `graph_cl_b256` (batch 256), `graph_cl_triton` (graph mode with
every fused op site on the Triton kernels),
`graph_cl_picked` (graph mode with each site's implementation measured inside a CUDA graph by
`fastfilm.kernel_pick`, as `kernels.mode: auto` does on a GPU; its choices are in the row), `graph_cl_compile`
(+ torch.compile of the whole model; last, it compiles for minutes). Without CUDA the graph cases run uncaptured (labelled so) and times mean nothing.
The original 2017 code's step is not run here (it needs its checkout: `pytest bench/test_original.py
--original-film PATH`); its H200 figure is printed beside the cases from bench/RESULTS_GPU.md (2026-12-04).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

import torch

# Without a GPU the Triton cases run in the interpreter, switched on before anything imports triton (benchlib does)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _p in (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(__file__)),
):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import benchlib  # noqa: E402

CUDA = torch.cuda.is_available()
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch")
COPY_CALLS = ("cudaMemcpyAsync", "cudaMemsetAsync", "cuMemcpyAsync", "cuMemsetAsync")
ORIGINAL_H200 = {
    "ms": 53.5,
    "batch": 64,
    "dtype": "fp32",
    "source": "bench/gpu/2026-12-04-h200 (measured)",
}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def host_batch(cfg, batch: int, seq_len: int | None = None) -> dict[str, Any]:
    """A loader-like batch: the image on the device (DALI decodes there), questions/lengths/answers on the host."""
    b = benchlib.synthetic_batch(cfg, batch=batch, seq_len=seq_len)
    return {
        "image": b["image"],
        "question": b["question"].cpu(),
        "length": b["length"],
        "answer": b["answer"].cpu(),
    }


def build(cfg, batch: int, dtype, kernels: str = "reference"):
    cfg.deepspeed["train_micro_batch_size_per_gpu"] = batch
    cfg.model.memory_format = "channels_first"  # built NCHW; the channels_last cases convert it
    engine = benchlib.build_engine(cfg, kernels, dtype)
    cfg.model.memory_format = "auto"  # the model follows its weights' layout from here on
    return engine


def to_channels_last(engine) -> None:
    from fastfilm import train

    train.set_memory_format(engine, engine.optimizer, "channels_last")


def engine_step(engine, batch):
    from fastfilm import train

    dev = benchlib.device()

    def step():
        return train.train_step(engine, batch, dev).loss

    return step


def graphed_step(
    engine, batch, dtype, capture: bool, compile_backend: str | None = None, grad_accum=1, warmup=2
):
    from fastfilm.graphed import GraphedTrainStep, compiled_forward

    fwd = compiled_forward(engine.module, backend=compile_backend) if compile_backend else None
    step = GraphedTrainStep(
        engine.module,
        engine.optimizer,
        device=benchlib.device(),
        amp_dtype=dtype,
        max_len=batch["question"].shape[1],
        capture=capture,
        forward=fwd,
        grad_accum=grad_accum,
        warmup=warmup,
    )

    def run():
        return step(batch, True)[0]

    run.graphed = step
    return run


def check_graph(dtype) -> dict[str, Any]:
    """Graph mode against the same step uncaptured, on the small model at batch 8 (seconds, not minutes): two
    engines from one seed, 12 micro-steps with gradient accumulation 2 over two length buckets (four graphs), the
    learning rate moved half-way; the losses and the final logits must agree, and the replays must not synchronise
    the host (`torch.cuda.set_sync_debug_mode("error")`). Without CUDA both runs are uncaptured (a shape-check)."""
    cfg = benchlib.paper_config(benchlib.SMALL_MODEL_OVERRIDES)
    runs = {}
    for capture in (False, CUDA):
        engine = build(benchlib.paper_config(benchlib.SMALL_MODEL_OVERRIDES), 8, dtype)
        if CUDA:
            to_channels_last(engine)
        step = graphed_step(engine, host_batch(cfg, 8, 12), dtype, capture=capture, grad_accum=2, warmup=1)
        losses = []
        for i in range(12):
            if i == 6:
                for g in engine.optimizer.param_groups:
                    g["lr"] = g["lr"] * 0.5
            b = host_batch(cfg, 8, 12 if i % 4 < 2 else 7)
            strict = capture and i >= 8  # every graph captured by then: replays only
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                losses.append(step.graphed(b, boundary=i % 2 == 1)[0].clone())
            finally:
                if strict:
                    torch.cuda.set_sync_debug_mode("default")
        b = host_batch(cfg, 8, 12)
        with torch.no_grad():
            dev = benchlib.device()  # host_batch keeps questions and answers on the host, as the loader does
            logits = engine.module(b["image"].to(dev), b["question"].to(dev), b["length"].to(dev)).float()
        runs[capture] = (torch.stack(losses).float().cpu(), logits.cpu(), step.graphed.captures)
    (la, ga, _), (lb, gb, captures) = runs[False], runs[CUDA]
    loss_diff = float((la - lb).abs().max())
    logit_diff = float((ga - gb).abs().max() / ga.abs().max())
    tol = 2e-2 if dtype is not None else 1e-3
    return {
        "graphs_captured": captures,
        "max_loss_diff": loss_diff,
        "max_logit_rel_diff": logit_diff,
        "replays_synchronised_host": False,  # set_sync_debug_mode("error") would have raised
        "ok": loss_diff < tol and logit_diff < tol and (captures == 4 or not CUDA),
    }


def profile(step, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    from profile_step import _device_time, _is_device_event  # as the H200 profile of 2026-12-04 read them

    launches = graphs = copies = kernels = aten = 0
    kernel_us = 0.0
    for e in prof.events():
        if _is_device_event(e):
            if e.name.startswith(("Memcpy", "Memset")) or "memcpy" in e.name.lower():
                continue
            kernels += 1
            kernel_us += _device_time(e)
        elif e.name in LAUNCH_CALLS:
            launches += 1
        elif e.name in GRAPH_CALLS:
            graphs += 1
        elif e.name in COPY_CALLS:
            copies += 1
        elif e.name.startswith("aten::"):
            aten += 1
    out = {"aten_ops_per_step": aten / steps}
    if CUDA:
        out.update(
            kernel_launches_per_step=(launches + graphs + copies) / steps,
            graph_launches_per_step=graphs / steps,
            gpu_kernels_per_step=kernels / steps,
            gpu_kernel_ms_per_step=kernel_us / steps / 1e3,
        )
    return out


def host_syncs(step, steps: int) -> float | None:
    """Host synchronisations per step, as CUDA's sync debug mode reports them (None without CUDA)."""
    if not CUDA:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    return sum("synchroniz" in str(w.message).lower() for w in caught) / steps


def time_case(step, batch_size: int, warmup: int, steps: int, gflop: float, ceiling_tflops: float | None):
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    tflops = gflop / med / 1e3
    row = {
        "warmup_s": round(warm_s, 2),
        "ms": round(med * 1e3, 3),
        "min_ms": round(times[0] * 1e3, 3),
        "questions_per_s": round(batch_size / med, 1),
        "gflop_per_step": round(gflop, 3),
        "tflop_per_s": round(tflops, 3),
        "ceiling_share": round(tflops / ceiling_tflops, 4) if ceiling_tflops else None,
    }
    return row


def ceilings(dtype, cases: list[str]) -> tuple[float, float, float | None]:
    """This GPU's own ceilings, measured: the matmul TFLOP/s in the run's dtype (8192²), the copy bandwidth in
    TB/s, and the TF32 matmul TFLOP/s when a case runs a float32 GRU (cuDNN's RNN takes TF32)."""
    from workload import copy_gbps, matmul_gflops

    ceiling = matmul_gflops(torch.bfloat16 if dtype else torch.float32, n=8192, min_seconds=0.5) / 1e3
    hbm = copy_gbps() / 1e3
    tf32 = None
    if "graph_cl_gru_fp32" in cases or dtype is None:
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = matmul_gflops(torch.float32, n=8192, min_seconds=0.5) / 1e3
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
    return ceiling, hbm, tf32


def set_question_encoder(generator: torch.nn.Module, case: str) -> None:
    """The question encoder as `case` runs it: `graph_cl_gru_fp32` outside autocast in float32 (on a GPU autocast
    runs cuDNN's RNN in float16 whatever its dtype: README, "Precision"), `graph_cl_gru_loop` as a loop of
    cuBLAS products inside the graph (bench/loop_gru.py), every other case as the trainer runs it."""
    generator.rnn_autocast = case != "graph_cl_gru_fp32"
    generator.encoder_rnn.__dict__.pop("forward", None)  # a previous case's loop_gru
    if case == "graph_cl_gru_loop":
        from loop_gru import use_loop_gru

        use_loop_gru(generator)


def floor_ms(
    cfg,
    batch,
    case: str,
    dtype,
    ceiling_tflops: float | None,
    hbm_tbps: float | None,
    tf32_tflops: float | None = None,
) -> float:
    """The case's predicted floor (bench/roofline.py) at this device's measured ceilings (the H200's on a CPU):
    graph mode's static step runs the RNN over the padded batch, the engine step over each question's tokens
    (cuDNN packed). `graph_cl_gru_fp32`'s GRU reads float32 weights at the TF32 ceiling (cuDNN's RNN takes TF32
    while `torch.backends.cudnn.allow_tf32`, torch's default)."""
    import roofline

    fp32_rnn = case == "graph_cl_gru_fp32" or dtype is None
    rows = roofline.step_floor(
        cfg.model,
        [int(x) for x in batch["length"]],
        padded=not case.startswith("eager"),
        matmul_tflops=ceiling_tflops or roofline.H200_MATMUL_TFLOPS,
        hbm_tbps=hbm_tbps or roofline.H200_HBM_TBPS,
        act_bytes=2 if dtype is not None else 4,
        rnn_bytes=4 if fp32_rnn else 2,
        rnn_tflops=(tf32_tflops or roofline.H200_TF32_TFLOPS) if fp32_rnn else None,
    )
    return roofline.total_ms(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file (rewritten after every case)")
    p.add_argument(
        "--tiny", action="store_true", help="the small bench model at batch 8/32 (CPU shape-check)"
    )
    p.add_argument(
        "--cases",
        # issue 23's two targets first (batch 64 and 256), then the experiments; --budget-s cuts from the end
        default="check_graph,eager_nchw,eager_cl,static_eager_cl,graph_cl,graph_cl_b256,graph_cl_gru_fp32,"
        "graph_cl_gru_loop,graph_cl_triton,graph_cl_picked,graph_cl_compile",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 30 GPU, 3 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 2 tiny)")
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of graph_cl_compile")
    p.add_argument("--md", default=None, help="also write the table as markdown (e.g. bench/RESULTS_GPU.md)")
    p.add_argument(
        "--budget-s", type=float, default=0, help="skip the cases that would start after this (0: none)"
    )
    args = p.parse_args(argv)
    tiny = args.tiny
    steps = args.steps or (3 if tiny else 30)
    warmup = args.warmup or (2 if tiny else 5)
    psteps = args.profile_steps or (2 if tiny else 5)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("FASTFILM_BENCH_CPU_THREADS", "1")))
    small = benchlib.SMALL_MODEL_OVERRIDES if tiny else ()
    b64, b256 = (8, 32) if tiny else (64, 256)
    seq_len = 12 if tiny else benchlib.PAPER_QUESTION_LEN
    cases = [c for c in args.cases.split(",") if c]
    from workload import step_gflop

    ceiling, hbm, tf32 = ceilings(dtype, cases) if CUDA else (None, None, None)
    result: dict[str, Any] = {
        "device": benchlib.device_name(),
        "versions": benchlib.versions(),
        "config": "configs/clevr.json" + (" + bench small-model overrides" if tiny else ""),
        "dtype": args.dtype,
        "question_len": seq_len,
        "matmul_ceiling_tflop_per_s": ceiling,
        "copy_bandwidth_tb_per_s": hbm,
        "tf32_ceiling_tflop_per_s": tf32,
        "floor_figures": "this device's measured"
        if CUDA
        else "the H200's (a CPU shape-check of the floor, not this machine's)",
        "original_2017_step": ORIGINAL_H200,
        "note": "" if CUDA else "CPU: shape-check only; graph cases run uncaptured; times mean nothing",
        "cases": {},
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)

    state: dict[str, Any] = {}

    def engine_for(batch_size: int, kernels: str = "reference"):
        if (state.get("batch"), state.get("kernels")) != (batch_size, kernels):
            state.clear()
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
            cfg = benchlib.paper_config(small)
            engine = build(cfg, batch_size, dtype, kernels)
            state.update(batch=batch_size, kernels=kernels, cfg=cfg, engine=engine)
            state["batch_data"] = host_batch(cfg, batch_size, seq_len)
            state["gflop"] = step_gflop(cfg.model, state["batch_data"]["length"], seq_len)
        return state["cfg"], state["engine"], state["batch_data"], state["gflop"]

    t_start = time.perf_counter()
    step = None
    failed: list[str] = []
    for case in cases:
        t_case = time.perf_counter()
        if args.budget_s and t_case - t_start > args.budget_s:
            result["cases"][case] = {"error": f"skipped: past --budget-s {args.budget_s}"}
            print(f"{case}: skipped (past --budget-s)", flush=True)
            continue
        step = None  # the previous case's graphs and buffers go before this case's memory is measured
        gc.collect()
        try:
            if case == "check_graph":
                row = check_graph(dtype)
                result["cases"][case] = row
                print(f"{case}: {json.dumps(row)}", flush=True)
                save()
                continue
            bs = b256 if case.endswith("_b256") else b64
            kernels = "triton" if case in ("graph_cl_triton", "graph_cl_picked") else "reference"
            cfg, engine, batch, gflop = engine_for(bs, kernels)
            set_question_encoder(engine.module.generator, case)
            picks = None
            if case == "eager_nchw":
                step = engine_step(engine, batch)
            else:
                if not state.get("cl"):
                    to_channels_last(engine)
                    state["cl"] = True
                if case == "eager_cl":
                    step = engine_step(engine, batch)
                elif case == "static_eager_cl":
                    step = graphed_step(engine, batch, dtype, capture=False)
                elif case in (
                    "graph_cl", "graph_cl_gru_fp32", "graph_cl_gru_loop", "graph_cl_b256", "graph_cl_triton"
                ):  # fmt: skip
                    step = graphed_step(engine, batch, dtype, capture=CUDA)
                elif case == "graph_cl_picked":
                    from fastfilm import kernel_pick

                    picks = kernel_pick.pick(
                        engine.module, bs, ["triton"], dtype, graphed=CUDA,
                        say=lambda line: print(line, flush=True),
                        timing=None if CUDA else dict(warmup=0, reps=1, groups=1),  # CPU: a shape-check
                    )  # fmt: skip
                    step = graphed_step(engine, batch, dtype, capture=CUDA)
                elif case == "graph_cl_compile":
                    step = graphed_step(
                        engine, batch, dtype, capture=CUDA, compile_backend=args.compile_backend
                    )
                else:
                    raise ValueError(f"unknown case {case}")
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            row = {
                "batch": bs,
                "memory_format": "channels_first" if case == "eager_nchw" else "channels_last",
                "question_encoder": {
                    "graph_cl_gru_fp32": "nn.GRU outside autocast (float32)",
                    "graph_cl_gru_loop": "loop_gru (autocast-dtype products, float32 gates)",
                }.get(case, "nn.GRU under autocast"),
            }
            row.update(time_case(step, bs, warmup, steps, gflop, ceiling))
            try:
                floor = floor_ms(cfg, batch, case, dtype, ceiling, hbm, tf32)
                row["floor_ms"] = float(f"{floor:.4g}")
                row["floor_share"] = float(f"{floor / row['ms']:.3g}")
            except Exception as e:  # noqa: BLE001 (a model of the step: its failure must not cost the timing)
                row["floor_ms"] = row["floor_share"] = None
                row["floor_error"] = f"{type(e).__name__}: {e}"[:300]
            if picks is not None:
                row["kernel_picks"] = [p.line() for p in picks]
            row["captured"] = bool(getattr(getattr(step, "graphed", None), "capture", False))
            if getattr(step, "graphed", None) is not None:
                row["graphs_captured"] = step.graphed.captures
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None
            result["cases"][case] = row  # the timing is kept should the profiler below take the process down
            save()
            print(f"{case} (timed): {json.dumps(row)}", flush=True)
            row["host_syncs_per_step"] = host_syncs(step, psteps)
            row.update(profile(step, psteps))
            if CUDA and row.get("gpu_kernels_per_step"):
                row["gpu_busy_share"] = round(min(1.0, row["gpu_kernel_ms_per_step"] / row["ms"]), 4)
            elif CUDA:  # the profiler saw no kernels (inside graph replays, on some CUPTI versions)
                row["gpu_busy_share"] = None
            row["case_s"] = round(time.perf_counter() - t_case, 1)
            result["cases"][case] = row
            print(f"{case}: {json.dumps(row)}", flush=True)
        except Exception as e:  # one case's failure is reported, the others still run
            traceback.print_exc()
            partial = result["cases"].get(case) if result["cases"].get(case, {}).get("ms") else {}
            result["cases"][case] = {**partial, "error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{case}: FAILED {type(e).__name__}: {e}", flush=True)
            failed.append(case)
        save()
    text = table(result)
    print("\n" + text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    if failed:  # after every case and the files: gpu_run.sh's summary then shows this step as failed
        print(f"failed cases: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def table(result: dict[str, Any]) -> str:
    """The results as markdown: one row per case (measured in this run), the original code's step beside them."""
    v = result["versions"]
    lines = [
        "# GPU train step (bench/gpu_step.py)",
        "",
        f"{result['device']}; torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, triton "
        f"{v.get('triton')}; {result['config']}; {result['dtype']} autocast; questions padded to "
        f"{result['question_len']} tokens; matmul ceiling {result['matmul_ceiling_tflop_per_s']} TFLOP/s (bf16 "
        f"8192²), copy bandwidth {result.get('copy_bandwidth_tb_per_s')} TB/s and TF32 matmul ceiling "
        f"{result.get('tf32_ceiling_tflop_per_s')} TFLOP/s, measured in the same run. Every "
        "figure below was measured in this run but `floor_ms`, the step's predicted floor (bench/roofline.py) at "
        f"{result.get('floor_figures')} ceilings. " + (result["note"] or ""),
        "",
    ]
    cols = ("ms", "questions_per_s", "tflop_per_s", "ceiling_share", "floor_ms", "floor_share", "kernel_launches_per_step",
            "gpu_kernels_per_step", "gpu_busy_share", "aten_ops_per_step", "host_syncs_per_step",
            "peak_memory_gib")  # fmt: skip
    lines += [
        "| case | batch | captured | " + " | ".join(cols) + " |",
        "| --- |" + " ---: |" * (len(cols) + 2),
    ]
    for name, r in result["cases"].items():
        if "error" in r and "ms" not in r:
            lines.append(f"| {name} | failed: {r['error'][:150].replace('|', '/')} |")
        elif name == "check_graph":
            lines.append(f"| {name} | {json.dumps(r)} |")
        else:
            cells = " | ".join(str(r.get(c)) for c in cols)
            lines.append(f"| {name} | {r['batch']} | {r.get('captured')} | {cells} |")
    o = result["original_2017_step"]
    lines.append(
        f"| original 2017 code, {o['dtype']} ({o['source']}) | {o['batch']} | | {o['ms']} | "
        f"{o['batch'] / o['ms'] * 1e3:.0f} |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

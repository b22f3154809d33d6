"""Which CPU mode trains fastest: the trainer's own step (DeepSpeed engine, `fastfilm.train.train_step`) per
model, kernels mode and precision, with the first (compiling) call timed apart. Prints a table.

    python bench/cpu_modes.py                                   # synthetic + paper, all modes, fp32 + bf16
    python bench/cpu_modes.py --configs synthetic --steps 30 --threads 2 --json OUT.json

Cases (each in a fresh process, so a compilation, the thread count and memory never carry over):
- `reference`: `kernels: reference`, eager;
- `compile`: `kernels: compile` (the ResBlock's ops under torch.compile, the rest eager);
- `engine-compile`: `kernels: reference` and DeepSpeed's `engine.compile()` (the whole module under
  torch.compile; the packed GRU breaks the graph, question lengths vary between batches);
- dtype `fp32`, or `bf16` (DeepSpeed `bf16.enabled`, which the trainer runs as torch autocast);
- `--auto`: also asks `fastfilm.auto` (in a fresh process, as the trainer would at its start) which kernels mode
  and precision it ships for each config on this machine, and prints that choice's questions/s as a share of the
  fastest forced case in the same run;
- `--gru nn` runs `nn.GRU` instead of `fastfilm.gru` (the before of that change), `--adam loop` torch's
  per-parameter Adam loop instead of the trainer's fused Adam (the before of that change).

Batches: random images; question lengths drawn per batch (synthetic config: 5-19 tokens, the synthetic set's
range; paper config: 10-38, DESIGN.md §7), or from a prep cache's train split with `--cache`; 4 batches cycled,
padded to their longest, packed by the model. The paper model runs at `--paper-batch` (default 8).
Columns: first step (compilation included), median step after `--warmup` steps, questions/s, achieved GFLOP/s
(counted forward + backward, bench/workload.py) and its share of the machine's 2048² matmul GFLOP/s in the same
dtype, measured by this script on the same threads. Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CONFIGS = {"synthetic": "configs/synthetic.json", "paper": "configs/clevr.json"}
LENGTHS = {"synthetic": (5, 19), "paper": (10, 38)}
MODES = ("reference", "compile", "engine-compile")
DTYPES = ("fp32", "bf16")
VOCAB, ANSWERS = 93, 32


def _batches(cfg, name: str, n: int, cache: str | None, count: int = 4, seed: int = 0) -> list[dict]:
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    if cache:
        import workload

        pool = workload.lengths_of_cache(cache)
    else:
        lo, hi = LENGTHS[name]
        pool = np.arange(lo, hi + 1)
    out = []
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    for _ in range(count):
        lengths = torch.from_numpy(rng.choice(pool, n).astype(np.int64))
        t = int(lengths.max())
        q = torch.randint(4, VOCAB, (n, t), generator=g)
        q[:, 0] = 1
        for i, length in enumerate(lengths.tolist()):
            q[i, length - 1] = 2
            q[i, length:] = 0
        out.append(
            {
                "image": torch.rand(n, 3, s, s, generator=g),
                "question": q,
                "length": lengths,
                "answer": torch.randint(4, ANSWERS, (n,), generator=g),
            }
        )
    return out


def run_case(name: str, mode: str, dtype: str, args: argparse.Namespace) -> dict:
    """One case in this process: build the trainer's engine, time its steps."""
    import torch

    torch.set_num_threads(args.threads)
    import workload

    from fastfilm.config import load_config
    from fastfilm.model import FiLMGen
    from fastfilm.train import build_engine, setup_distributed, train_step

    if args.gru == "nn":  # before fastfilm.gru: nn.GRU on the packed questions
        FiLMGen.cpu_gru = False
    if (
        args.adam == "loop"
    ):  # before the trainer asked for torch's fused Adam on the CPU: the per-parameter loop

        class LoopAdam(torch.optim.Adam):
            def __init__(self, params, fused=None, **kw):
                super().__init__(params, fused=False, **kw)

        torch.optim.Adam = LoopAdam

    overrides = [f"kernels.mode={'compile' if mode == 'compile' else 'reference'}"]
    overrides.append(f"deepspeed.bf16.enabled={'true' if dtype == 'bf16' else 'false'}")
    if name == "paper":
        overrides.append(f"deepspeed.train_micro_batch_size_per_gpu={args.paper_batch}")
    cfg = load_config(os.path.join(ROOT, CONFIGS[name]), overrides)
    _, _, device = setup_distributed(cfg)
    vocab = {
        "question_token_to_idx": {str(i): i for i in range(VOCAB)},
        "answer_token_to_idx": {str(i): i for i in range(ANSWERS)},
    }
    torch.manual_seed(0)
    engine, optimizer, _ = build_engine(cfg, vocab, device)
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed may wrap the client optimizer
    fused = bool(getattr(inner, "defaults", {}).get("fused"))
    if fused != (args.adam == "trainer"):
        raise RuntimeError(f"--adam {args.adam}: the engine's optimizer has fused={fused}")
    engine.train()
    if mode == "engine-compile":
        engine.compile()
    n = cfg.batch_size
    batches = _batches(cfg, name, n, args.cache)
    gflop = statistics.mean(
        workload.step_gflop(cfg.model, b["length"], b["question"].shape[1]) for b in batches
    )

    def step(i: int) -> float:
        t0 = time.perf_counter()
        out = train_step(engine, batches[i % len(batches)], device)
        loss = float(out.loss)  # waits for the step
        if loss != loss:
            raise RuntimeError(f"{name} {mode} {dtype}: the loss is NaN")
        return time.perf_counter() - t0

    first = step(0)
    for i in range(1, 1 + args.warmup):
        step(i)
    times = [step(i) for i in range(args.steps)]
    med = statistics.median(times)
    return {
        "config": name,
        "mode": mode,
        "dtype": dtype,
        "gru": args.gru,
        "adam": args.adam,
        "optimizer": type(inner).__name__ + (" (fused)" if fused else ""),
        "batch": n,
        "threads": torch.get_num_threads(),
        "first_step_s": first,
        "median_step_s": med,
        "questions_per_s": n / med,
        "gflop_per_step": gflop,
        "gflop_per_s": gflop / med,
    }


def auto_choice(name: str) -> dict:
    """What the trainer's `auto` settings choose for config `name` on this machine (this process)."""
    import torch

    from fastfilm.auto import MODEL_COMPILE, decide
    from fastfilm.config import load_config

    cfg = load_config(os.path.join(ROOT, CONFIGS[name]))
    vocab = {
        "question_token_to_idx": {str(i): i for i in range(VOCAB)},
        "answer_token_to_idx": {str(i): i for i in range(ANSWERS)},
    }
    precision, kernels = decide(cfg, torch.device("cpu"), vocab)
    # the whole model compiled in graph mode's static step is not one of this script's cases (make train times it:
    # RESULTS_CPU_MODES.md); its line then says the case was not run
    mode = {"compile": "compile", MODEL_COMPILE: "model-compile"}.get(kernels.value, "reference")
    return {"config": name, "mode": mode, "dtype": precision.value, "why": [precision.line(), kernels.line()]}


def auto_lines(rows: list[dict], choices: list[dict]) -> list[str]:
    """One line per config: the auto choice's questions/s against the fastest forced case of the same run."""
    lines = []
    for ch in choices:
        if "error" in ch:
            lines.append(f"auto ({ch['config']}): failed: {ch['error']}")
            continue
        ok = [r for r in rows if r["config"] == ch["config"] and "error" not in r]
        mine = next((r for r in ok if (r["mode"], r["dtype"]) == (ch["mode"], ch["dtype"])), None)
        best = max(ok, key=lambda r: r["questions_per_s"], default=None)
        why = "; ".join(ch["why"])
        if mine is None or best is None:
            lines.append(f"auto ({ch['config']}): {ch['mode']} {ch['dtype']} ({why}); that case was not run")
            continue
        lines.append(
            f"auto ({ch['config']}): {ch['mode']} {ch['dtype']} — {mine['questions_per_s']:.1f} questions/s, "
            f"{mine['questions_per_s'] / best['questions_per_s']:.2f}× the fastest forced case "
            f"({best['mode']} {best['dtype']}, {best['questions_per_s']:.1f}) [{why}]"
        )
    return lines


def ceilings(threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    import workload

    return {d: workload.matmul_gflops(t) for d, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def table(rows: list[dict], ceil: dict[str, float]) -> str:
    lines = [
        "| config | mode | dtype | GRU | Adam | batch | first step | median step | questions/s "
        "| × reference fp32 | GFLOP/s | ÷ matmul |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {r["config"]: r for r in rows if r.get("mode") == "reference" and r.get("dtype") == "fp32"}
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['config']} | {r['mode']} | {r['dtype']} | | | | failed: {r['error']} | | | | | |"
            )
            continue
        b = base.get(r["config"])
        speed = f"{r['questions_per_s'] / b['questions_per_s']:.2f}×" if b else "—"
        c = ceil.get(r["dtype"])
        share = f"{r['gflop_per_s'] / c:.1%}" if c else "—"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['dtype']} | {r['gru']} | {r['adam']} | {r['batch']} "
            f"| {r['first_step_s']:.1f} s "
            f"| {r['median_step_s'] * 1e3:.1f} ms | {r['questions_per_s']:.1f} | {speed} "
            f"| {r['gflop_per_s']:.1f} | {share} |"
        )
    lines.append("")
    lines.append(
        "Machine matmul (2048², same threads): " + ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in ceil.items())
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="synthetic,paper", help="comma list of: synthetic, paper")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of: fp32, bf16")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--paper-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--cache", default=None, help="a prep cache: question lengths from its train split")
    p.add_argument(
        "--gru",
        choices=("fastfilm", "nn"),
        default="fastfilm",
        help="CPU GRU: fastfilm.gru or nn.GRU (before)",
    )
    p.add_argument(
        "--adam",
        choices=("trainer", "loop"),
        default="trainer",
        help="the trainer's Adam (torch's fused Adam), or torch's per-parameter loop (before)",
    )
    p.add_argument(
        "--auto",
        action="store_true",
        help="also report what kernels.mode/precision auto choose here, against the fastest forced case",
    )
    p.add_argument("--auto-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the rows and ceilings as JSON here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, allowed in (("configs", CONFIGS), ("modes", MODES), ("dtypes", DTYPES)):
        bad = [x for x in getattr(args, key).split(",") if x not in allowed]
        if bad:
            p.error(f"--{key}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print("CASE " + json.dumps(run_case(*args.one, args)), flush=True)
        return 0
    if args.auto_one:
        print("AUTO " + json.dumps(auto_choice(args.auto_one)), flush=True)
        return 0
    rows = []
    passthrough = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--paper-batch={args.paper_batch}",
        f"--threads={args.threads}",
        f"--gru={args.gru}",
        f"--adam={args.adam}",
    ] + ([f"--cache={args.cache}"] if args.cache else [])
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # triton is never timed here, but the kernels package imports it
    for name in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                cmd = [sys.executable, os.path.abspath(__file__), "--one", name, mode, dtype, *passthrough]
                try:
                    res = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT
                    )
                except subprocess.TimeoutExpired:
                    rows.append({"config": name, "mode": mode, "dtype": dtype, "error": "timeout"})
                    continue
                line = next((x for x in res.stdout.splitlines() if x.startswith("CASE ")), None)
                if res.returncode != 0 or line is None:
                    tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:120]
                    rows.append({"config": name, "mode": mode, "dtype": dtype, "error": tail})
                else:
                    rows.append(json.loads(line[5:]))
                print(f"done: {name} {mode} {dtype}", file=sys.stderr, flush=True)
    choices = []
    for name in args.configs.split(",") if args.auto else []:
        cmd = [sys.executable, os.path.abspath(__file__), "--auto-one", name]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        line = next((x for x in res.stdout.splitlines() if x.startswith("AUTO ")), None)
        if res.returncode != 0 or line is None:
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:120]
            choices.append({"config": name, "error": tail})
        else:
            choices.append(json.loads(line[5:]))
    ceil = ceilings(args.threads)
    text = "\n".join([table(rows, ceil), *auto_lines(rows, choices)])
    print(text)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {"rows": rows, "auto": choices, "matmul_gflop_per_s": ceil, "threads": args.threads},
                f,
                indent=1,
            )
        os.replace(tmp, args.json)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

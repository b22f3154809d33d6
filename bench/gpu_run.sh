#!/usr/bin/env bash
# One GPU run of everything that needs a GPU, on a networkless machine (H100, torch 2.11, triton 3.6,
# Python 3.12, no deepspeed, no DALI):
#   usage: bench/gpu_run.sh OUTDIR
# Steps (in this order; each one's log in OUTDIR/logs/STEP.log, its exit code in OUTDIR/summary.tsv):
#   env         nvidia-smi, versions, which packages import
#   install     deepspeed (+ its missing dependencies) from $WHEELS/ds/*.whl, any $WHEELS/extra/*.whl and the
#               repo's .whl/*.whl (`make gpu-wheels` makes that set on a machine with network access), and DALI
#               from the pieces $WHEELS/dali.tar.part-* (absent pieces: continue without DALI, say so), into
#               $SITE with `pip install --no-index --no-deps --target`, then PYTHONPATH=$SITE:repo
#   kernel_tests  pytest tests/kernels -n $XDIST --tb=short (compiled Triton; the AOT test, a CPU compile matrix,
#               left out): junit XML + the log; every kernel test, not only those marked cuda
#   gpu_step    bench/gpu_step.py: the train step per case (eager NCHW / channels_last, graph mode, batch 256,
#               compile), ms, questions/s, launches, GPU-busy share, peak memory -> gpu_step.json + .md
#   ops         pytest bench/test_ops.py -k "not compile and not fp32" (bf16, the GPU's precision): the fused ResBlock op (N = 64, 256, 512; NCHW and
#               channels_last; eager and inside a CUDA graph) and the stem's BatchNorm + ReLU, reference against
#               triton, side by side -> ops.json (what fastfilm.kernel_pick decides at a run's start, at the op level)
#   cuda_tests  pytest -m cuda tests/ (TRITON_INTERPRET unset: real Triton compilation)
#   bench       pytest bench/ --benchmark-json=OUTDIR/bench.json (the paper's sizes)
#   report      python bench/report.py OUTDIR/bench.json -o OUTDIR/RESULTS.md
#   data        a synthetic CLEVR-format set + uint8 cache at 224 px (in $WORK, not OUTDIR)
#   train_reference, train_compile, train_triton
#               `python -m fastfilm train` of configs/clevr.json (the paper's raw-pixel model), bf16,
#               $TRAIN_STEPS steps on the synthetic set (its questions are shorter than CLEVR's: 11 tokens on
#               average and at most 20 against 20.4 and 46, so its questions/s are not the paper step's; gpu_step
#               times that), then `fastfilm eval` of its last checkpoint (device,
#               precision, accuracy in eval.json); metrics/summary/eval copied to OUTDIR/train/MODE
#   profile     bench/profile_step.py: PyTorch profiler over a few train steps per kernels mode
#               (kernel launches per step, top kernels) into OUTDIR/profile
# A failing step does not stop the run. At the end: a summary table (also OUTDIR/summary.txt); exit 1 if any
# step failed. Environment knobs (defaults in brackets):
#   STEPS        the steps to run, space-separated ["env install kernel_tests gpu_step ops cuda_tests bench
#                report data train_reference train_compile train_triton profile": all of them, over 10 minutes]
#   WHEELS [.gpu in the repo]  SITE [/tmp/site]  WORK [/tmp/fastfilm-gpu-run]  PYTHON [python3]
#   TRAIN_STEPS [200]  BENCH_ARGS [""] (e.g. "--bench-quick" or "-k op")  PROFILE_STEPS [5]
#   SYNTH_TRAIN_IMAGES [400]  SYNTH_VAL_IMAGES [80] (10 questions each)  IMAGE_SIZE [224]
#   TRAIN_SET [""]  extra `--set SECTION.KEY=VALUE` overrides for training, space-separated (for dry runs)
#   GPU_STEP_BUDGET [200]  GPU_STEP_ARGS [""]  gpu_step.py's --budget-s and extra arguments ("--tiny" for a CPU
#                dry run)  XDIST [8]  kernel_tests' pytest processes
#   T_<STEP>     time limit of one step in seconds (e.g. T_bench=900); see the defaults below
# The device tool allows 10 minutes per command: if everything does not fit, run it in parts, each with a
# fresh OUTDIR, e.g.  STEPS="env install cuda_tests bench report" bench/gpu_run.sh $OUT
#              then  STEPS="install data train_reference train_compile train_triton profile" ...
# (install is quick the second time on a machine that is still warm: it keeps a stamp in $SITE).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/bench/gpu_run.sh"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.gpu}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fastfilm-gpu-run}
TRAIN_STEPS=${TRAIN_STEPS:-200}
BENCH_ARGS=${BENCH_ARGS:-}
PROFILE_STEPS=${PROFILE_STEPS:-5}
SYNTH_TRAIN_IMAGES=${SYNTH_TRAIN_IMAGES:-400}
SYNTH_VAL_IMAGES=${SYNTH_VAL_IMAGES:-80}
IMAGE_SIZE=${IMAGE_SIZE:-224}
TRAIN_SET=${TRAIN_SET:-}
STEPS=${STEPS:-"env install kernel_tests gpu_step ops cuda_tests bench report data train_reference train_compile train_triton profile"}
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$REPO" || exit 2

# --------------------------------------------------------------------------------------------- the steps
step_env() {
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    echo "nproc: $(nproc)"; free -g 2>/dev/null | head -2; df -h /tmp "$REPO" 2>/dev/null
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ["torch", "triton", "deepspeed", "nvidia.dali", "numpy", "PIL", "safetensors", "tqdm",
             "tensorboard", "pytest", "pytest_benchmark", "cpuinfo", "hypothesis", "pydantic", "hjson"]:
    try:
        m = importlib.import_module(name)
        print(f"  {name:18s} {getattr(m, '__version__', '(no __version__)')}  {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"  {name:18s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available:", torch.cuda.is_available(), "| device:",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "| torch.version.cuda:", torch.version.cuda, "| cudnn:", torch.backends.cudnn.version())
EOF
    "$PY" -m pip list 2>/dev/null | head -200
}

has() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }

step_install() {
    # One pip call for everything (two `pip install --target` calls would replace each other's bin/).
    local stamp="$SITE/.fastfilm-gpu-run-installed" rc=0 whl check
    local wheels=() dali=() parts=()
    mkdir -p "$SITE" "$WORK"
    if [ -f "$stamp" ]; then
        echo "already installed in $SITE (stamp $stamp):"; cat "$stamp"
    else
        if has deepspeed; then
            echo "deepspeed already present: not installing it"
        else
            for whl in "$WHEELS"/ds/*.whl "$WHEELS"/extra/*.whl "$REPO"/.whl/*.whl; do [ -e "$whl" ] && wheels+=("$whl"); done
            [ ${#wheels[@]} -gt 0 ] || { note "NO deepspeed wheels in $WHEELS/ds or $REPO/.whl (make gpu-wheels)"; rc=1; }
        fi
        if has nvidia.dali; then
            echo "DALI already present: not installing it"
        else
            for whl in "$WHEELS"/dali.tar.part-*; do [ -e "$whl" ] && parts+=("$whl"); done
            rm -rf "$WORK/dali"
            if [ ${#parts[@]} -eq 0 ]; then
                note "DALI pieces ($WHEELS/dali.tar.part-*) ABSENT: continuing without DALI"
            elif cat "${parts[@]}" | tar x -C "$WORK"; then
                for whl in "$WORK"/dali/*.whl; do [ -e "$whl" ] && dali+=("$whl"); done
                echo "DALI: ${#parts[@]} pieces, ${#dali[@]} wheels"
            else
                note "DALI pieces (${#parts[@]}) do not form a whole tar (a piece missing?): continuing without DALI"
                rc=1
            fi
        fi
        if [ $((${#wheels[@]} + ${#dali[@]})) -gt 0 ]; then
            echo "installing into $SITE: ${wheels[*]##*/} ${dali[*]##*/}"
            if ! "$PY" -m pip install --no-index --no-deps --target "$SITE" "${wheels[@]}" "${dali[@]}"; then
                rc=1
                if [ ${#dali[@]} -gt 0 ] && [ ${#wheels[@]} -gt 0 ]; then
                    note "pip failed with the DALI wheels: retrying without them"
                    "$PY" -m pip install --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}"
                fi
            fi
        fi
        rm -rf "$WORK/dali"
    fi
    check=$("$PY" - 2>&1 <<'EOF'
import importlib
for name in ["deepspeed", "nvidia.dali", "pytest_benchmark"]:
    try:
        m = importlib.import_module(name)
        print(f"OK {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"MISSING {name}: {type(e).__name__}: {e}")
EOF
)
    echo "$check"
    grep -q "^MISSING nvidia.dali" <<<"$check" \
        && note "DALI is NOT installed: loader benchmarks and training depend on fastfilm.data's non-DALI path"
    grep -q "^MISSING pytest_benchmark" <<<"$check" \
        && note "pytest-benchmark is NOT installed: the bench step cannot run (put its wheel and py-cpuinfo's in \$WHEELS/extra)"
    if grep -q "^MISSING deepspeed" <<<"$check"; then
        note "deepspeed is NOT importable: training cannot run"; rc=1
    elif [ $rc -eq 0 ] && [ ! -f "$stamp" ]; then
        ls "$SITE" >"$stamp"
    fi
    return $rc
}

step_kernel_tests() {
    # -v: a line per test as it ends, so a run cut off by its time limit still says what passed and failed
    "$PY" -m pytest tests/kernels -n "${XDIST:-8}" --tb=short -v -p no:cacheprovider -rfE \
        --ignore tests/kernels/test_aot.py --junitxml="$OUT/kernel_tests.xml"
}

step_gpu_step() {
    # shellcheck disable=SC2086  # GPU_STEP_ARGS is a list of arguments (a CPU dry run: "--tiny")
    "$PY" bench/gpu_step.py --out "$OUT/gpu_step.json" --md "$OUT/gpu_step.md" --budget-s "${GPU_STEP_BUDGET:-200}" \
        ${GPU_STEP_ARGS:-}
}

step_ops() {
    "$PY" -m pytest bench/test_ops.py -k "not compile and not fp32" -q -p no:cacheprovider --benchmark-json="$OUT/ops.json" \
        --benchmark-columns=min,median,rounds,iterations
}

step_cuda_tests() {
    "$PY" -m pytest -m cuda tests/ -ra -q -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
    local rc=$?
    [ $rc -eq 5 ] && echo "pytest: no test is marked cuda (exit 5)"
    return $rc
}

step_bench() {
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of pytest arguments
    "$PY" -m pytest bench/ -ra -v -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
        --benchmark-columns=min,mean,median,stddev,rounds,iterations $BENCH_ARGS
}

step_report() {
    if [ ! -f "$OUT/bench.json" ]; then echo "no $OUT/bench.json (bench step not run or failed)"; return 1; fi
    "$PY" bench/report.py "$OUT/bench.json" -o "$OUT/RESULTS.md" && cat "$OUT/RESULTS.md"
}

step_data() {
    local d="$WORK/data" want="$SYNTH_TRAIN_IMAGES $SYNTH_VAL_IMAGES $IMAGE_SIZE"
    if [ "$(cat "$d/cache/.complete" 2>/dev/null)" = "$want" ]; then echo "data already in $d"; return 0; fi
    rm -rf "$d"
    "$PY" -m fastfilm synth --out "$d/clevr" --train-images "$SYNTH_TRAIN_IMAGES" \
        --val-images "$SYNTH_VAL_IMAGES" --test-images 2 --questions-per-image 10 --seed 0 || return $?
    "$PY" -m fastfilm prep --clevr "$d/clevr" --out "$d/cache" --image-size "$IMAGE_SIZE" --splits train,val \
        || return $?
    echo "$want" >"$d/cache/.complete"
    du -sh "$d/clevr" "$d/cache"
}

train_mode() {
    local mode=$1 run="$WORK/runs/$1" dest="$OUT/train/$1" rc kv
    local extra=()
    for kv in $TRAIN_SET; do extra+=(--set "$kv"); done
    [ -f "$WORK/data/cache/.complete" ] || { echo "no data (run the data step first)"; step_data || return $?; }
    rm -rf "$run"
    mkdir -p "$dest"
    "$PY" -m fastfilm train --config configs/clevr.json --kernels "$mode" \
        --set data.root="$WORK/data/clevr" --set data.cache="$WORK/data/cache" \
        --set train.run_dir="$run" --set train.max_steps="$TRAIN_STEPS" --set train.eval_every="$TRAIN_STEPS" \
        --set train.log_every=20 --set train.patience=0 --set train.progress=false \
        --set train.tensorboard=false --set deepspeed.bf16.enabled=true "${extra[@]}"
    rc=$?
    for f in config.json metrics.jsonl summary.json; do [ -f "$run/$f" ] && cp "$run/$f" "$dest/"; done
    if [ $rc -eq 0 ]; then  # `fastfilm eval` of the last checkpoint: the standalone evaluation on this GPU
        "$PY" -m fastfilm eval --checkpoint "$run" --tag last --split val --kernels "$mode" --json "$dest/eval.json"
        rc=$?
    fi
    rm -rf "$run/checkpoints"  # ~0.7 GB per tag for the paper's model: never into OUTDIR
    return $rc
}
step_train_reference() { train_mode reference; }
step_train_compile() { train_mode compile; }
step_train_triton() { train_mode triton; }

step_profile() {
    "$PY" bench/profile_step.py --out "$OUT/profile" --modes reference,compile,triton --dtype bf16 \
        --steps "$PROFILE_STEPS" --warmup 5
}

note() { echo "$*" | tee -a "$OUT/NOTES.txt"; }

# A step runs as a child of this script (`gpu_run.sh __step NAME`) so that `timeout` can limit it.
if [ "${1:-}" = "__step" ]; then
    OUT=${GPU_RUN_OUT:?}
    "step_$2"
    exit $?
fi

# ------------------------------------------------------------------------------------------------ driver
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_run.sh OUTDIR   (environment knobs: see the header of this script)" >&2
    exit 2
fi
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
export GPU_RUN_OUT="$OUT"
export PY WHEELS SITE WORK TRAIN_STEPS BENCH_ARGS PROFILE_STEPS SYNTH_TRAIN_IMAGES SYNTH_VAL_IMAGES IMAGE_SIZE \
    TRAIN_SET
SUMMARY="$OUT/summary.tsv"
printf 'step\texit\tseconds\tlog\n' >"$SUMMARY"
: >"$OUT/NOTES.txt"

declare -A LIMIT=([env]=120 [install]=300 [kernel_tests]=600 [gpu_step]=300 [ops]=300 [cuda_tests]=600 [bench]=1200 [report]=60 [data]=300
                  [train_reference]=400 [train_compile]=600 [train_triton]=400 [profile]=600)
failed=0
for s in $STEPS; do
    if ! declare -F "step_$s" >/dev/null; then
        note "unknown step '$s' (skipped)"
        printf '%s\t%s\t%s\t%s\n' "$s" "unknown" 0 "-" >>"$SUMMARY"
        failed=1
        continue
    fi
    var="T_$s"
    limit=${!var:-${LIMIT[$s]:-600}}
    log="$OUT/logs/$s.log"
    echo "[gpu_run] $(date -u +%H:%M:%S) $s (limit ${limit}s) -> logs/$s.log"
    t0=$(date +%s)
    timeout --kill-after=30 "$limit" bash "$SELF" __step "$s" >"$log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    [ $rc -eq 124 ] && echo "[gpu_run] $s: TIMED OUT after ${limit}s" | tee -a "$log"
    [ $rc -ne 0 ] && failed=1
    printf '%s\t%s\t%s\t%s\n' "$s" "$rc" "$dt" "logs/$s.log" >>"$SUMMARY"
    echo "[gpu_run] $s: exit $rc in ${dt}s"
    [ $rc -ne 0 ] && tail -n 15 "$log" | sed 's/^/    | /'
done

# Training: one line per mode from its metrics (questions/s averaged over the logged intervals after the first).
"$PY" - "$OUT" >"$OUT/train_summary.md" 2>>"$OUT/logs/summary.log" <<'EOF'
import json, os, sys
out = sys.argv[1]
root = os.path.join(out, "train")
if os.path.isdir(root):
    print("| kernels | steps | stop reason | last train loss | questions/s (mean of logged, first dropped) | val acc "
          "| fastfilm eval (device, precision) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for mode in sorted(os.listdir(root)):
        d = os.path.join(root, mode)
        rows = []
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if x.strip()]
        summ = json.load(open(os.path.join(d, "summary.json"))) if os.path.exists(os.path.join(d, "summary.json")) else {}
        qps = [r["train/questions_per_s"] for r in rows if "train/questions_per_s" in r][1:]
        loss = [r["train/loss"] for r in rows if "train/loss" in r]
        acc = [r["val/acc"] for r in rows if "val/acc" in r]
        ev = json.load(open(os.path.join(d, "eval.json"))) if os.path.exists(os.path.join(d, "eval.json")) else {}
        evs = f"{ev['accuracy']:.4f} ({ev.get('device')}, {ev.get('precision')})" if "accuracy" in ev else "-"
        print(f"| {mode} | {summ.get('step', '?')} | {summ.get('reason', 'no summary (failed?)')} "
              f"| {loss[-1] if loss else float('nan'):.4f} | {sum(qps) / len(qps) if qps else float('nan'):,.0f} "
              f"| {acc[-1] if acc else float('nan'):.4f} | {evs} |")
EOF

{
    echo "gpu_run summary ($(date -u)), OUTDIR=$OUT"
    column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
    if [ -s "$OUT/NOTES.txt" ]; then echo; echo "notes:"; sed 's/^/  /' "$OUT/NOTES.txt"; fi
    if [ -s "$OUT/train_summary.md" ]; then echo; echo "training (bf16, synthetic data):"; cat "$OUT/train_summary.md"; fi
    [ -f "$OUT/profile/profile_summary.md" ] && { echo; sed -n '1,12p' "$OUT/profile/profile_summary.md"; }
} | tee "$OUT/summary.txt"
# One archive of everything (a GPU machine may hand back only a few files): ARCHIVE=path to write it.
if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "archive: $ARCHIVE"; fi
exit $failed

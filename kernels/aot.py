"""Compile every Triton launch of the kernels ahead of time, for GPUs this machine need not have (sm_90, sm_80).

    python -m kernels.aot                          # paper sizes, sm_90 + sm_80: the table in kernels/README.md
    python -m kernels.aot --sizes all --rows       # paper + edge sizes, one row per compiled variant
    python -m kernels.aot --sizes all --json F --check    # the full matrix; exit status 1 on any failure
    python -m kernels.aot --sizes all --write-manifest kernels/aot_manifest.json   # after changing a kernel
    python -m kernels.aot --sizes all --manifest kernels/aot_manifest.json --json F   # what make test runs

How. The real launchers (`_forward`/`_backward` in bn_film_relu.py, `_conv1x1_forward`/`_conv1x1_backward` in
conv_coords.py) are called on meta tensors (shapes, strides, dtypes and storage offsets, no memory) while
`JITFunction.run` and `Autotuner.run` are replaced by recorders: every launch they would make, once per autotune
config, is captured without running (grid, constexprs, warps, stages, arguments). Triton's own binder for the
target (`create_function_from_signature`) turns the arguments into the signature and the specialisations a real
launch gets (i32/i64, divisibility by 16, == 1); launches with the same compile key (function, signature,
specialisations, constexprs, options) are compiled once, in parallel, with `triton.compile(ASTSource(...))` and
the ptxas of the triton wheel, whose `-v` report gives registers and spills. The Triton cache is a fresh
temporary directory, so that every variant really goes through ptxas.

The manifest. The full matrix is ~950 variants, 6.9 minutes on 2 cores of an AVX2-only EPYC: too much for every
`make test`. `kernels/aot_manifest.json` holds each variant's result from the last full run,
named by a hash of its compile key, its kernel's source (with the jit functions it calls) and the triton version.
make test compiles only what the manifest lacks (a changed kernel's variants: tests/kernels/test_aot.py then
fails until the manifest is written again) and a sample of 48 it has, which must compile exactly as recorded.

Predicted time, never measured: the bytes of the tensors a launch reads or writes (each tensor once; a pointer
the compiled kernel never uses does not count) ÷ the GPU's HBM bandwidth. It is a lower bound: a launch cannot
finish faster unless its data sits in L2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ARCHS = {90: "H100 SXM", 80: "A100"}
HBM_BYTES_PER_S = {90: 3.35e12, 80: 2.0e12}
SHARED_LIMIT = {90: 232_448, 80: 166_912}  # bytes of shared memory one block may use (opt-in maximum)
GRID_LIMIT = (2**31 - 1, 65_535, 65_535)

# The model's sizes: batch 64, 128 feature maps of 14×14, the classifier's 128 → 512 projection.
PAPER = {"n": 64, "c": 128, "h": 14, "w": 14, "proj": 512}
# (label, N, C, H, W): one sample, 2×2 maps, one channel, and a batch beyond CUDA's 65,535 grid rows.
EDGES = [("batch 1", 1, 128, 14, 14), ("2x2", 64, 128, 2, 2), ("1 channel", 64, 1, 14, 14), ("batch 70000", 70_000, 128, 14, 14)]  # fmt: skip
# (label, N, C, H, W) of the paper model's BatchNorm + ReLU (model.BatchNormReLU, kernels=triton): the stem's
# 128 maps after each stride-2 conv of a 224 px image (its last, 14², is the ResBlocks' size), the classifier's 512.
BN_RELU_SIZES = [
    ("stem 112", 64, 128, 112, 112), ("stem 56", 64, 128, 56, 56), ("stem 28", 64, 128, 28, 28),
    ("classifier bn", 64, 512, 14, 14),
]  # fmt: skip
PRECISIONS = (
    "tf32",
    "ieee",
    "bf16",
    "fp64",
)  # float32 with TF32 allowed, float32 IEEE, bf16 autocast, float64
LAYOUTS = ("nchw", "nhwc")
BN_MODES = ("train", "eval", "no_bn")


@dataclass
class Launch:
    """One kernel launch as a launcher would make it (one autotune config), recorded, not run."""

    case: str
    kernel: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple[int, int, int]
    tensors: dict[str, object] = field(default_factory=dict)  # pointer parameter name → meta tensor

    @property
    def config(self) -> str:
        kw = self.kwargs
        blocks = "x".join(
            str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_P") if k in kw
        )
        return f"{blocks} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


# ----------------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(case: str, out: list[Launch]) -> Iterator[None]:
    """Within the block, kernel launches are appended to `out` instead of running (autotuners: every config)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        names = list(self.signature.parameters)
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        g = tuple(grid(bound) if callable(grid) else grid) + (1, 1)
        tensors = {k: v for k, v in bound.items() if hasattr(v, "data_ptr")}
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        out.append(Launch(case, name, self, args, dict(kwargs), tuple(int(x) for x in g[:3]), tensors))

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))  # as Autotuner.run does
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _meta(shape, dtype, layout: str = "nchw"):
    import torch

    fmt = torch.channels_last if layout == "nhwc" and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def record_bn(
    n: int, c: int, h: int, w: int, dtype, layout: str, mode: str, residual: bool, case: str, out,
    one_launch: bool | None = None,
):  # fmt: skip
    """The launches of one bn_film_relu forward + backward, γ and β sliced from a generator output as the model does;
    one_launch forces the training path (True: the one-launch kernels, False: the split ones; None: the rule's)."""
    import torch

    bn = importlib.import_module("kernels.bn_film_relu")
    common = importlib.import_module("kernels._common")
    z, dout = _meta((n, c, h, w), dtype, layout), _meta((n, c, h, w), dtype, layout)
    film = _meta((n, 4, 2 * c), dtype)  # FiLMGen's output [N, blocks, 2C]: block 1's γ, then β
    gamma, beta = film[:, 1, :c], film[:, 1, c:]
    res = _meta((n, c, h, w), dtype, layout) if residual else None
    mode_id = {"train": bn.MODE_BATCH_STATS, "eval": bn.MODE_RUNNING_STATS, "no_bn": bn.MODE_NO_NORM}[mode]
    rm = rv = None if mode == "no_bn" else _meta((c,), torch.float32)
    saved, common.BN_ONE_LAUNCH = common.BN_ONE_LAUNCH, one_launch
    try:
        with recording(case, out):
            _, mean, rstd = bn._forward(z, gamma, beta, res, rm, rv, mode_id, 0.1, 1e-5)
            bn._backward(dout, z, gamma, beta, mean, rstd, mode_id)
    finally:
        common.BN_ONE_LAUNCH = saved


def record_bn_relu(n: int, c: int, h: int, w: int, dtype, layout: str, mode: str, case: str, out) -> None:
    """The launches of the model's BatchNormReLU (stem, classifier) forward + backward: γ, β its float32 weight
    and bias broadcast over the batch (stride 0), no residual; training takes the rule's path."""
    import torch

    bn = importlib.import_module("kernels.bn_film_relu")
    z, dout = _meta((n, c, h, w), dtype, layout), _meta((n, c, h, w), dtype, layout)
    gamma, beta = _meta((c,), torch.float32).expand(n, c), _meta((c,), torch.float32).expand(n, c)
    rm = rv = _meta((c,), torch.float32)
    mode_id = {"train": bn.MODE_BATCH_STATS, "eval": bn.MODE_RUNNING_STATS}[mode]
    with recording(case, out):
        _, mean, rstd = bn._forward(z, gamma, beta, None, rm, rv, mode_id, 0.1, 1e-5)
        bn._backward(dout, z, gamma, beta, mean, rstd, mode_id)


def record_conv(
    n: int, c_in: int, c_out: int, h: int, w: int, precision: str, layout: str, relu: bool, case, out
):
    """The launches of one 1×1 coordinate conv forward + backward (dx and dW): bf16 = autocast (weights float32),
    fp64 = float64 throughout (gradcheck's dtype; a float64 accumulator needs tl.dot's out_dtype on triton 3.6)."""
    import torch

    cc = importlib.import_module("kernels.conv_coords")
    compute = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(precision, torch.float32)
    param_dtype = torch.float64 if precision == "fp64" else torch.float32
    x = _meta((n, c_in, h, w), compute, layout)
    weight, bias = _meta((c_out, c_in + 2, 1, 1), param_dtype), _meta((c_out,), param_dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with recording(case, out):
            y = cc._conv1x1_forward(x, weight, bias, relu, compute)
            cc._conv1x1_backward(_meta(tuple(y.shape), compute, layout), y, x, weight, relu, True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def record_all(sizes: str) -> list[Launch]:
    """Every launch of the matrix: paper sizes (and, for sizes='all', the edge sizes), all modes and layouts."""
    # Launches that differ only in sizes share a binary when Triton specialises them alike; compile_matrix
    # compiles each distinct one once.
    import torch

    shapes = [("paper", PAPER["n"], PAPER["c"], PAPER["h"], PAPER["w"])]
    if sizes == "all":
        shapes += EDGES
    out: list[Launch] = []
    for label, n, c, h, w in shapes:
        for layout in LAYOUTS if c > 1 else LAYOUTS[:1]:  # one channel: channels_last is NCHW in memory
            # float64 (gradcheck's dtype, not a speed path) at the paper's sizes only: its edge-size variants
            # would add ~150 binaries to every `make test` for what the paper sizes already show
            dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
            dtypes += [("fp64", torch.float64)] if label == "paper" else []
            for dt_name, dtype in dtypes:
                for mode in BN_MODES:
                    # training: both paths at every size ("train" split, "train one-launch"), whichever the
                    # launchers' rule (bn_film_relu._one_launch) picks there
                    for one_launch in (False, True) if mode == "train" else (None,):
                        for res in (True, False):
                            path = " one-launch" if one_launch else ""
                            case = f"{label} {dt_name} {layout} {mode}{path}{'' if res else ' nores'}"
                            record_bn(n, c, h, w, dtype, layout, mode, res, case, out, one_launch)
            for precision in PRECISIONS if label == "paper" else [p for p in PRECISIONS if p != "fp64"]:
                for what, c_out, relu in (
                    ("resblock", c, True),
                    ("classifier", PAPER["proj"] * c // 128, False),
                ):
                    case = f"{label} {precision} {layout} {what}"
                    record_conv(n, c, c_out, h, w, precision, layout, relu, case, out)
    for label, n, c, h, w in BN_RELU_SIZES:  # the paper model's stem and classifier BatchNorm + ReLU
        for layout in LAYOUTS:
            for dt_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                for mode in ("train", "eval"):
                    record_bn_relu(n, c, h, w, dtype, layout, mode, f"{label} {dt_name} {layout} {mode}", out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------------


def _options_kwargs(fn, kwargs: dict) -> dict:
    """The keyword arguments JITFunction.run passes to the binder (debug and instrumentation settings added)."""
    from triton import knobs

    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # knobs of newer tritons (3.9, not 3.6)
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    return kw


_BINDERS: dict = {}


def compile_job(launch: Launch, arch: int) -> tuple[str, tuple]:
    """(compile key, job) of a launch on an arch: what Triton's binder and _pack_args make of its arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    if (id(fn), arch) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[id(fn), arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[id(fn), arch]
    kw = _options_kwargs(fn, launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    module, name = fn.fn.__module__, fn.fn.__qualname__
    key = repr((module, name, arch, signature, sorted(constexprs.items()), sorted(attrs.items()), options))
    return key, (module, name, arch, signature, constexprs, attrs, options.__dict__)


def _ptxas_number(pattern: str, log: str) -> int:
    m = re.search(pattern, log)
    return int(m.group(1)) if m else 0


_WGMMA = re.compile(r"ttng\.warp_group_dot (%[\w#]+), (%[\w#]+),[^\n]*isAsync = true")
_LOCAL_LOAD = re.compile(r"ttg\.local_load (%[\w#]+)")


def async_mma_operands_read_elsewhere(ttgir: str) -> list[str]:
    """Shared-memory tiles that are an operand of an asynchronous wgmma AND read into registers (ttg.local_load).

    The sm_90 pipeliner sizes such a tile's buffer as if only the register read used it, so the prefetch two
    iterations ahead overwrites the slot while the MMA still reads it (seen: `_backward_dw_kernel` without ReLU,
    its G tile also summed into the coordinate and bias columns, dW 8% off on an H200; triton issue #6691's
    pattern). A kernel must feed such a tile to products only, or run with num_stages=1.
    """
    operands = {name for m in _WGMMA.finditer(ttgir) for name in m.groups()}
    return sorted(operands & set(_LOCAL_LOAD.findall(ttgir)))


def run_job(job: tuple) -> dict:
    """Compile one variant for its arch (in a worker process); ptxas' report and the metadata as a dict."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, name, arch, signature, constexprs, attrs, options = job
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # autotuner / heuristics wrappers around the kernel
        fn = fn.fn
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
    except Exception as e:  # a compile error is a result here: the report and the test say which variant
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"ok": False, "error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]}
    text, md = log.getvalue(), kernel.metadata
    ttir = kernel.asm["ttir"]
    header, _, body = ttir.partition("attributes {noinline")
    params = re.findall(r"%(\w+): !tt\.ptr", header)
    ptx = kernel.asm["ptx"]
    return {
        "mma_operands_read": async_mma_operands_read_elsewhere(kernel.asm["ttgir"]),
        "ok": True,
        "error": "",
        "registers": _ptxas_number(r"Used (\d+) registers", text),
        "spill_stores": _ptxas_number(r"(\d+) bytes spill stores", text),
        "spill_loads": _ptxas_number(r"(\d+) bytes spill loads", text),
        "stack": _ptxas_number(r"(\d+) bytes stack frame", text),
        "shared": md.shared,
        "scratch": md.global_scratch_size + md.profile_scratch_size,
        "warps": md.num_warps,
        "stages": md.num_stages,
        "tensor_cores": "wgmma"
        if "wgmma.mma_async" in ptx
        else ("mma" if re.search(r"\bmma\.sync", ptx) else "-"),
        "used_pointers": [p for p in params if re.search(rf"%{p}\b", body)],
    }


def _run_keyed(item: tuple[str, tuple]) -> tuple[str, dict]:
    return item[0], run_job(item[1])


def _nbytes(t) -> int:
    """Bytes a tensor spans in memory (a broadcast dimension counts once)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


def launch_bytes(launch: Launch, used: list[str]) -> int:
    """Bytes of the distinct tensors the compiled kernel reads or writes (each once): the launch's minimum traffic."""
    seen, total = set(), 0
    for name in used:
        t = launch.tensors.get(name)
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
    return total


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when it is fine)."""
    out = []
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    # float64 (gradcheck's dtype) is no speed path: a few bytes of spill there are not a problem (seen: 4–36 B in
    # the BN reductions on sm_80/sm_90, at any tile size); compile errors and the rest still are
    if (row["spill_stores"] or row["spill_loads"] or row["stack"]) and " fp64 " not in row.get("case", ""):
        out.append(
            f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads, stack {row['stack']} B"
        )
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[row['arch']]} B")
    if row["scratch"]:
        out.append(f"global scratch {row['scratch']} B")
    if row.get("mma_operands_read"):
        out.append(f"shared tiles {row['mma_operands_read']} are async-MMA operands and read into registers")
    if any(g > lim for g, lim in zip(row["grid"], GRID_LIMIT)):
        out.append(f"grid {tuple(row['grid'])} over CUDA's limits {GRID_LIMIT}")
    return out


def variant_id(launch: Launch, key: str) -> str:
    """A compiled variant's name in a manifest: its compile key, the kernel's source (with the @triton.jit
    functions it calls: JITFunction.cache_key) and the triton version; any change to one is a new variant."""
    import hashlib

    import triton

    fn = launch.fn
    while not hasattr(fn, "cache_key"):  # autotuner / heuristics wrappers
        fn = fn.fn
    key = key.replace(os.path.dirname(triton.__file__), "<triton>")  # libdevice's path: where the venv is
    return hashlib.sha256(f"{key}|{fn.cache_key}|{triton.__version__}".encode()).hexdigest()[:20]


def sample_of(ids: dict[str, tuple[str, int]], k: int) -> set[str]:
    """k variants to compile afresh from a manifest: the first of each (kernel, arch) by hash, then the lowest
    hashes (the same set on every run of one source; a changed kernel draws new ones)."""
    chosen = {}
    for vid in sorted(ids):
        chosen.setdefault(ids[vid], vid)
    picked = set(chosen.values())
    for vid in sorted(ids):
        if len(picked) >= k:
            break
        picked.add(vid)
    return picked


def compile_matrix(
    launches: list[Launch], archs: list[int], jobs: int, log: Callable[[str], None],
    manifest: dict | None = None, sample: int = 0,
) -> list[dict]:  # fmt: skip
    """Compile every distinct variant once (in `jobs` processes); one result row per (launch, arch).

    With a manifest (variant id → an earlier full run's result, `--write-manifest`), only the variants it lacks
    and a sample of `sample` it has are compiled; each row says where its result came from ("source": compiled,
    sampled or manifest), and a sampled variant that compiles differently from its manifest entry is a problem."""
    keys, distinct, ids = [], {}, {}
    for launch in launches:
        for arch in archs:
            key, job = compile_job(launch, arch)
            keys.append((launch, arch, key))
            distinct.setdefault(key, job)
            ids.setdefault(key, variant_id(launch, key))
    known = {} if manifest is None else manifest["variants"]
    sampled = sample_of(
        {ids[k]: (distinct[k][1], distinct[k][2]) for k in distinct if ids[k] in known}, sample
    )
    todo = [k for k in distinct if ids[k] not in known or ids[k] in sampled]
    log(
        f"{len(launches) * len(archs)} launches x archs, {len(distinct)} distinct variants, {len(todo)} to compile"
        + (f" ({len(todo) - len(sampled)} not in the manifest, {len(sampled)} sampled)" if manifest else "")
    )
    results = _compile_all({k: distinct[k] for k in todo}, jobs, log)
    return [_row(launch, arch, key, ids[key], results, known) for launch, arch, key in keys]


def _compile_all(jobs_by_key: dict[str, tuple], jobs: int, log: Callable[[str], None]) -> dict[str, dict]:
    """run_job for each variant in a pool of `jobs` spawned processes, the GEMMs first (they take longest)."""
    import multiprocessing

    order = sorted(jobs_by_key, key=lambda k: "conv_coords" not in k)
    results = {}
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        work = [(k, jobs_by_key[k]) for k in order]
        for i, (key, result) in enumerate(pool.imap_unordered(_run_keyed, work)):
            results[key] = result
            if (i + 1) % 100 == 0:
                log(f"  {i + 1}/{len(order)} compiled")
    return results


def _row(launch: Launch, arch: int, key: str, vid: str, results: dict, known: dict) -> dict:
    """One (launch, arch) result: the fresh compile's or the manifest's, its bytes, predicted time and problems."""
    if key in results:
        r, source = dict(results[key]), "sampled" if vid in known else "compiled"
    else:
        r, source = dict(known[vid]), "manifest"
    nbytes = launch_bytes(launch, r.get("used_pointers", []))
    r.update(
        case=launch.case, kernel=launch.kernel, config=launch.config, arch=arch, grid=list(launch.grid),
        bytes=nbytes, predicted_us=nbytes / HBM_BYTES_PER_S[arch] * 1e6, variant=key_hash(key), id=vid,
        source=source,
    )  # fmt: skip
    r["problems"] = problems(r)
    if source == "sampled":
        r["problems"] += manifest_mismatch(known[vid], results[key])
    return r


def manifest_mismatch(expected: dict, got: dict) -> list[str]:
    """How a fresh compile differs from the manifest's entry for the same variant (empty when it is the same)."""
    diff = [
        f"{k}: manifest {expected.get(k)!r}, compiled {got.get(k)!r}"
        for k in got
        if expected.get(k) != got[k]
    ]
    return [f"differs from the manifest ({'; '.join(diff)})"] if diff else []


# What run_job reports about a variant: a manifest keeps these per variant id.
RESULT_KEYS = (
    "ok", "error", "registers", "spill_stores", "spill_loads", "stack", "shared", "scratch", "warps", "stages",
    "tensor_cores", "mma_operands_read", "used_pointers",
)  # fmt: skip


def write_manifest(path: str, rows: list[dict], sizes: str, archs: list[int]) -> None:
    """A full run's result per variant id, one JSON line each (temp file + rename)."""
    import triton

    variants = {r["id"]: {k: r[k] for k in RESULT_KEYS if k in r} for r in rows}
    head = {"triton": triton.__version__, "sizes": sizes, "archs": sorted(archs)}
    lines = [f"{json.dumps(v)}: {json.dumps(variants[v], sort_keys=True)}" for v in sorted(variants)]
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(head)[:-1] + ', "variants": {\n' + ",\n".join(lines) + "\n}}\n")
    os.replace(path + ".tmp", path)


def key_hash(key: str) -> str:
    import hashlib

    return hashlib.sha1(key.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _group(row: dict) -> tuple[str, str]:
    """Summary group of a row: (kernel, case without size and layout; BN residual variants merged)."""
    words = row["case"].split()
    size = words[0] if not words[0].startswith(("batch", "1")) else " ".join(words[:2])
    rest = [w for w in words[len(size.split()) :] if w not in LAYOUTS and w != "nores"]
    return row["kernel"], " ".join([size, *rest])


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def summary_table(rows: list[dict], archs: list[int]) -> str:
    """Markdown: one row per kernel and case (layouts, residual and autotune configs merged)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    head = ["kernel", "case", "variants", "ok"]
    for a in archs:
        head += [f"sm_{a} regs", f"sm_{a} smem KB", f"sm_{a} TC"]
    head += ["spill B", "MB moved"] + [f"{ARCHS[a]} µs (predicted ≥)" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (kernel, case), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        cells = [f"`{kernel}`", case, str(len({(r["variant"]) for r in rs})), f"{len(ok)}/{len(rs)}"]
        for a in archs:
            ra = [r for r in ok if r["arch"] == a]
            cells += [
                _span([r["registers"] for r in ra]) if ra else "-",
                _span([round(r["shared"] / 1024) for r in ra]) if ra else "-",
                "/".join(sorted({r["tensor_cores"] for r in ra})) if ra else "-",
            ]
        cells.append(str(max([r["spill_stores"] + r["spill_loads"] for r in ok], default=0)))
        top = max(rs, key=lambda r: r["bytes"])
        cells.append(f"{top['bytes'] / 1e6:.2f}")
        for a in archs:
            cells.append(f"{top['bytes'] / HBM_BYTES_PER_S[a] * 1e6:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
    """Plain text: one row per launch and arch."""
    fmt = "{:<34} {:<38} {:<16} {:>3} {:>3} {:>5} {:>7} {:>7} {:>6} {:>8} {:>9}  {}"
    out = [
        fmt.format(
            "kernel",
            "case",
            "config",
            "sm",
            "ok",
            "regs",
            "spill B",
            "smem B",
            "TC",
            "MB",
            "pred. µs",
            "grid",
        )
    ]
    for r in rows:
        out.append(
            fmt.format(
                r["kernel"],
                r["case"],
                r["config"],
                r["arch"],
                "ok" if r["ok"] else "ERR",
                r.get("registers", "-"),
                r.get("spill_stores", 0) + r.get("spill_loads", 0),
                r.get("shared", "-"),
                r.get("tensor_cores", "-"),
                f"{r['bytes'] / 1e6:.2f}",
                f"{r['predicted_us']:.2f}",
                "x".join(map(str, r["grid"])),
            )  # fmt: skip
        )
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--sizes", choices=("paper", "all"), default="paper", help="all = paper + edge sizes")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--rows", action="store_true", help="print one row per launch and arch")
    parser.add_argument("--json", help="write every row (launch × arch) to this JSON file")
    parser.add_argument("--only", default="", help="only kernels whose name contains this (development)")
    parser.add_argument(
        "--case", action="append", help="only cases containing this (repeatable: any of them)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on a compile error, spill, smem or grid issue"
    )
    parser.add_argument(
        "--manifest", help="take the results of variants this earlier full run has (--write-manifest) from it; "
        "compile only the others and a sample of its own (make test: kernels/aot_manifest.json)",
    )  # fmt: skip
    parser.add_argument(
        "--sample", type=int, default=48, help="with --manifest: variants compiled again (48)"
    )
    parser.add_argument(
        "--write-manifest", help="write every variant's result to this file (a full run only)"
    )
    return parser


def _load_manifest(path: str, parser: argparse.ArgumentParser, log: Callable[[str], None]) -> dict:
    """--manifest's JSON (a usage error when unreadable); a manifest of another triton matches no variant."""
    import triton

    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--manifest {path}: {e}")
    if manifest.get("triton") != triton.__version__:  # its variant ids cannot match: all compile
        log(f"{path} is from triton {manifest.get('triton')}, this is {triton.__version__}")
    return manifest


def _report(rows: list[dict], archs: list[int], one_per_row: bool) -> list[dict]:
    """Print the table and the verdict line (and the first 50 problems); the rows with problems."""
    print(rows_table(rows) if one_per_row else summary_table(rows, archs))
    bad = [r for r in rows if r["problems"]]
    variants = len({r["variant"] for r in rows})
    print(
        f"\n{len(rows)} launches x archs, {variants} distinct variants compiled for "
        f"{', '.join(f'sm_{a}' for a in archs)}: {len(rows) - len(bad)} fine, {len(bad)} with problems "
        f"(compile errors {sum(not r['ok'] for r in rows)}, spilling {sum(any('spill' in p for p in r['problems']) for r in rows)}). "
        "Times are predicted lower bounds (bytes ÷ HBM bandwidth), not measurements."
    )  # fmt: skip
    for r in bad[:50]:
        print(f"  {r['kernel']} [{r['case']}] {r['config']} sm_{r['arch']}: {'; '.join(r['problems'])}")
    return bad


def main(argv: list[str] | None = None) -> int:
    """The command: record, compile, print; with --check, exit status 1 when any variant has a problem."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.write_manifest and (
        args.manifest or args.only or args.sizes != "all" or len(args.archs) < len(ARCHS)
    ):
        parser.error(
            "--write-manifest needs the full matrix: --sizes all, both archs, no --only or --manifest"
        )

    from kernels._common import INTERPRET

    if INTERPRET:  # the kernels were decorated for the interpreter: start again with the compiler
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execve(sys.executable, [sys.executable, "-m", "kernels.aot", *(argv or sys.argv[1:])], env)
    tmp = tempfile.TemporaryDirectory(prefix="fastfilm-aot-cache-")
    os.environ["TRITON_CACHE_DIR"] = tmp.name  # fresh: every variant goes through ptxas (workers inherit it)
    warnings.filterwarnings("ignore")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    manifest = _load_manifest(args.manifest, parser, log) if args.manifest else None
    launches = [
        launch for launch in record_all(args.sizes)
        if args.only in launch.kernel and (not args.case or any(c in launch.case for c in args.case))
    ]  # fmt: skip
    rows = compile_matrix(launches, args.archs, args.jobs, log, manifest, args.sample)
    tmp.cleanup()
    if args.write_manifest:
        write_manifest(args.write_manifest, rows, args.sizes, args.archs)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    bad = _report(rows, args.archs, args.rows)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())

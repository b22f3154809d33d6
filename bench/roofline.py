"""The training step's floor on a GPU: per part of the model, the FLOPs it does, the bytes it must move at least, and
the time neither can go below on a device of a given matmul peak and memory bandwidth. *Predicted*, not measured:
what a step could take if every kernel ran at the device's ceiling and nothing else took time.

    python bench/roofline.py --config configs/clevr.json --batch 64 --tokens 46      # the H200's figures
    python bench/roofline.py --batch 256 --matmul-tflops 790 --hbm-tbps 4.8 --packed

Each kernel of a step runs after the one before it, so the step takes at least the sum over its parts of
max(FLOPs / peak, bytes / bandwidth). The parts and what they must move (activations in `--act-bytes`, 2 for
bf16 autocast; fp32 master weights):
- Convolutions and linear layers (their shapes from a forward on the meta device): forward reads
  its input and weight and writes its output; backward reads the output gradient, the input and the weight and
  writes the input gradient (not for the first layer) and the weight gradient.
- The question RNN (GRU/LSTM): each of its T time steps is a product with the hidden weights `W_hh` ([gates·H, H])
  that cannot start before the step before it ends, forward and again backward, and a step at batch N reads all
  of `W_hh` (101 MB in fp16 for the paper's H = 4096, more than a GPU's L2 holds) for 2·N·gates·H² FLOPs: at
  N = 64 the reads bound it, so the RNN's floor grows with its time steps and hardly with the batch. Its input
  projection and weight gradients are single large products over all time steps.
- BatchNorm with its FiLM, ReLU and residual: forward reads the tensor twice (statistics, then apply) and writes
  it once; backward reads the gradient and the input twice and writes the input gradient (3 + 5 passes).
- Per parameter, per step: fused Adam (reads param, grad, m, v; writes param, m, v: 28 bytes), the gradient's
  accumulation (8) and zeroing (4), and under autocast the weight's cast (read fp32, write the half copy: 6) and
  its gradient's cast back (6): 52 bytes.
Not counted: elementwise work inside the GRU cell, the loss, embeddings, pooling, and each kernel's fixed cost
(~2-4 µs even inside a CUDA graph; the paper step launches ~720 kernels: bench/RESULTS_GPU.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

# The H200 of the 2026-12-04 run: bf16 dense matmul ~790 TFLOP/s (issue 23's figure, measured on that kind of
# machine), HBM3e 4.8 TB/s (NVIDIA's datasheet figure, not measured here). bench/gpu_step.py measures both on
# the machine it runs on and passes them in.
H200_MATMUL_TFLOPS = 790.0
H200_HBM_TBPS = 4.8
# dense TF32 tensor-core peak, the datasheet's (989 "with sparsity" / 2); not measured
H200_TF32_TFLOPS = 495.0
# per parameter and step: fused Adam 28, gradient accumulation 8 and zeroing 4; under autocast also the weight's
# cast to the half copy (read 4, write 2) and its gradient's cast back (read 2, write 4)
BYTES_PER_PARAM_STEP = 28 + 8 + 4
BYTES_PER_CAST_PARAM = 6 + 6


@dataclass
class Part:
    """One part of the step: its work and its floor."""

    part: str
    gflop: float
    gbyte: float
    ms: float  # the floor: each kernel at max(FLOPs / peak, bytes / bandwidth), summed
    bound: str  # "compute", "memory" or "mixed" (some kernels each)


class _Device:
    def __init__(self, matmul_tflops: float, hbm_tbps: float):
        self.flops_per_s, self.bytes_per_s = matmul_tflops * 1e12, hbm_tbps * 1e12

    def kernel(self, flops: float, nbytes: float) -> tuple[float, str]:
        """Seconds of one kernel at the ceiling, and what bounds it."""
        c, m = flops / self.flops_per_s, nbytes / self.bytes_per_s
        return max(c, m), ("compute" if c >= m else "memory")


class _Acc:
    """Sums kernels into parts, in the order they are first seen."""

    def __init__(self, dev: _Device):
        self.dev, self.parts = dev, {}

    def add(self, part: str, flops: float, nbytes: float, dev: _Device | None = None) -> None:
        s, bound = (dev or self.dev).kernel(flops, nbytes)
        p = self.parts.setdefault(part, [0.0, 0.0, 0.0, set()])
        p[0] += flops
        p[1] += nbytes
        p[2] += s
        p[3].add(bound)

    def rows(self) -> list[Part]:
        return [
            Part(name, f / 1e9, b / 1e9, s * 1e3, bounds.pop() if len(bounds) == 1 else "mixed")
            for name, (f, b, s, bounds) in self.parts.items()
        ]


def _region(name: str) -> str:
    if name.startswith("net.stem"):
        return "stem"
    if name.startswith("net.blocks"):
        return "ResBlocks"
    if name.startswith("net.classifier"):
        return "classifier"
    return "FiLM generator"


def _rnn(acc: _Acc, rnn: torch.nn.RNNBase, active: list[int], rnn_bytes: int, dev: _Device) -> None:
    """The question RNN: `active[t]` questions at time step t (all N when padded; those longer than t packed), its
    products at `dev`'s peak."""
    gates = {"GRU": 3, "LSTM": 4}.get(rnn.mode, 1)
    h, dirs = rnn.hidden_size, 2 if rnn.bidirectional else 1
    rows = sum(active)
    w_hh = gates * h * h * rnn_bytes
    for layer in range(rnn.num_layers):
        e = rnn.input_size if layer == 0 else h * dirs
        for _ in range(dirs):
            # forward, then the backward's gradient through the state: each T products, one after the other
            for n in active:
                step_bytes = w_hh + n * (h + gates * h) * rnn_bytes
                for _pass in range(2):
                    acc.add("question RNN: recurrent steps", 2 * n * gates * h * h, step_bytes, dev)
            # input projection (forward), its input gradient (the embeddings train), the two weight gradients
            proj = 2 * rows * e * gates * h
            io = rows * (e + gates * h) * rnn_bytes
            part = "question RNN: projections, weight gradients"
            acc.add(part, proj, io + gates * h * e * rnn_bytes, dev)
            acc.add(part, proj, io + gates * h * e * rnn_bytes, dev)
            acc.add(part, proj, io + gates * h * e * 4, dev)
            acc.add(
                part, 2 * rows * h * gates * h, rows * (h + gates * h) * rnn_bytes + gates * h * h * 4, dev
            )


def _layer_shapes(model: torch.nn.Module, model_cfg, lengths: list[int]) -> dict[str, tuple[int, int]]:
    """(input numel, output numel) of each BatchNorm, linear and convolution of `model` (on the meta device) in
    a forward of a batch of questions of these lengths."""
    n, t, m = len(lengths), max(lengths), model_cfg
    if m.stem == "pixels":
        images = torch.empty(n, 3, m.image_size, m.image_size, device="meta")
    else:
        images = torch.empty(n, m.feature_channels, m.feature_size, m.feature_size, device="meta")
    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Linear)) or (
            not list(mod.children())
            and any(k.endswith("weight") for k, _ in mod.named_parameters())
            and not isinstance(mod, (torch.nn.Embedding, torch.nn.RNNBase))
        ):

            def hook(mod, inp, out, name=name):
                shapes[name] = (inp[0].numel(), out.numel())

            hooks.append(mod.register_forward_hook(hook))
    model(images, torch.ones(n, t, dtype=torch.long, device="meta"), torch.tensor(lengths))
    for hk in hooks:
        hk.remove()
    return shapes


def _layers(acc: _Acc, model: torch.nn.Module, shapes: dict[str, tuple[int, int]], act_bytes: int) -> None:
    """The convolutions, linear layers and BatchNorms (with their FiLM, ReLU, residual), forward and backward."""
    # the first convolution's input (the image or the features) needs no gradient
    first_conv = next(name for name, mod in model.named_modules() if name in shapes and mod.weight.dim() == 4)
    for name, mod in model.named_modules():
        if name not in shapes:
            continue
        n_in, n_out = shapes[name]
        region = _region(name)
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            passes = 3 + 5
            acc.add(f"{region}: BatchNorm (+ FiLM, ReLU, residual)", 0.0, passes * n_out * act_bytes)
            continue
        weight = mod.weight
        w = sum(p.numel() for p in mod.parameters(recurse=False))
        fwd = 2 * n_out * (weight.numel() // weight.shape[0])  # a multiply-add per weight and output element
        part = f"{region}: {'convolutions' if weight.dim() == 4 else 'linear layers'}"
        acc.add(part, fwd, (n_in + n_out + w) * act_bytes)
        first = name == first_conv
        acc.add(
            part, fwd * (1 if first else 2), (n_out + n_in + (0 if first else n_in) + w) * act_bytes + w * 4
        )


def step_floor(
    model_cfg,
    lengths: list[int],
    *,
    padded: bool = True,
    matmul_tflops: float = H200_MATMUL_TFLOPS,
    hbm_tbps: float = H200_HBM_TBPS,
    act_bytes: int = 2,
    rnn_bytes: int = 2,
    rnn_tflops: float | None = None,
    vocab: int = 93,
    answers: int = 32,
) -> list[Part]:
    """The floor of one training step (forward, backward, optimizer) for a batch of questions of these lengths:
    `padded` runs the RNN over the longest (graph mode's static bucket), else each question's own (cuDNN packed).
    `rnn_bytes` / `rnn_tflops`: the RNN's storage and matmul peak when they differ from the rest (a float32 GRU,
    `model.rnn_autocast: false`: 4 bytes, cuDNN's TF32 peak)."""
    from fastfilm.model import FiLMModel

    acc = _Acc(_Device(matmul_tflops, hbm_tbps))
    n, t = len(lengths), max(lengths)
    with torch.device("meta"):
        model = FiLMModel(model_cfg, vocab, answers).train()
    _layers(acc, model, _layer_shapes(model, model_cfg, lengths), act_bytes)
    rnn = model.generator.encoder_rnn
    active = [n] * t if padded else [sum(1 for x in lengths if x > s) for s in range(t)]
    _rnn(acc, rnn, active, rnn_bytes, _Device(rnn_tflops or matmul_tflops, hbm_tbps))
    params = sum(p.numel() for p in model.parameters())
    rnn_params = sum(p.numel() for p in rnn.parameters())
    cast = (params - rnn_params) * (act_bytes < 4) + rnn_params * (rnn_bytes < 4)  # what autocast copies
    acc.add(
        "optimizer (fused Adam), weight casts, gradients",
        0.0,
        params * BYTES_PER_PARAM_STEP + cast * BYTES_PER_CAST_PARAM,
    )
    return acc.rows()


def total_ms(rows: list[Part]) -> float:
    """The step's floor: its parts' floors summed (ms)."""
    return sum(r.ms for r in rows)


def expected_floor(
    model_cfg, lengths, batch: int, *, bucketed: bool = False, seed: int = 0, **floor_kw
) -> dict[str, Any]:
    """Graph mode's floor over one epoch of a split whose questions have these `lengths` (tokens), its batches
    drawn as the trainer draws them (shuffled, or `data.bucket_by_length`'s `bucket_rows`), each padded to its
    bucket (`fastfilm.graphed.length_buckets` of the split's longest): the buckets' counts, each bucket's floor
    and the epoch's mean. Only the bucket sets a padded step's floor, so one floor per bucket is counted."""
    from workload import epoch_batch_longest

    from fastfilm.graphed import bucket_for, length_buckets

    longest = epoch_batch_longest(lengths, batch, bucketed, seed)
    if len(longest) == 0:
        raise ValueError(f"expected_floor: {len(lengths)} questions make no batch of {batch}")
    buckets = length_buckets(int(lengths.max()))
    counts = Counter(bucket_for(int(x), buckets) for x in longest)
    per_bucket = {t: total_ms(step_floor(model_cfg, [t] * batch, **floor_kw)) for t in sorted(counts)}
    mean = sum(per_bucket[t] * c for t, c in counts.items()) / sum(counts.values())
    return {
        "batches": int(sum(counts.values())),
        "bucket_counts": {int(t): int(counts[t]) for t in sorted(counts)},
        "floor_ms_per_bucket": per_bucket,
        "mean_bucket": sum(t * c for t, c in counts.items()) / sum(counts.values()),
        "mean_floor_ms": mean,
        "questions_per_s": batch / mean * 1e3,
    }


def table(rows: list[Part], batch: int) -> str:
    """The floor as a markdown table, with its total and questions/s."""
    out = ["| part | GFLOP | GB moved | floor ms | bound |", "| --- | ---: | ---: | ---: | --- |"]
    out += [f"| {r.part} | {r.gflop:,.1f} | {r.gbyte:,.2f} | {r.ms:.3f} | {r.bound} |" for r in rows]
    ms = total_ms(rows)
    out.append(
        f"| **step** | {sum(r.gflop for r in rows):,.1f} | {sum(r.gbyte for r in rows):,.2f} | **{ms:.2f}** | "
        f"{batch / ms * 1e3:,.0f} questions/s |"
    )
    return "\n".join(out)


def print_epoch_floors(model_cfg, cache: str, split: str, batch: int, **floor_kw) -> None:
    """Graph mode's floor over an epoch of a prep cache's question lengths, shuffled and bucketed, as a table."""
    from fastfilm.data import load_split

    lengths = load_split(cache, split)["lengths"]
    print(
        f"\n{cache} ({split}: {len(lengths):,} questions, {lengths.mean():.1f} tokens on average, "
        f"the longest {lengths.max()}): graph mode's floor over an epoch, each batch padded to its bucket"
    )
    print("| batch order | batches per bucket | mean bucket | floor ms | questions/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, bucketed in (("shuffled", False), ("data.bucket_by_length", True)):
        e = expected_floor(model_cfg, lengths, batch, bucketed=bucketed, **floor_kw)
        counts = ", ".join(f"{t}: {c}" for t, c in e["bucket_counts"].items())
        print(
            f"| {name} | {counts} | {e['mean_bucket']:.1f} | {e['mean_floor_ms']:.2f} | "
            f"{e['questions_per_s']:,.0f} |"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "clevr.json"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=46, help="the padded question length (the bucket)")
    p.add_argument(
        "--packed",
        action="store_true",
        help="the RNN reads each question's own length (lengths spread evenly over 8..tokens), not the bucket",
    )
    p.add_argument("--matmul-tflops", type=float, default=H200_MATMUL_TFLOPS)
    p.add_argument("--hbm-tbps", type=float, default=H200_HBM_TBPS)
    p.add_argument(
        "--act-bytes", type=int, default=2, help="bytes per activation (2: bf16 autocast, 4: fp32)"
    )
    p.add_argument(
        "--rnn-bytes", type=int, default=2, help="bytes per RNN weight/state (4: rnn_autocast false)"
    )
    p.add_argument(
        "--rnn-tflops",
        type=float,
        default=None,
        help="the RNN's matmul peak (default --matmul-tflops; a float32 GRU runs cuDNN's TF32: H200 datasheet "
        f"{H200_TF32_TFLOPS:g})",
    )
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument(
        "--cache",
        default=None,
        help="a `fastfilm prep` cache: also graph mode's floor over an epoch of its split's real lengths, "
        "shuffled and with data.bucket_by_length",
    )
    p.add_argument("--split", default="train", help="the --cache split (train)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fastfilm.config import load_config

    cfg = load_config(args.config, overrides=args.set)
    lo = min(8, args.tokens)
    lengths = [lo + (args.tokens - lo) * i // max(args.batch - 1, 1) for i in range(args.batch)]
    kw = dict(
        matmul_tflops=args.matmul_tflops,
        hbm_tbps=args.hbm_tbps,
        act_bytes=args.act_bytes,
        rnn_bytes=args.rnn_bytes,
        rnn_tflops=args.rnn_tflops,
    )
    rows = step_floor(cfg.model, lengths, padded=not args.packed, **kw)
    print(
        f"{os.path.relpath(args.config)}, batch {args.batch}, {args.tokens} tokens "
        f"({'packed' if args.packed else 'padded'}); {args.matmul_tflops:g} TFLOP/s, {args.hbm_tbps:g} TB/s"
        + (f", RNN {args.rnn_bytes} B at {args.rnn_tflops:g} TFLOP/s" if args.rnn_tflops else "")
        + "; "
        "predicted floor, not a measurement"
    )
    print(table(rows, args.batch))
    if args.cache:
        print_epoch_floors(cfg.model, args.cache, args.split, args.batch, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of the question encoder's gradient float16 *without loss scaling* would lose: a CPU estimate.

Why: on a GPU, PyTorch's autocast runs cuDNN's RNN in float16 whatever the autocast dtype (README, "Precision"), so
under bf16 autocast the paper's GRU (4096 units) computes its backward in float16, and bf16 training has no loss
scaler. float16 flushes magnitudes below 2^-25 to zero and keeps fewer bits below 2^-14 (subnormals). This script
trains the paper's model (configs/clevr.json, float32, the trainer's Adam with coupled L2) on a prepared cache
and, every few steps, measures in float32 the two gradients that would be stored in float16 there: the gradient
arriving at the encoder's final state (dL/dh_T, which the cuDNN backward carries through time) and the GRU's weight
gradients. Reported per measurement: the share of elements float16 would zero (|g| < 2^-25), the share it would
hold as subnormals (2^-25 ≤ |g| < 2^-14), and the relative error of the tensor rounded to float16
(‖fp16(g) − g‖ / ‖g‖). With `--emulate`, also the whole GRU backward recomputed with float16 storage emulated
(`gru_grads`: every operand, state, gate and carried gradient rounded to float16, products summed in float32)
against autograd's float32 gradients: relative error, cosine, non-zeros lost. The image size (the cache's)
changes the visual side's share of the loss. `model.rnn_autocast: false` (bench case
`graph_cl_gru_fp32`) is the fix if the numbers are bad.

    python bench/gru_fp16_estimate.py --cache data/cache/synthetic --steps 20 --every 5 --out est.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ZERO = 2.0**-25  # float16 rounds smaller magnitudes to 0 (half the smallest subnormal, 2^-24)
NORMAL = 2.0**-14  # the smallest normal float16


def fp16_loss(g: torch.Tensor) -> dict[str, float]:
    """What storing `g` (float32) in float16 would do to it."""
    a = g.detach().float().abs().flatten()
    nz = a[a > 0]
    rounded = g.detach().half().float()
    return {
        "zeroed": float((a < ZERO).float().mean()),
        "zeroed_of_nonzero": float((nz < ZERO).float().mean()) if nz.numel() else 0.0,
        "subnormal": float(((a >= ZERO) & (a < NORMAL)).float().mean()),
        "rel_error": float(
            (rounded - g.detach().float()).norm() / g.detach().float().norm().clamp_min(1e-30)
        ),
        "median_abs": float(a.median()),
        "max_abs": float(a.max()),
    }


def gru_grads(rnn, packed, grad_h, q=lambda t: t) -> dict[str, torch.Tensor]:
    """The GRU's parameter gradients for the upstream gradient `grad_h` ([N, H], the batch's order) of its final
    states, recomputed forward and backward step by step as cuDNN does it, with `q` applied wherever cuDNN keeps a
    tensor in the RNN's dtype: `q = identity` is float32 (it must equal autograd's gradients: checked), `q =
    to_fp16` emulates the float16 RNN (operands, GEMM outputs, gates, states and every carried gradient stored in
    float16; products accumulated in float32, as tensor cores do)."""
    x, sizes = q(packed.data.detach()), packed.batch_sizes.tolist()
    w_ih, w_hh = q(rnn.weight_ih_l0.detach()), q(rnn.weight_hh_l0.detach())
    b_ih, b_hh = q(rnn.bias_ih_l0.detach()), q(rnn.bias_hh_l0.detach())
    hid = w_hh.shape[1]
    gi = q(x @ w_ih.t() + b_ih)
    h = x.new_zeros(sizes[0], hid)
    steps, off = [], 0
    for b in sizes:  # forward, keeping what the backward reads
        h = h[:b]
        gh = q(h @ w_hh.t() + b_hh)
        g = gi[off : off + b]
        r = q(torch.sigmoid(g[:, :hid] + gh[:, :hid]))
        z = q(torch.sigmoid(g[:, hid : 2 * hid] + gh[:, hid : 2 * hid]))
        n = q(torch.tanh(g[:, 2 * hid :] + r * gh[:, 2 * hid :]))
        steps.append((off, b, h, r, z, n, gh[:, 2 * hid :]))
        h = q((h - n) * z + n)
        off += b
    grad_sorted = q(grad_h.detach()[packed.sorted_indices])
    dgi = torch.zeros(x.shape[0], 3 * hid)
    dgh = torch.zeros_like(dgi)
    hp_all = torch.zeros(x.shape[0], hid)
    dh = x.new_zeros(sizes[0], hid)
    for t in range(len(sizes) - 1, -1, -1):  # backward through time
        off, b, hp, r, z, n, ghn = steps[t]
        nxt = sizes[t + 1] if t + 1 < len(sizes) else 0
        dh[nxt:b] = grad_sorted[nxt:b]
        d = dh[:b]
        dn = q(d * (1 - z) * (1 - n * n))
        dz = q(d * (hp - n) * z * (1 - z))
        dr = q(dn * ghn * r * (1 - r))
        dgi[off : off + b] = torch.cat([dr, dz, dn], 1)
        dgh[off : off + b] = torch.cat([dr, dz, q(dn * r)], 1)
        hp_all[off : off + b] = hp
        dh[:b] = q(d * z + dgh[off : off + b] @ w_hh)
    return {
        "weight_ih_l0": q(dgi.t() @ x),
        "weight_hh_l0": q(dgh.t() @ hp_all),
        "bias_ih_l0": q(dgi.sum(0)),
        "bias_hh_l0": q(dgh.sum(0)),
    }


def to_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def compare(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far `a` is from `ref`: relative error of the whole tensor, cosine, share of ref's non-zeros lost."""
    a, ref = a.flatten().double(), ref.flatten().double()
    return {
        "rel_error": float((a - ref).norm() / ref.norm().clamp_min(1e-300)),
        "cosine": float(a @ ref / (a.norm() * ref.norm()).clamp_min(1e-300)),
        "lost_nonzeros": float(((a == 0) & (ref != 0)).double().mean()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="a `fastfilm prep` cache with an image cache")
    p.add_argument("--config", default="configs/clevr.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="measure every this many steps (and at step 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the measurements as JSON")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="also recompute the GRU's backward with float16 storage emulated (`gru_grads`) and compare its "
        "weight gradients with float32's",
    )
    args = p.parse_args(argv)
    sizes = [int(f.split("_")[-1][:-4]) for f in os.listdir(args.cache) if f.startswith("train_images_")]
    if not sizes:
        p.error(f"{args.cache}: no train_images_S.npy (prep it with --image-size)")
    args.image_size = max(sizes)
    return args


def batches(cache: str, size: int, batch: int, seed: int):
    """Random training batches (images as float32 [B, 3, S, S] in [0, 1], questions, lengths, answers)."""
    from fastfilm.data import load_split

    rows = load_split(cache, "train")
    images = np.load(os.path.join(cache, f"train_images_{size}.npy"), mmap_mode="r")
    rng = np.random.default_rng(seed)
    while True:
        idx = np.sort(rng.choice(len(rows["lengths"]), size=batch, replace=False))
        lengths = torch.as_tensor(rows["lengths"][idx].astype(np.int64))
        q = torch.as_tensor(rows["questions"][idx, : int(lengths.max())].astype(np.int64))
        img = torch.as_tensor(np.ascontiguousarray(images[rows["image_index"][idx]]))
        yield (
            img.permute(0, 3, 1, 2).float() / 255.0,
            q,
            lengths,
            torch.as_tensor(rows["answers"][idx].astype(np.int64)),
        )


def keep_encoder_state(generator) -> dict:
    """Make `generator.encode` keep its questions, lengths and output (whose .grad is dL/dh_T after backward)."""
    captured, encode = {}, generator.encode

    def encode_and_keep(questions, lengths=None, *a, **k):
        h = encode(questions, lengths, *a, **k)
        h.retain_grad()
        captured["h"], captured["questions"], captured["lengths"] = h, questions, lengths
        return h

    generator.encode = encode_and_keep
    return captured


def measure(generator, captured: dict, emulate: bool) -> dict:
    """After a backward: fp16 storage of dL/dh_T and of each GRU gradient; with `emulate`, the fp16 backward."""
    rnn = generator.encoder_rnn
    m = {"dL/dh_T": fp16_loss(captured["h"].grad)}
    for name, prm in rnn.named_parameters():
        m[name] = fp16_loss(prm.grad)
    if emulate:  # the whole backward in float16, against autograd's float32 gradients
        with torch.no_grad():
            embed = generator.encoder_embed(captured["questions"])
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                embed, captured["lengths"], batch_first=True, enforce_sorted=False
            )
            exact = gru_grads(rnn, packed, captured["h"].grad)
            half = gru_grads(rnn, packed, captured["h"].grad, to_fp16)
        m["fp32_recomputed_vs_autograd"] = {
            k: compare(v, rnn.get_parameter(k).grad) for k, v in exact.items()
        }
        m["fp16_backward_vs_fp32"] = {k: compare(half[k], rnn.get_parameter(k).grad) for k in half}
    return m


def report(m: dict, seconds: float) -> None:
    w, d = m["weight_hh_l0"], m["dL/dh_T"]
    print(
        f"step {m['step']:4d}  loss {m['loss']:.3f}  dL/dh_T: zeroed {d['zeroed']:.1%} subnormal {d['subnormal']:.1%}"
        f"  weight_hh: zeroed {w['zeroed']:.1%} subnormal {w['subnormal']:.1%} rel.err {w['rel_error']:.2e}"
        f"  ({seconds:.0f} s)",
        flush=True,
    )
    if "fp16_backward_vs_fp32" in m:
        e, i = m["fp16_backward_vs_fp32"]["weight_hh_l0"], m["fp16_backward_vs_fp32"]["weight_ih_l0"]
        print(
            f"           fp16 backward: weight_hh rel.err {e['rel_error']:.2e} cosine {e['cosine']:.6f} "
            f"lost {e['lost_nonzeros']:.2%}; weight_ih rel.err {i['rel_error']:.2e}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fastfilm.core.config import load_config
    from fastfilm.data import load_vocab
    from fastfilm.model import FiLMModel
    from fastfilm.train import build_optimizer

    cfg = load_config(args.config)
    cfg.model.image_size = args.image_size
    vocab = load_vocab(args.cache)
    torch.manual_seed(args.seed)
    model = FiLMModel(
        cfg.model, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]), kernels="reference"
    ).train()
    opt = build_optimizer(model, cfg.deepspeed)  # the trainer's Adam with coupled L2
    captured = keep_encoder_state(model.generator)
    out = {
        "config": args.config, "cache": args.cache, "image_size": args.image_size, "batch": args.batch,
        "rnn_hidden_dim": cfg.model.rnn_hidden_dim, "torch": torch.__version__, "measurements": [],
    }  # fmt: skip
    data = batches(args.cache, args.image_size, args.batch, args.seed)
    t0 = time.time()
    for step in range(args.steps + 1):
        img, q, lengths, answers = next(data)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(img, q, lengths), answers)
        loss.backward()
        if step % args.every == 0:
            m = {"step": step, "loss": loss.item(), **measure(model.generator, captured, args.emulate)}
            out["measurements"].append(m)
            report(m, time.time() - t0)
        opt.step()
    if not math.isfinite(loss.item()):
        print("the loss is not finite", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Work per question and what the machine can do: FLOP counts (`torch.utils.flop_counter.FlopCounterMode`) and
the machine's own matmul throughput, for `bench/test_flops.py`, `bench/report.py` and `bench/cpu_modes.py`.

FLOPs are counted on the meta device (no memory, no compute: a paper-model count takes seconds on a CPU), for
the model as the trainer builds it, in train mode, with a float32 cross-entropy and its backward. Counted: the
matmuls and convolutions (what FlopCounterMode knows); not counted: elementwise work, BN, the optimizer. The meta device takes the CPU's path through the model: a one-layer
GRU runs `fastfilm.gru`, which skips step 0's product with h0 = 0 (2·3H·H per question forward, twice that
backward: 0.2 GFLOP for the paper's GRU); cuDNN on a GPU does those products.

Question lengths are in tokens, <START> and <END> included. The question RNN's work is linear in the tokens it
reads, so a count at a batch whose mean length is m equals the mean over any set of questions of mean m:
- packed (fastfilm now): each question's own length;
- padded to the batch's longest (fastfilm before packing): the expected longest of a batch;
- padded to the dataset's longest (the original code: `preprocess_questions.py` pads every question to the
  longest of the set, 46 tokens on CLEVR in DESIGN.md §7's count).
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# CLEVR v1.0: questions average 18.4 words (the and the CLEVR paper's figure), so 20.4 tokens with
# <START>/<END>. The five lengths below have exactly that mean (the count is linear in the mean).
CLEVR_MEAN_TOKENS = 20.4
CLEVR_BATCH_LENGTHS = (20, 20, 21, 20, 21)
CLEVR_PADDED_TOKENS = 46  # the original's padding on CLEVR (DESIGN.md §7)


def padded_encode(gen, questions: torch.Tensor, lengths=None) -> torch.Tensor:
    """FiLMGen's question feature as it was before packing (and in the original): the RNN over every padded
    position, then its output at the last non-NULL token."""
    n = questions.shape[0]
    idx = ((questions != 0).sum(1) - 1).clamp(min=0)
    out, _ = gen.encoder_rnn(gen.encoder_embed(questions))
    return out.gather(1, idx.view(n, 1, 1).expand(n, 1, out.size(2))).view(n, out.size(2))


def meta_model(model_cfg, vocab: int = 93, answers: int = 32, packed: bool = True):
    """The FiLM model on the meta device, train mode; `packed=False` runs the RNN over the padding."""
    from fastfilm.model import FiLMModel

    with torch.device("meta"):
        model = FiLMModel(model_cfg, vocab, answers).train()
    if not packed:
        model.generator.encode = types.MethodType(padded_encode, model.generator)
    return model


def count_flops(
    model_cfg, lengths: Sequence[int], pad_to: int | None = None, *, packed: bool = True, backward: bool
) -> float:
    """FLOPs per question of the model's forward (or forward + loss backward) on a batch of questions of
    these lengths padded to `pad_to` (default: the longest)."""
    lengths = [int(x) for x in lengths]
    n, t = len(lengths), pad_to or max(lengths)
    model = meta_model(model_cfg, packed=packed)
    m = model_cfg
    if m.stem == "pixels":
        images = torch.empty(n, 3, m.image_size, m.image_size, device="meta")
    else:
        images = torch.empty(n, m.feature_channels, m.feature_size, m.feature_size, device="meta")
    questions = torch.ones(n, t, dtype=torch.long, device="meta")  # ids do not matter for a count
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        logits = model(images, questions, torch.tensor(lengths))
        if backward:
            F.cross_entropy(logits.float(), torch.zeros(n, dtype=torch.long, device="meta")).backward()
    return counter.get_total_flops() / n


def lengths_of_cache(cache_dir: str, split: str = "train") -> np.ndarray:
    """The question lengths (tokens) of a `fastfilm prep` cache's split: the data's real distribution."""
    from fastfilm.data import load_split

    return np.asarray(load_split(cache_dir, split)["lengths"], dtype=np.int64)


def expected_batch_longest(lengths: np.ndarray, batch: int, draws: int = 2000, seed: int = 0) -> float:
    """The mean, over random batches of `batch` questions, of the batch's longest question: the padded length
    a uniformly shuffled batch runs the RNN over."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(lengths), size=(draws, batch))
    return float(lengths[idx].max(1).mean())


def mean_batch(lengths_mean: float, n: int = 5) -> list[int]:
    """n integer lengths whose mean is `lengths_mean` rounded to 1/n (for a count at that mean)."""
    total = round(lengths_mean * n)
    base = total // n
    return [base + (1 if i < total - base * n else 0) for i in range(n)]


def flops_table(model_cfg, lengths: np.ndarray | None, batch: int, padded_tokens: int) -> dict[str, float]:
    """GFLOP per question, forward and forward + backward: packed at the mean length, padded to the expected
    longest of a batch (before packing), padded to the dataset's longest (the original). With `lengths` None,
    the CLEVR figures (mean 20.4 tokens; no batch-longest figure without the distribution)."""
    out: dict[str, float] = {}
    mean = float(lengths.mean()) if lengths is not None else CLEVR_MEAN_TOKENS
    packed_batch = mean_batch(mean) if lengths is not None else list(CLEVR_BATCH_LENGTHS)
    out["mean_tokens"] = float(np.mean(packed_batch))
    out["padded_tokens"] = float(padded_tokens)
    cases = {"packed": (packed_batch, None, True), "original": (packed_batch, padded_tokens, False)}
    if lengths is not None:
        longest = expected_batch_longest(lengths, batch)
        out["batch_longest_tokens"] = longest
        # The padded count is linear in the padded length: interpolate between the two integers around it.
        lo = int(np.floor(longest))
        cases["batch_longest_lo"] = (packed_batch, lo, False)
        cases["batch_longest_hi"] = (packed_batch, lo + 1, False)
        out["rnn_steps_shuffled"] = rnn_steps_per_batch(lengths, batch, bucketed=False)
        out["rnn_steps_bucketed"] = rnn_steps_per_batch(lengths, batch, bucketed=True)
    for name, (ls, pad, packed) in cases.items():
        for backward, key in ((False, "fwd"), (True, "fwdbwd")):
            out[f"{name}_{key}_gflop"] = (
                count_flops(model_cfg, ls, pad, packed=packed, backward=backward) / 1e9
            )
    if lengths is not None:
        w = out["batch_longest_tokens"] - np.floor(out["batch_longest_tokens"])
        for key in ("fwd", "fwdbwd"):
            lo_v, hi_v = out.pop(f"batch_longest_lo_{key}_gflop"), out.pop(f"batch_longest_hi_{key}_gflop")
            out[f"batch_longest_{key}_gflop"] = (1 - w) * lo_v + w * hi_v
    return out


def epoch_batch_longest(lengths: np.ndarray, batch: int, bucketed: bool, seed: int = 0) -> np.ndarray:
    """The longest question of each full batch of one epoch of `lengths` in batches of `batch`: shuffled as the
    loader does, or with `data.bucket_by_length` (`bucket_rows`). Empty when there is no full batch."""
    from fastfilm.data.buckets import bucket_rows

    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if bucketed:
        order = bucket_rows(order, lengths, batch, rng)
    full = len(order) // batch * batch
    return lengths[order[:full]].reshape(-1, batch).max(1) if full else lengths[:0]


def rnn_steps_per_batch(lengths: np.ndarray, batch: int, bucketed: bool, seed: int = 0) -> float:
    """The mean number of RNN time steps per batch (its longest question) over one epoch of `lengths`
    (`epoch_batch_longest`). On a GPU or at small batch the GRU's time goes with these steps: each one reads the
    hidden weights."""
    longest = epoch_batch_longest(lengths, batch, bucketed, seed)
    return float(longest.mean()) if len(longest) else float(np.max(lengths))


def step_gflop(model_cfg, lengths: torch.Tensor, pad_to: int) -> float:
    """GFLOP of one training step's forward + backward for a batch of these lengths (packed, as the model runs
    now), the numerator of a step's achieved GFLOP/s."""
    return count_flops(model_cfg, lengths.tolist(), pad_to, backward=True) * len(lengths) / 1e9


def matmul_gflops(dtype: torch.dtype, n: int | None = None, min_seconds: float = 0.5, device=None) -> float:
    """The machine's own dense matmul throughput: an n×n @ n×n product in `dtype`, repeated for at least
    `min_seconds` after one warm-up, on the current intra-op threads (GPU: synchronised). GFLOP/s. `n=None`: sized
    by a probe so that one product takes about 0.1 s (≤ 2048; bf16 without hardware support is ~1 GFLOP/s)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if n is None:
        from fastfilm.auto import sized_matmul

        n, _ = sized_matmul(dtype, device, max_seconds=0.1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and reps >= 3:
            break
    return 2 * n**3 * reps / elapsed / 1e9


def copy_gbps(nbytes: int = 1 << 30, min_seconds: float = 0.3, device=None) -> float:
    """The machine's own memory bandwidth: a device-to-device copy of `nbytes` (read + write: 2·nbytes moved),
    repeated for at least `min_seconds` after one warm-up (GPU: synchronised). GB/s."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    dst.copy_(src)
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        dst.copy_(src)
        reps += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and reps >= 3:
            break
    return 2 * nbytes * reps / elapsed / 1e9


def shipped_configs(root: str) -> list[str]:
    """configs/*.json, sorted."""
    folder = os.path.join(root, "configs")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))

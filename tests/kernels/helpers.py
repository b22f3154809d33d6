"""Comparison helpers and the tolerances of the kernel tests (why each value, in the comments)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# float32: machine epsilon 1.2e-7. Kernel and reference sum up to a few hundred terms in different orders
# (√M·ε ≈ 2.4e-6 for M = 392) and the BN backward loses about a digit to cancellation (γ·g − A − x̂·B):
# 1e-5 of the tensor's magnitude is ~100 ulp. Observed errors are ~1e-7 to 5e-7.
FP32_REL = 1e-5

# bfloat16: 8 significant bits, so one round-to-nearest costs up to 2^-9 ≈ 2e-3 of the value (the conftest
# makes the interpreter round like the GPU). Our kernels compute in float32 from the bf16 inputs and round once
# at the store; under autocast the 1×1 conv also rounds x and W to bf16 first (three roundings ≈ 6e-3). Compared
# against the float32 reference computed from the same inputs, 1e-2 of the tensor's magnitude covers that and
# not much more (the bf16 ulp at the magnitude is 2^-8 = 3.9e-3).
BF16_REL = 1e-2

# float16: 11 significant bits, one round-to-nearest costs up to 2^-12 ≈ 2.4e-4 of the value; as for bf16 the
# kernels round once at the store (under autocast the 1×1 conv also rounds x and W first: three roundings ≈ 7e-4).
# 2e-3 of the tensor's magnitude is that and not much more (the fp16 ulp at the magnitude is 2^-10 ≈ 1e-3).
FP16_REL = 2e-3

# TF32 (float32 GEMMs when torch.backends.cuda.matmul.allow_tf32 is on; GPU only): each operand is rounded to 10
# mantissa bits, 2^-11 ≈ 4.9e-4 of its value, 8 times finer than bf16's 2^-8; the bf16 bound scaled down by 8
# is ~1.3e-3, so 2e-3 of the tensor's magnitude.
TF32_REL = 2e-3


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with its sizes, strides and storage offset (a leaf that does not require grad).

    `t.clone()` keeps the strides of dense tensors only: a channel slice, every other sample or γ sliced out of
    the generator's output would come back contiguous, and the test would not test the layout it names.
    """
    t = t.detach()
    numel = t.untyped_storage().nbytes() // t.element_size()
    storage = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (numel,), (1,))
    copy = storage.clone().as_strided(t.size(), t.stride(), t.storage_offset())
    assert (
        copy.stride() == t.stride() and copy.storage_offset() == t.storage_offset() and torch.equal(copy, t)
    )
    return copy


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (error relative to the tensor's magnitude), in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """Shapes equal and max |actual − expected| ≤ rel · max |expected|."""
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert expected.abs().max() > 0, f"{name}: the expected tensor is all zeros (the check would be vacuous)"
    err = rel_error(actual, expected)
    assert err <= rel, f"{name}: relative error {err:.3e} > {rel:.1e}"


def tol(dtype: torch.dtype) -> float:
    """The relative tolerance for results stored in `dtype`."""
    return {torch.bfloat16: BF16_REL, torch.float16: FP16_REL}.get(dtype, FP32_REL)


def cuda_only(test):
    """Mark a test `cuda` and skip it without a GPU (the only skip in these tests)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


def assert_float32_model_close(
    ref: tuple, other: tuple, share: float = 1e-3, truth: Callable[[], tuple] | None = None
) -> None:
    """Two float32 runs of one model, each (logits, {param: grad}, state_dict), agree within `share` of each tensor's
    scale: reductions run in another order, and ReLU and max-pool are discontinuous (a 1e-7 difference can flip one
    mask element or one pooling argmax and move that element's whole gradient; seen: classifier.1.bias at 4.8e-4).
    A real bug (a wrong term, a wrong mask) is off by O(1). Scale floor: a bias right before a train-mode BN (the
    stem's conv, the classifier's hidden linear) has an exactly zero gradient in exact arithmetic, so both runs
    hold rounding noise there; such tensors are measured against the model's largest gradient instead of their own.

    That noise depends on the CPU's kernels (classifier.5.bias reached 1.0e-3 of the floor under
    ATEN_CPU_CAPABILITY=avx2, 4.6e-4 without), so with `truth` (the same model and inputs in float64, computed
    only when a tensor misses) a tensor also passes when the two runs differ by at most 4× the reference's own
    float32 error against float64: no further from each other than rounding puts them."""
    (l_ref, g_ref, s_ref), (l_oth, g_oth, s_oth) = ref, other
    floor = 1e-3 * max(g.abs().max() for g in g_ref.values())
    exact: list[tuple] = []

    def close(a, b, what, pick):
        a, b = a.float(), b.float()
        scale = torch.maximum(b.abs().max(), floor)
        err = (a - b).abs().max()
        if err / scale < share:
            return
        if truth is not None:
            if not exact:
                exact.append(truth())
            noise = (b.double() - pick(exact[0]).double()).abs().max()
            if err <= 4 * noise:
                return
            what += f" (and {float(err):.3g} > 4× the reference's float32 error {float(noise):.3g} against float64)"
        raise AssertionError(f"{what}: {err / scale}")

    close(l_oth, l_ref, "logits", lambda t: t[0])
    for k in g_ref:
        close(g_oth[k], g_ref[k], f"grad {k}", lambda t, k=k: t[1][k])
    for k in s_ref:
        if s_ref[k].is_floating_point():
            close(s_oth[k], s_ref[k], f"state {k}", lambda t, k=k: t[2][k])
        else:
            assert torch.equal(s_oth[k], s_ref[k]), k

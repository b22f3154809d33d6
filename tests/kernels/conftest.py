"""Kernel tests: Triton runs in its interpreter without a GPU (the variable must be set before `import triton`)."""

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.kernels import gpu_emulation  # the interpreter computes as compiled GPU code (see the module)

    gpu_emulation.install()


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 comparisons are made at IEEE precision: no TF32 in cuDNN convs, matmuls or our tl.dot."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# The BN kernels of each training path; the fixture below counts their launches.
BN_SPLIT_TRAINING = ("_stats_kernel", "_finalize_stats_kernel", "_backward_dz_kernel")
BN_ONE_LAUNCH = ("_one_launch_forward_kernel", "_one_launch_backward_kernel")
BN_KERNELS = (
    "_forward_kernel", "_backward_reduce_kernel", "_finalize_sums_kernel", *BN_SPLIT_TRAINING, *BN_ONE_LAUNCH
)  # fmt: skip


class _Counting:
    """Stands in for a Triton kernel in its module: counts `kernel[grid](...)` launches, then launches."""

    def __init__(self, kernel, name: str, launches: dict) -> None:
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches[self.name] = self.launches.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.fixture(params=["split", "one_launch"])
def bn_path(request, monkeypatch):
    """bn_film_relu's training mode forced onto one path: "split" (statistics over batch splits, then the apply;
    the backward's reduction, then dz) or "one_launch" (one program per channel, one launch each way). Yields
    `.one_launch` and `.launches` (per kernel name); afterwards checks that training ran on that path and never on the other one.
    (A test with a `mode` parameter runs "one_launch" in training only: see pytest_collection_modifyitems.)"""
    import kernels._common as common

    bn = importlib.import_module("kernels.bn_film_relu")
    monkeypatch.setattr(common, "BN_ONE_LAUNCH", request.param == "one_launch")
    launches: dict[str, int] = {}
    for name in BN_KERNELS:
        monkeypatch.setattr(bn, name, _Counting(getattr(bn, name), name, launches))
    yield SimpleNamespace(one_launch=request.param == "one_launch", launches=launches)
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    training = params.get("mode", "train") == "train"
    if request.param == "one_launch":
        assert not any(launches.get(k) for k in BN_SPLIT_TRAINING), f"the split path ran: {launches}"
        assert launches.get("_one_launch_forward_kernel"), f"no one-launch forward ran: {launches}"
    else:
        assert not any(launches.get(k) for k in BN_ONE_LAUNCH), f"the one-launch path ran: {launches}"
        assert not training or launches.get("_stats_kernel"), f"no split training forward ran: {launches}"


def pytest_collection_modifyitems(config, items):
    """Tests parametrized over BN modes run the one-launch path in training only (eval and no BN have one path).
    test_bn_at_model_size's one-launch cases are `slow` (~11 s each interpreted: 128 programs over the whole batch;
    test_bn_film_relu runs that path at 130 channels × 14² in fp32 and bf16, both layouts, in make test)."""
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if item.originalname == "test_bn_at_model_size" and params.get("bn_path") == "one_launch":
            item.add_marker(pytest.mark.slow)

    def one_launch_outside_training(item) -> bool:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        return params.get("bn_path") == "one_launch" and params.get("mode", "train") != "train"

    drop = [item for item in items if one_launch_outside_training(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not one_launch_outside_training(item)]

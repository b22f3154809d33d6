"""A lint over the kernel tests: a test that runs the kernels takes the `device` fixture and builds no tensor
without it, so that on a GPU every kernel test runs on the GPU.

Seen on the first GPU run (2026-12-04, H200): 37 model-parity tests built their models and inputs on the CPU
("impl='triton' got CPU tensors") and two tests multiplied CUDA inputs by CPU noise. The interpreter runs
everything on the CPU, so CPU CI could not see it; this test can.

Rules, over every `tests/kernels/test_*.py` (AST, no import):
1. Every `test_*` function takes `device`, unless it is in DEVICE_FREE (tests that run no kernel: pure
   functions on host values, the ahead-of-time compiler, this lint).
2. A tensor factory call (`torch.randn`, `torch.zeros`, …) passes `device=`, or sits inside a `.to(...)` call's
   receiver in the same statement, or lies in a function that has a `device` parameter and moves its results
   with `.to(device…)` (values drawn on the CPU from a seeded generator, the same on every device, then moved).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FACTORIES = {
    "randn", "rand", "randint", "randperm", "zeros", "ones", "empty", "full", "arange", "linspace", "tensor",
    "eye",
}  # fmt: skip
# test functions that run no kernel (a reason each); a test here must not take `device` (else it belongs out)
DEVICE_FREE = {
    "test_tf32_follows_torch": "reads torch's TF32 switch only",
    "test_coord_map_is_the_original": "coord_map on host values, compared with torch.linspace",
    "test_problems_are_detected": "the AOT report's checks on dicts",
    "test_matrix_is_complete": "the AOT compiler's rows",
    "test_every_variant_compiles_without_spills_within_limits": "the AOT compiler's rows",
    "test_tensor_cores_where_expected": "the AOT compiler's rows",
    "test_async_mma_operand_read_elsewhere_is_detected": "TTGIR text",
    "test_no_async_mma_operand_is_read_elsewhere": "the AOT compiler's rows",
    "test_aot_compiles_under_triton_3_6": "the AOT compiler under another triton",
    "test_manifest_has_every_variant": "the AOT compiler's rows",
    "test_full_matrix_compiles_as_the_manifest_says": "the AOT compiler's rows",
    "test_autotune_keys_are_kernel_parameters": "kernel signatures",
    "test_as_gpu_choices": "the launchers' choices, no kernel run",
}


def _functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """The module's top-level functions (a nested helper is checked as part of the function around it)."""
    return [n for n in tree.body if isinstance(n, ast.FunctionDef)]


def _params(fn: ast.FunctionDef) -> set[str]:
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def _moves_to_device(fn: ast.FunctionDef) -> bool:
    """The function calls `.to(device…)` (first argument the name `device`)."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "device":
                return True
    return False


def _factory_calls_outside_to(fn: ast.FunctionDef) -> list[ast.Call]:
    """Factory calls without device= that no `.to(...)` call of the same statement encloses."""
    inside_to: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            inside_to.update(id(n) for n in ast.walk(node.func.value))
    bad = []
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
            and not any(k.arg == "device" for k in node.keywords)
            and id(node) not in inside_to
        ):
            bad.append(node)
    return bad


def problems(source: str, filename: str) -> list[str]:
    """What breaks the two rules in one test module's source."""
    tree = ast.parse(source)
    out = []
    for fn in _functions(tree):
        params = _params(fn)
        if fn.name.startswith("test_"):
            if fn.name in DEVICE_FREE:
                if "device" in params:
                    out.append(f"{filename}:{fn.lineno} {fn.name} takes device but is listed as DEVICE_FREE")
                continue
            if "device" not in params:
                out.append(f"{filename}:{fn.lineno} {fn.name} does not take the device fixture")
        if fn.name in DEVICE_FREE or ("device" in params and _moves_to_device(fn)):
            continue
        for call in _factory_calls_outside_to(fn):
            out.append(f"{filename}:{call.lineno} torch.{call.func.attr}(...) in {fn.name} has no device=")
    return out


def test_kernel_tests_follow_the_device_fixture():
    files = sorted(f for f in HERE.glob("test_*.py") if f.name != Path(__file__).name)
    assert len(files) >= 6
    found = [p for f in files for p in problems(f.read_text(), f.name)]
    assert not found, "kernel tests that would not run on the GPU:\n" + "\n".join(found)


PLANTED = {
    "no device fixture": """
def test_model(stem):
    model = make(stem, "triton")
""",
    "CPU noise on device inputs": """
def test_x(device):
    inp = make_inputs(device)
    inp["x"] = inp["x"] * torch.rand(3, generator=gen)
""",
    "linspace without device": """
def run(model, x):
    return (model(x) * torch.linspace(-1, 1, 5)).sum()
""",
}


@pytest.mark.parametrize("name", PLANTED)
def test_lint_catches_the_gpu_runs_mistakes(name):
    assert problems(PLANTED[name], "planted.py"), name


def test_lint_accepts_device_independent_values_moved_to_the_device():
    ok = """
def make_inputs(n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    return x.to(device)

def test_y(device):
    x = torch.zeros(3, device=device) + torch.rand(3, generator=g).to(device)
"""
    assert problems(ok, "ok.py") == []

"""The package's layers (README, "Layout") as a test: the import-linter contracts of pyproject.toml, checked over
every import statement of fastfilm/ and kernels/ (those inside functions, `if` and `try` blocks included), and
a whole-graph cycle check. A planted upward import, cycle, alias import or unplaced module fails them (tested on
a copy of the tree); `lint-imports` (import-linter, when installed) agrees on both trees.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fastfilm", "kernels")


# ------------------------------------------------------------------------------------------------ the graph
def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module of the packages under `root`: dotted name → file (a package is its __init__.py)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str, mods: dict) -> str | None:
    """`name`, or its closest enclosing module that exists (None: outside the packages)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: pathlib.Path) -> dict[str, dict[str, int]]:
    """importer → {imported module: line of the first such import}, for every import statement anywhere."""
    mods = modules(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                known = _known(target, mods)
                if known and known != name:
                    graph[name].setdefault(known, node.lineno)
    return graph


def _under(module: str, names) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, {})):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


# ------------------------------------------------------------------------------------------------ the contracts
def _layers(contract: dict, graph: dict) -> list[str]:
    """A `layers` contract: no import from a layer up to a higher one, none between independent siblings (`|`);
    with `exhaustive`, every module directly under a container is in a layer or ignored."""
    containers = contract.get("containers", [""])
    problems = []
    for container in containers:
        prefix = f"{container}." if container else ""
        rows = []  # (layer index, sibling name, independent)
        for i, layer in enumerate(contract["layers"]):
            sep = "|" if "|" in layer else ":"
            rows += [(i, prefix + s.strip(), sep == "|") for s in layer.split(sep)]

        def place(m: str, rows=rows):
            return next(((i, s, ind) for i, s, ind in rows if _under(m, [s])), None)

        for a in sorted(graph):
            for b, line in sorted(graph[a].items()):
                pa, pb = place(a), place(b)
                if pa and pb and pb[0] < pa[0]:
                    problems.append(f"{a} (l.{line}) imports {b}, a higher layer")
                elif pa and pb and pa[0] == pb[0] and pa[1] != pb[1] and pa[2]:
                    problems.append(f"{a} (l.{line}) imports {b}, an independent sibling")
        if contract.get("exhaustive"):
            ignored = [prefix + x for x in contract.get("exhaustive_ignores", [])]
            for m in sorted(graph):
                child = m.startswith(prefix) and "." not in m[len(prefix) :]
                if child and not place(m) and m not in ignored:
                    problems.append(f"{m} is in no layer of '{contract['id']}' (add it to pyproject.toml)")
    return problems


def _forbidden(contract: dict, graph: dict) -> list[str]:
    """A `forbidden` contract: no source module reaches a forbidden one, directly or through others."""
    problems = []
    for start in sorted(m for m in graph if _under(m, contract["source_modules"])):
        seen, todo = {start: [start]}, [start]
        while todo:
            m = todo.pop()
            for n in sorted(graph.get(m, {})):
                if n in seen:
                    continue
                seen[n] = [*seen[m], n]
                if _under(n, contract["forbidden_modules"]):
                    problems.append(f"{' -> '.join(seen[n])} (forbidden by '{contract['id']}')")
                else:
                    todo.append(n)
    return problems


def _acyclic(contract: dict, graph: dict) -> list[str]:
    """`acyclic_siblings`, checked more strictly: no cycle at all in the module graph."""
    cycle = find_cycle({m: e for m, e in graph.items() if _under(m, contract["ancestors"])})
    return [f"import cycle: {' -> '.join(cycle)}"] if cycle else []


CHECKS = {"layers": _layers, "forbidden": _forbidden, "acyclic_siblings": _acyclic}


def contract_problems(root: pathlib.Path) -> list[str]:
    """Every broken contract of `root`/pyproject.toml over `root`'s packages, one line each."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(PACKAGES)
    graph = import_graph(root)
    problems = []
    for contract in config["contracts"]:
        assert contract["type"] in CHECKS, f"{contract['type']}: a contract type this test does not check"
        problems += CHECKS[contract["type"]](contract, graph)
    return problems


# ------------------------------------------------------------------------------------------------ tests
def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT)
    assert graph["fastfilm.data.prep"]  # (the graph is read)
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_layer_contracts_hold():
    problems = contract_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph(ROOT)
    assert "fastfilm.files.original" in graph["fastfilm.prepare"]  # only imported inside a function
    assert "fastfilm.prompt" in graph["fastfilm.cli"]  # `from fastfilm import prompt` inside dispatch()


def test_every_module_says_what_it_is_for_and_each_layer_what_it_may_import():
    missing, silent = [], []
    for name, path in modules(ROOT).items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if not doc.strip():
            missing.append(name)
        if path.name == "__init__.py" and name.startswith("fastfilm") and "import" not in doc:
            silent.append(name)  # a layer's __init__: what the layer is for, and what it may import
    assert not missing and not silent, (missing, silent)


def test_the_aliases_are_the_moved_modules():
    import fastfilm.config
    import fastfilm.core.config
    import fastfilm.core.errors
    import fastfilm.core.precision
    import fastfilm.errors
    import fastfilm.precision

    assert fastfilm.config is fastfilm.core.config and fastfilm.config.load_config
    assert fastfilm.errors is fastfilm.core.errors and fastfilm.precision is fastfilm.core.precision


def _tree_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def _plant(root: pathlib.Path, file: str, statement: str) -> None:
    """Append a function whose body is `statement` (an import inside a function) to `file` (made if missing)."""
    path = root / file
    old = path.read_text(encoding="utf-8") if path.exists() else '"""A planted module."""\n'
    path.write_text(old + f"\n\ndef _planted():\n    {statement}\n", encoding="utf-8")


PLANTED = {
    "upward: data → a job": ("fastfilm/data/prep.py", "from fastfilm.train import train", "higher layer"),
    "model → data": ("fastfilm/model.py", "from fastfilm.data import load_vocab", "forbidden by 'model'"),
    "kernels → fastfilm": ("kernels/_common.py", "import fastfilm.core.errors", "forbidden by 'kernels'"),
    "alias inside": (
        "fastfilm/files/export.py",
        "from fastfilm.config import Config",
        "forbidden by 'aliases'",
    ),
    "core → cli": ("fastfilm/core/errors.py", "from fastfilm.cli import main", "forbidden by 'cli'"),
    "cycle among jobs": ("fastfilm/predictions.py", "from fastfilm.evaluate import evaluate", "import cycle"),
    "module in no layer": ("fastfilm/helpers.py", "import os", "fastfilm.helpers is in no layer"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_bad_import_fails_the_contracts(tmp_path, case):
    file, statement, expected = PLANTED[case]
    root = _tree_copy(tmp_path)
    assert contract_problems(root) == []  # the copy keeps them
    _plant(root, file, statement)
    problems = contract_problems(root)
    assert any(expected in p for p in problems), problems


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """`lint-imports` (the script beside this interpreter) on the tree at `root`, with its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lint-imports"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_linter_keeps_the_contracts_and_breaks_on_a_planted_upward_import(tmp_path):
    pytest.importorskip("importlinter")  # setup.py's dev extra; `make lint` runs it on the real tree too
    root = _tree_copy(tmp_path)
    kept = _lint_imports(root)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    _plant(root, "fastfilm/data/prep.py", "from fastfilm.train import train")
    broken = _lint_imports(root)
    assert broken.returncode != 0 and "fastfilm.data.prep -> fastfilm.train" in broken.stdout, broken.stdout

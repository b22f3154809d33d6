"""Put one `bench/gpu_run.sh` run into the repository: its files as they are, and a section of bench/RESULTS_GPU.md
written from them (every figure copied from the run's own files, nothing typed by hand).

    python bench/ingest_gpu_run.py gpu_run.tgz --name 2026-12-07-h200 --command "the device call, verbatim"

SRC is the archive `gpu_run.sh` writes (`ARCHIVE=…`) or its output folder. The files go to `bench/gpu/NAME/`
(refused if that folder exists); the section goes first after RESULTS_GPU.md's introduction (newest first): the
machine and versions (logs/env.log), each step's exit and seconds (summary.tsv), the kernel tests' counts and
failures (kernel_tests.xml), the train step's table (gpu_step.md) and the fused ops side by side (ops.json), as
far as the run has them. A run whose env.log does not show a CUDA device is refused (a CPU dry run's numbers are
not GPU figures) unless `--allow-cpu`, which labels the section so. The findings are the session's to write
under the section.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


class IngestError(Exception):
    """A run that cannot be ingested, said in one line."""


def find_run(root: str) -> str:
    """The folder under `root` (itself included) that holds the run's summary.tsv."""
    for dirpath, _dirs, files in sorted(os.walk(root)):
        if "summary.tsv" in files:
            return dirpath
    raise IngestError(f"{root}: no summary.tsv in it (not a bench/gpu_run.sh output)")


def environment(run: str) -> dict[str, str]:
    """Device, versions and commit from logs/env.log (what `gpu_run.sh`'s env step prints)."""
    path = os.path.join(run, "logs", "env.log")
    if not os.path.exists(path):
        raise IngestError(f'{path}: missing (run the env step: STEPS="env ...")')
    text = open(path, encoding="utf-8", errors="replace").read()
    env: dict[str, str] = {}
    m = re.search(
        r"cuda available: (\w+) \| device: (.*?) \| torch\.version\.cuda: (\S+) \| cudnn: (\S+)", text
    )
    if m:
        env.update(cuda=m.group(1), device=m.group(2), cuda_version=m.group(3), cudnn=m.group(4))
    for name in ("torch", "triton", "deepspeed", "nvidia.dali"):
        m = re.search(rf"^  {re.escape(name)}\s+(\S+)", text, re.M)
        if m:
            env[name] = m.group(1) if m.group(1) != "MISSING" else "missing"
    m = re.search(r"^repo: .*\((\w+)\)", text, re.M)
    if m:
        env["commit"] = m.group(1)
    m = re.search(r"^python (\S+)", text, re.M)
    if m:
        env["python"] = m.group(1)
    m = re.search(r"^nproc: (\d+)", text, re.M)
    if m:
        env["cpus"] = m.group(1)
    return env


def steps_table(run: str) -> list[str]:
    rows = [
        line.rstrip("\n").split("\t") for line in open(os.path.join(run, "summary.tsv"), encoding="utf-8")
    ]
    out = ["| step | exit | seconds |", "| --- | ---: | ---: |"]
    out += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows[1:] if len(r) >= 3]
    return out


def kernel_tests(run: str) -> list[str]:
    path = os.path.join(run, "kernel_tests.xml")
    if not os.path.exists(path):
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return [
            "### Kernel tests",
            "",
            f"`kernel_tests.xml` unreadable ({e}): the step was cut off; see its log.",
        ]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = [
        f"{c.get('classname', '')}::{c.get('name', '')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    out = [
        "### Kernel tests (`pytest tests/kernels`, compiled Triton)",
        "",
        f"**{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped** "
        "(`kernel_tests.xml`; the log: `logs/kernel_tests.log`).",
    ]
    if failed:
        out += ["", "Failed:", ""] + [f"- `{f}`" for f in failed[:40]]
        if len(failed) > 40:
            out.append(f"- … and {len(failed) - 40} more (kernel_tests.xml)")
    return out


def gpu_step(run: str) -> list[str]:
    path = os.path.join(run, "gpu_step.md")
    if not os.path.exists(path):
        return []
    lines = open(path, encoding="utf-8").read().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return ["### The train step (`bench/gpu_step.py`: `gpu_step.md`, `gpu_step.json`)", *lines]


def ops(run: str) -> list[str]:
    path = os.path.join(run, "ops.json")
    if not os.path.exists(path):
        return []
    data = json.load(open(path, encoding="utf-8"))
    by_group: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        impl = b.get("extra_info", {}).get("impl") or b["name"]
        by_group[b["group"]][impl] = b["stats"]["median"]
    impls = sorted({i for g in by_group.values() for i in g}, key=lambda i: (i != "reference", i))
    header = ["group", *impls, *(f"{i} ÷ reference" for i in impls[1:])]
    out = [
        "### The fused ops (`pytest bench/test_ops.py`: `ops.json`), median ms",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for group in sorted(by_group):
        g = by_group[group]
        cells = [f"{g[i] * 1e3:.4f}" if i in g else "" for i in impls]
        ratios = [f"{g[i] / g['reference']:.2f}" if i in g and g.get("reference") else "" for i in impls[1:]]
        out.append(f"| {group} | " + " | ".join(cells + ratios) + " |")
    return out


def extras(run: str) -> list[str]:
    """The run's notes, its training summary, and a line naming every other result file in the folder."""
    out: list[str] = []
    notes = os.path.join(run, "NOTES.txt")
    if os.path.exists(notes) and open(notes, encoding="utf-8").read().strip():
        out += ["Notes from the run (`NOTES.txt`):", ""]
        out += [f"- {line}" for line in open(notes, encoding="utf-8").read().strip().splitlines()]
        out.append("")
    train = os.path.join(run, "train_summary.md")
    if os.path.exists(train) and open(train, encoding="utf-8").read().strip():
        out += [
            "### Training (`train_summary.md`; `train/MODE/` per mode)",
            "",
            "On `fastfilm synth`'s set, whose questions are shorter than CLEVR's (11 tokens on average, at most 20, "
            "against 20.4 and 46): its questions/s are not the paper step's (the train step above is).",
            "",
        ]
        out += open(train, encoding="utf-8").read().strip().splitlines() + [""]
    known = {"summary.tsv", "summary.txt", "NOTES.txt", "kernel_tests.xml", "gpu_step.md", "gpu_step.json",
             "ops.json", "train_summary.md", "logs"}  # fmt: skip
    other = sorted(f for f in os.listdir(run) if f not in known)
    if other:
        out.append("Also in the folder: " + ", ".join(f"`{f}`" for f in other) + ".")
    return out[:-1] if out and out[-1] == "" else out


def section(run: str, name: str, command: str | None, allow_cpu: bool) -> str:
    env = environment(run)
    if env.get("cuda") != "True":
        if not allow_cpu:
            raise IngestError(
                f"{run}: logs/env.log shows no CUDA device (cuda available: {env.get('cuda', 'not found')}): its "
                "numbers are not GPU figures (--allow-cpu to ingest a dry run, labelled so)"
            )
    versions = ", ".join(
        f"{k} {env[k]}" for k in ("python", "torch", "triton", "deepspeed", "nvidia.dali") if k in env
    )
    head = [
        f"## {name}, {env.get('device', 'unknown device')} (main at {env.get('commit', '?')})",
        "",
    ]
    if env.get("cuda") != "True":
        head += ["**A CPU dry run (`--allow-cpu`): none of its numbers is a GPU figure.**", ""]
    head += [
        f"Machine: {env.get('device', '?')}, {env.get('cpus', '?')} CPU cores; CUDA {env.get('cuda_version', '?')}, "
        f"cuDNN {env.get('cudnn', '?')}; {versions}. Raw files: `bench/gpu/{name}/` (as the run wrote them; "
        "`logs/env.log` is the whole environment). This section was written by `bench/ingest_gpu_run.py` from "
        "those files.",
        "",
    ]
    if command:
        head += ["Command:", "", "```", command, "```", ""]
    head.pop()  # the parts are joined with a blank line
    parts = [head, steps_table(run), kernel_tests(run), gpu_step(run), ops(run), extras(run)]
    return "\n".join("\n".join(p) + "\n" for p in parts if p).rstrip("\n") + "\n"


def insert(results: str, text: str) -> str:
    """RESULTS_GPU.md with `text` as its first section (after the introduction)."""
    body = open(results, encoding="utf-8").read()
    at = body.find("\n## ")
    at = len(body) if at < 0 else at + 1
    return body[:at] + text + "\n" + body[at:]


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def ingest(src: str, name: str, results: str, dest_root: str, command: str | None, allow_cpu: bool) -> str:
    """Copy the run into dest_root/name and put its section into `results`; returns the section."""
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}-[a-z0-9][a-z0-9-]*", name):
        raise IngestError(f"--name {name!r}: DATE-DEVICE, e.g. 2026-12-07-h200")
    dest = os.path.join(dest_root, name)
    if os.path.exists(dest):
        raise IngestError(f"{dest}: exists already (one folder per run)")
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(src):
            try:
                with tarfile.open(src) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise IngestError(f"{src}: not a readable archive ({e})") from e
            root = tmp
        elif os.path.isdir(src):
            root = src
        else:
            raise IngestError(f"{src}: no such file or folder")
        run = find_run(root)
        text = section(run, name, command, allow_cpu)
        staging = f"{dest}.tmp{os.getpid()}"
        # the device tool hands its files back read-only: the copies get ordinary permissions
        shutil.copytree(run, staging, copy_function=shutil.copyfile)
        for dirpath, _dirs, _files in os.walk(staging):
            os.chmod(dirpath, 0o755)
        os.replace(staging, dest)
    write_atomic(results, insert(results, text))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="gpu_run.sh's archive (.tgz) or its output folder")
    p.add_argument(
        "--name", required=True, help="DATE-DEVICE, the folder under bench/gpu/ (e.g. 2026-12-07-h200)"
    )
    p.add_argument("--command", default=None, help="the device call as run, quoted in the section")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS_GPU.md"))
    p.add_argument("--dest-root", default=os.path.join(HERE, "gpu"))
    p.add_argument("--allow-cpu", action="store_true", help="ingest a CPU dry run (labelled so; for tests)")
    args = p.parse_args(argv)
    try:
        text = ingest(args.src, args.name, args.results, args.dest_root, args.command, args.allow_cpu)
    except IngestError as e:
        print(f"ingest_gpu_run: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"-> {os.path.join(args.dest_root, args.name)}/ and {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Safe loading: nothing a user hands fastfilm is unpickled; tampered or crafted checkpoints are refused."""

import os
import pickle
import re
import subprocess

import pytest
import torch

from fastfilm.files import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Exploit:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_checkpoint(folder):
    os.makedirs(folder)
    torch.save({"module": {"w": torch.ones(2)}}, os.path.join(folder, "mp_rank_00_model_states.pt"))
    ckpt.atomic_write_json(os.path.join(folder, "trainer_state.json"), {"step": 1})
    ckpt.write_manifest(folder)


def test_good_checkpoint_passes(tmp_path):
    folder = str(tmp_path / "last")
    make_checkpoint(folder)
    ckpt.verify(folder)
    ckpt.check_pickles(folder)


def test_crafted_pickle_is_refused_without_running(tmp_path):
    folder = str(tmp_path / "last")
    make_checkpoint(folder)
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, "mp_rank_00_model_states.pt"), "wb") as f:
        pickle.dump({"module": Exploit(str(marker))}, f)
    ckpt.write_manifest(folder)  # even with a matching manifest (an attacker can compute sha256s)
    with pytest.raises(ckpt.CheckpointError, match="refused: not loadable with weights_only=True"):
        ckpt.check_pickles(folder)
    assert not marker.exists()


def test_crafted_torch_save_is_refused(tmp_path):
    folder = str(tmp_path / "last")
    make_checkpoint(folder)
    marker = tmp_path / "pwned2"
    torch.save({"module": Exploit(str(marker))}, os.path.join(folder, "mp_rank_00_model_states.pt"))
    ckpt.write_manifest(folder)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.check_pickles(folder)
    assert not marker.exists()


def test_tampered_file_is_refused(tmp_path):
    folder = str(tmp_path / "last")
    make_checkpoint(folder)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        f.write('{"step": 999}')
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        ckpt.verify(folder)


def test_extra_or_missing_files_are_refused(tmp_path):
    folder = str(tmp_path / "last")
    make_checkpoint(folder)
    open(os.path.join(folder, "evil.pt"), "wb").close()
    with pytest.raises(ckpt.CheckpointError, match="not in the manifest"):
        ckpt.verify(folder)
    os.remove(os.path.join(folder, "evil.pt"))
    os.remove(os.path.join(folder, "trainer_state.json"))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.verify(folder)


def test_no_unsafe_deserialisation_in_the_code():
    # Every torch.load passes weights_only=True; no pickle.load(s) and no numpy allow_pickle=True anywhere.
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    files += [
        os.path.relpath(os.path.join(d, f), ROOT)
        for top in ("fastfilm", "kernels", "bench")
        for d, _, fs in os.walk(os.path.join(ROOT, top))
        for f in fs
        if f.endswith(".py")
    ]
    offenders = []
    for rel in sorted(set(files)):
        if rel.startswith("tests/reliability/"):
            continue  # these tests build malicious pickles on purpose
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{rel}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\.", r"\bjoblib\.load\("):
            offenders += [f"{rel}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not offenders, offenders

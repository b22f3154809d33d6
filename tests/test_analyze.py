"""`fastfilm analyze` on a tiny trained model: every artefact is produced and its numbers are sane."""

import json
import os

from fastfilm.cli import main as cli
from fastfilm.config import config_from_dict
from fastfilm.train import train
from tests.test_train import tiny_config


def test_analyze_produces_every_artefact(dataset, tmp_path):
    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, epochs=1)))
    model = tmp_path / "model"
    assert cli(["export", "--checkpoint", str(run), "--out", str(model)]) == 0
    out = tmp_path / "analysis"
    assert (
        cli(["analyze", "--model", str(model), "--split", "val", "--out", str(out), "--max-questions", "18"])
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["questions"] == 18
    for p in s["histograms"] + s["tsne"] + s["activation_maps"]:
        assert os.path.getsize(p) > 1000 and p.endswith(".png")
    assert len(s["tsne"]) == 2 and len(s["layer_stats"]) == 2  # one per ResBlock
    for r in s["layer_stats"]:
        assert r["gamma_std"] >= 0 and 0 <= r["gamma_negative"] <= 1 and 0 <= r["gamma_near_zero"] <= 1
    ab = s["ablations"]
    assert {"baseline", "beta=train mean", "gamma=train mean", "gamma+N(0,1.0)", "beta+N(0,0.1)"} <= set(ab)
    assert ab["baseline"]["drop"]["overall"] == 0
    for r in ab.values():
        assert 0 <= r["accuracy"]["overall"] <= 1
    a = s["arithmetic"]
    assert 0 <= a["accuracy_arithmetic"] <= 1 and 0 <= a["accuracy_plain"] <= 1 and a["images"] > 0
    # Words of the shipped example that this tiny set's vocabulary lacks are reported, not silently <UNK>ed.
    from fastfilm.analyze import ARITHMETIC_EXAMPLE
    from fastfilm.data import load_vocab
    from fastfilm.data.tokenize import tokenize

    qv = load_vocab(str(dataset / "cache"))["question_token_to_idx"]
    words = {w for k in ("q1", "q2", "q3", "target") for w in tokenize(ARITHMETIC_EXAMPLE[k])}
    assert a["unknown"] == sorted(w for w in words if w not in qv)
    md = (out / "summary.md").read_text()
    assert "Test-time ablations" in md and "FiLM arithmetic" in md

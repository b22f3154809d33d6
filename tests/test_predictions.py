"""`fastfilm eval --predictions/--predictions-json`: CLEVR's answer-file format, scored as CLEVR's script does,
and a CoGenT-style synthetic set through prep → train → eval on valA and valB."""

import json
import os

import pytest

from fastfilm.cli import main
from fastfilm.config import config_from_dict
from fastfilm.train import train
from tests.test_train import tiny_config


def clevr_score(questions_file, answers_file):
    """What CLEVR_eval_with_q_type.py computes: one answer per line against the questions file's answers."""
    with open(questions_file) as f:
        true = [q["answer"] for q in json.load(f)["questions"]]
    with open(answers_file) as f:
        pred = [line.strip() for line in f]
    assert len(true) == len(pred), f"expected {len(true)} answers but got {len(pred)}"
    return sum(t == p for t, p in zip(true, pred)) / len(true)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("pred") / "run"
    train(config_from_dict(tiny_config(dataset, run, epochs=1)))
    return run


def test_predictions_file_scores_as_eval(dataset, trained, tmp_path, monkeypatch):
    import fastfilm.evaluate

    preds, js, res = tmp_path / "val.txt", tmp_path / "val.jsonl", tmp_path / "val.json"
    plain = tmp_path / "plain.json"
    assert main(["eval", "--checkpoint", str(trained), "--split", "val", "--json", str(plain)]) == 0

    def second_pass(*a, **k):
        raise AssertionError("eval --predictions ran the model over the split a second time")

    monkeypatch.setattr(fastfilm.evaluate, "evaluate", second_pass)  # scored from the predictions' own pass
    args = ["eval", "--checkpoint", str(trained), "--split", "val", "--json", str(res)]
    assert main([*args, "--predictions", str(preds), "--predictions-json", str(js)]) == 0
    assert json.loads(res.read_text()) == json.loads(plain.read_text())  # the same table, every family
    acc = json.loads(res.read_text())["accuracy"]
    qfile = dataset / "clevr" / "questions" / "CLEVR_val_questions.json"
    assert clevr_score(qfile, preds) == acc
    questions = json.loads(qfile.read_text())["questions"]
    records = [json.loads(x) for x in js.read_text().splitlines()]
    assert len(records) == len(questions)
    for q, r, line in zip(questions, records, preds.read_text().splitlines()):
        assert r["question_index"] == q["question_index"] and r["question"] == q["question"]
        assert r["image"] == q["image_filename"] and r["answer"] == line
        assert r["expected"] in (q["answer"], "<UNK>")  # <UNK>: an answer the tiny train split never has
        assert len(r["top5"]) == 5 and r["top5"][0][0] == line
        probs = [p for _, p in r["top5"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_test_split_writes_one_line_per_question(dataset, trained, tmp_path, capsys):
    preds = tmp_path / "test.txt"
    assert main(["eval", "--checkpoint", str(trained), "--split", "test", "--predictions", str(preds)]) == 0
    n = len(json.loads((dataset / "clevr/questions/CLEVR_test_questions.json").read_text())["questions"])
    lines = preds.read_text().splitlines()
    assert len(lines) == n and all(lines)
    out = capsys.readouterr().out
    assert "no accuracy" in out and "overall" not in out


def test_cogent_style_set_prep_train_eval(tmp_path):
    from fastfilm.data import synth

    root, cache = tmp_path / "cogent", tmp_path / "cache"
    args = ["synth", "--out", str(root), "--cogent", "--train-images", "16", "--val-images", "6"]
    assert main([*args, "--test-images", "2", "--questions-per-image", "3", "--workers", "1"]) == 0
    for split in synth.COGENT_SPLITS:
        scenes = json.loads((root / "scenes" / f"CLEVR_{split}_scenes.json").read_text())["scenes"]
        allowed = synth.COGENT_COLORS[split[-1]]
        for o in (o for s in scenes for o in s["objects"]):
            assert o["color"] in allowed.get(o["shape"], synth.VALUES["color"]), (split, o)
    assert not (root / "questions" / "CLEVR_train_questions.json").exists()
    assert (
        main(["prep", "--clevr", str(root), "--out", str(cache), "--image-size", "32", "--workers", "1"]) == 0
    )
    assert {f"{s}_questions.npz" for s in synth.COGENT_SPLITS} <= set(os.listdir(cache))
    raw = tiny_config(tmp_path, tmp_path / "run", epochs=1)
    raw["data"].update(root=str(root), cache=str(cache), train_split="trainA", val_split="valA")
    train(config_from_dict(raw))
    for split in ("valA", "valB"):
        res = tmp_path / f"{split}.json"
        assert (
            main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", split, "--json", str(res)]) == 0
        )
        r = json.loads(res.read_text())
        assert r["split"] == split and r["total"] == 18


def test_eval_runs_a_bf16_model_in_fp32_on_a_cpu_without_bf16(trained, tmp_path, monkeypatch, capsys):
    """`--precision auto` (the default) on a CPU that only emulates bf16: float32, said in one line; `model`
    keeps the model's bf16. Both the accuracy pass and the predictions pass get the choice."""
    import torch

    import fastfilm.evaluate
    import fastfilm.files.export as export
    import fastfilm.predictions
    from tests.test_prompt import as_avx2_cpu

    load = export.load_model_folder

    def bf16_model(*a, **k):
        model, cfg, vocab = load(*a, **k)
        cfg.deepspeed["bf16"] = {"enabled": True}
        return model, cfg, vocab

    seen = []

    def spy(module, name):  # record the autocast dtype (4th argument) each pass is given
        real = getattr(module, name)

        def call(*a, **k):
            seen.append(a[3])
            return real(*a, **k)

        monkeypatch.setattr(module, name, call)

    monkeypatch.setattr(export, "load_model_folder", bf16_model)
    spy(fastfilm.evaluate, "evaluate")
    spy(fastfilm.predictions, "predict_split")
    as_avx2_cpu(monkeypatch)
    args = ["eval", "--checkpoint", str(trained), "--split", "val"]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["precision"] == "fp32"  # recorded with the accuracy
    err = capsys.readouterr().err
    assert (
        seen == [None] and "precision: fp32 (the model's bf16, but this CPU has no bf16 instructions" in err
    )
    assert main([*args, "--precision", "model", "--predictions", str(tmp_path / "p.txt")]) == 0
    assert seen == [None, torch.bfloat16] and "precision:" not in capsys.readouterr().err

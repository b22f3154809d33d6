"""Mistakes a user makes with the commands that read a trained model (eval, export, predict, analyze): one line
on stderr naming the file or option and what was expected, exit status 2, no traceback, and nothing that already
existed is deleted or overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastfilm.cli import main as cli
from fastfilm.config import config_from_dict
from fastfilm.train import train
from tests.test_train import ROOT, clean_env, tiny_config


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """(run folder after 2 steps, an export of its `last`)."""
    d = tmp_path_factory.mktemp("usage")
    run = d / "run"
    train(config_from_dict(tiny_config(dataset, run, max_steps=2, eval_every=2)))
    model = d / "model"
    assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(model)]) == 0
    return run, model


def one_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("fastfilm: "), err
    return err[0]


def test_export_refuses_a_folder_or_file_it_did_not_write(trained, tmp_path, capsys):
    run, _ = trained
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(precious)]) == 2
    line = one_line(capsys)
    assert str(precious) in line and "notes.txt" in line
    assert os.listdir(precious) == ["notes.txt"] and (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(a_file)]) == 2
    assert str(a_file) in one_line(capsys) and a_file.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "precious"]  # no temp folders left


def test_export_replaces_an_earlier_export_and_eval_takes_it(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "model"
    for _ in range(2):  # the second export replaces the first
        assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(out)]) == 0
    names = ["config.json", "manifest.json", "model.safetensors", "vocab.json"]
    assert sorted(os.listdir(out)) == names
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(out), "--split", "val"]) == 0
    assert "overall" in capsys.readouterr().out
    shutil.rmtree(out)


@pytest.mark.parametrize("option", ["--json", "--predictions", "--predictions-json"])
def test_eval_output_that_cannot_be_written_is_one_line_before_evaluating(trained, tmp_path, capsys, option):
    run, _ = trained
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for target in (folder, a_file / "out.txt"):
        assert cli(["eval", "--checkpoint", str(run), "--tag", "last", option, str(target)]) == 2
        line = one_line(capsys)
        assert option in line and str(target) in line, line
    assert os.listdir(folder) == ["keep.txt"] and a_file.read_text() == "keep"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("vocab.json", "[1, 2]", "question_token_to_idx"),
        ("vocab.json", '{"question_token_to_idx": {"a": 0}}', "answer_token_to_idx"),
        ("config.json", '{"model": {"module_dim": 7}}', "Missing key(s)"),
    ],
    ids=["vocab-list", "vocab-no-answers", "config-other-model"],
)
def test_model_folder_that_does_not_describe_its_weights_is_one_line(
    trained, tmp_path, capsys, name, text, expected
):
    _, model = trained
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    os.remove(folder / "manifest.json")
    (folder / name).write_text(text)
    img = tmp_path / "never-read.png"  # the model folder is refused first
    argv = ["predict", "--model", str(folder), "--image", str(img), "--question", "What color is it?"]
    assert cli(argv) == 2
    line = one_line(capsys)
    assert str(folder) in line and expected in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without a GPU")
def test_eval_with_triton_kernels_on_cpu_uses_the_interpreter_as_train_does(trained):
    """`eval --kernels triton` without a GPU or TRITON_INTERPRET: one warning line and the interpreter (was a
    traceback from the kernels at the first forward)."""
    run, _ = trained
    env = {k: v for k, v in clean_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", "eval", "--checkpoint", str(run), "--tag", "last", "--kernels", "triton"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("fastfilm: warning: kernels=triton")]
    assert len(warnings) == 1 and "overall" in proc.stdout


@pytest.mark.parametrize("command", ["synth", "prep", "analyze", "features"])
def test_output_folder_that_is_a_file_is_one_line(dataset, trained, tmp_path, capsys, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    out = str(a_file)
    argv = {
        "synth": ["synth", "--out", out, "--train-images", "2", "--workers", "1"],
        "prep": ["prep", "--clevr", str(dataset / "clevr"), "--out", out, "--workers", "1"],
        "analyze": ["analyze", "--model", str(trained[1]), "--out", out],
        "features": [
            "features",
            "--clevr",
            str(dataset / "clevr"),
            "--out",
            out,
            "--weights",
            "never-read.pth",
        ],
    }[command]
    assert cli(argv) == 2
    line = one_line(capsys)
    assert f"{command} --out {out}" in line and "not a folder" in line, line
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("count", ["0", "2", "-5"])
def test_analyze_with_too_few_questions_is_one_line(trained, tmp_path, capsys, count):
    out = tmp_path / "analysis"
    assert cli(["analyze", "--model", str(trained[1]), "--out", str(out), "--max-questions", count]) == 2
    line = one_line(capsys)
    assert f"--max-questions {count}" in line and ">= 3" in line, line
    assert not out.exists()


def test_analyze_on_a_split_without_answers_skips_the_ablations(trained, tmp_path, capsys):
    """`analyze --split test` (no answers, as CLEVR's): the ablations say so instead of a table of 0% rows."""
    out = tmp_path / "analysis"
    assert (
        cli(
            [
                "analyze",
                "--model",
                str(trained[1]),
                "--out",
                str(out),
                "--split",
                "test",
                "--max-questions",
                "6",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ablations"] == {"skipped": "the test split has no answers"}
    assert "Skipped: the test split has no answers." in (out / "summary.md").read_text()


def test_eval_of_a_split_without_answers_is_one_clean_line(trained, capsys):
    """`eval --split test` (no answers): the progress bar is cleared before the one error line, which names
    --predictions (the error used to follow the bar's text on the same terminal line)."""
    run, _ = trained
    assert cli(["eval", "--checkpoint", str(run), "--tag", "last", "--split", "test"]) == 2
    lines = [x.split("\r")[-1] for x in capsys.readouterr().err.split("\n") if x.split("\r")[-1].strip()]
    assert len(lines) == 1 and lines[0].startswith("fastfilm: data error: test: this split has no answers"), (
        lines
    )
    assert "--predictions FILE" in lines[0]


def test_a_missing_tag_names_the_tags_the_run_has(trained, tmp_path, capsys):
    """`eval` of a run stopped before its first evaluation (no `best` yet): the line says to use --tag last."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "checkpoints" / "best")
    assert cli(["eval", "--checkpoint", str(run)]) == 2
    line = one_line(capsys)
    assert "no checkpoint with tag 'best'" in line and line.endswith("it has last: use --tag last"), line
    from fastfilm.files.checkpoint import CheckpointError, find_checkpoint

    with pytest.raises(CheckpointError) as e:  # train.init_from and prep --vocab-from have no --tag
        find_checkpoint(str(run))
    assert str(e.value).endswith(f"it has last: give {run}/checkpoints/last"), e.value


@pytest.mark.parametrize("command", ["predict", "analyze"])
def test_a_run_folder_given_for_a_model_folder_says_what_to_give(trained, tmp_path, capsys, command):
    run, _ = trained
    argv = {
        "predict": ["predict", "--model", str(run), "--image", "x.png", "--question", "What color is it?"],
        "analyze": ["analyze", "--model", str(run), "--out", str(tmp_path / "a")],
    }[command]
    assert cli(argv) == 2
    line = one_line(capsys)
    assert f"{run} is a run folder: give {run}/checkpoints/best" in line and "fastfilm export" in line, line


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_model_whose_cache_is_elsewhere_points_at_cache(trained, tmp_path, capsys, command):
    """A model folder from another machine (or import-original's default data.cache): the line says to pass
    --cache (it said to run `fastfilm prep` into the missing folder)."""
    from fastfilm.files.checkpoint import write_manifest

    folder = tmp_path / "model"
    shutil.copytree(trained[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["data"]["cache"] = str(tmp_path / "elsewhere" / "cache")
    (folder / "config.json").write_text(json.dumps(cfg))
    write_manifest(str(folder))
    argv = {
        "eval": ["eval", "--checkpoint", str(folder)],
        "analyze": ["analyze", "--model", str(folder), "--out", str(tmp_path / "a")],
    }[command]
    assert cli(argv) == 2
    line = one_line(capsys)
    assert "elsewhere" in line and "--cache CACHE" in line, line


def test_eval_json_of_a_split_without_answers_says_it_is_not_written(trained, tmp_path, capsys):
    run, _ = trained
    answers, result = tmp_path / "test.txt", tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(run), "--tag", "last", "--split", "test"]
    assert cli([*argv, "--predictions", str(answers), "--json", str(result)]) == 0
    assert answers.is_file() and not result.exists()
    assert f"--json {result} not written: test has no answers" in capsys.readouterr().err

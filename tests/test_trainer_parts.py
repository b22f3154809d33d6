"""The trainer's parts: one precision for train/eval/predict, the loader factory, errors as one line, and the
guard that keeps functions short."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fastfilm.config import config_from_dict
from fastfilm.train import train
from tests.test_train import ROOT, clean_env, tiny_config


def test_fp16_model_is_evaluated_under_fp16_autocast(dataset, tmp_path, monkeypatch):
    import fastfilm.files.export as export
    from fastfilm.cli import main as cli

    raw = tiny_config(dataset, tmp_path / "fp16", max_steps=2, eval_every=2)
    raw["deepspeed"]["fp16"] = {"enabled": True, "initial_scale_power": 8}
    train(config_from_dict(raw))
    seen = []
    real = export.load_model_folder

    def load_and_watch(folder, kernels=None):
        model, cfg, vocab = real(folder, kernels)
        model.register_forward_pre_hook(
            lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        )
        return model, cfg, vocab

    monkeypatch.setattr(export, "load_model_folder", load_and_watch)
    # "model": on a CPU without fp16 instructions "auto" would run float32 (test_auto)
    assert cli(["eval", "--checkpoint", str(tmp_path / "fp16"), "--tag", "last", "--precision", "model"]) == 0
    assert seen and all(s == (True, torch.float16) for s in seen), seen


@pytest.mark.parametrize(
    "device, current, expected",
    [("cpu", None, None), (("cuda", 3), None, 3), ("cuda", 1, 1)],
    ids=["cpu", "cuda:3", "cuda-current"],
)
def test_loader_factory_gives_the_rank_its_gpu(device, current, expected, monkeypatch):
    import fastfilm.data.loader as loader

    calls = []
    monkeypatch.setattr(loader, "build_loader", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    cfg = config_from_dict({"data": {"prefetch": 3}, "train": {"seed": 5}})
    dev = torch.device(*device) if isinstance(device, tuple) else torch.device(device)
    loader.loader_for(cfg, "val", train=False, device=dev, shard_id=1, num_shards=2)
    (args, kw) = calls[0]
    assert args == (cfg.data.cache, "val", 64)
    assert kw["device_id"] == expected
    assert (kw["shard_id"], kw["num_shards"], kw["prefetch"], kw["seed"]) == (1, 2, 3, 5)
    assert (kw["shuffle"], kw["drop_last"]) == (False, False)


def test_triton_kernels_on_cpu_without_the_interpreter_variable(dataset, tmp_path):
    """No GPU and no TRITON_INTERPRET: the trainer switches the interpreter on with one warning line."""
    cfg = tmp_path / "triton.json"
    raw = tiny_config(dataset, tmp_path / "run", max_steps=1)
    raw["model"].update(num_blocks=1)
    cfg.write_text(json.dumps(raw))
    env = {k: v for k, v in clean_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", "train", "--config", str(cfg), "--kernels", "triton"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("fastfilm: warning: kernels=triton")]
    assert len(warnings) == 1 and "interpreter" in warnings[0]
    assert "kernels=triton" in proc.stdout


@pytest.mark.parametrize("first", ["", "import triton"], ids=["fresh", "triton-imported"])
def test_triton_mode_on_cpu_needs_the_interpreter_before_triton(first):
    """Without a GPU, kernels.mode=triton switches the interpreter on only while triton is not imported: triton's own
    jit functions (tl.zeros, ...) are made for the compiler at its import and fail inside an interpreted kernel
    (bench/gpu_step.py's CPU shape-check did that: benchlib imported triton for its version). Afterwards: one line."""
    code = f"""
import torch
{first}
from fastfilm.config import config_from_dict
from fastfilm.core.config import ConfigError
from fastfilm.core.kernel_mode import check_kernels_mode
try:
    check_kernels_mode(config_from_dict({{"kernels": {{"mode": "triton"}}}}))
except ConfigError as e:
    print("REFUSED", e)
    raise SystemExit(0)
from kernels.bn_film_relu import bn_film_relu
z = torch.randn(2, 3, 4, 4)
y = bn_film_relu(z, torch.ones(2, 3), torch.zeros(2, 3), None, None, None, training=True)
print("RAN", torch.allclose(y, torch.relu(torch.nn.functional.batch_norm(z, None, None, training=True))))
"""
    env = {k: v for k, v in clean_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if first:
        assert proc.stdout.startswith("REFUSED"), proc.stdout
        assert "TRITON_INTERPRET=1 set before triton is imported" in proc.stdout
    else:
        assert proc.stdout.strip() == "RAN True", (proc.stdout, proc.stderr[-2000:])
        assert "fastfilm: warning: kernels=triton without a GPU" in proc.stderr


@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_missing_model_file_is_one_line_and_exit_2(dataset, tmp_path, command):
    from fastfilm.cli import main as cli

    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, max_steps=1)))
    folder = tmp_path / "model"
    assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(folder)]) == 0
    os.remove(folder / "vocab.json")
    img = dataset / "clevr" / "images" / "val" / "CLEVR_val_000000.png"
    argv = {
        "eval": ["eval", "--checkpoint", str(folder)],
        "export": ["export", "--checkpoint", str(folder), "--out", str(tmp_path / "again")],
        "predict": ["predict", "--model", str(folder), "--image", str(img), "--question", "What color?"],
    }[command]
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "[WARNING]" not in x]
    assert len(lines) == 1 and lines[0].startswith("fastfilm: ") and "Traceback" not in proc.stderr, lines
    assert str(folder) in lines[0]


def test_predict_with_an_unreadable_image_is_one_line(dataset, tmp_path):
    from fastfilm.cli import main as cli

    run, folder = tmp_path / "run", tmp_path / "model"
    train(config_from_dict(tiny_config(dataset, run, max_steps=1)))
    assert cli(["export", "--checkpoint", str(run), "--tag", "last", "--out", str(folder)]) == 0
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    proc = subprocess.run(
        [sys.executable, "-m", "fastfilm", "predict", "--model", str(folder), "--image", str(bad),
         "--question", "What color is it?"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"fastfilm: data error: {bad}: cannot read the image" in proc.stderr


def test_deepspeed_defaults_are_merged_key_by_key():
    cfg = config_from_dict({"deepspeed": {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}})
    assert cfg.deepspeed["optimizer"]["params"] == {
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-5,
    }  # fmt: skip
    assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 64 and cfg.lr == 1e-3
    only_global = config_from_dict({"deepspeed": {"train_batch_size": 32}})
    assert "train_micro_batch_size_per_gpu" not in only_global.deepspeed  # derived per world size
    only_global.resolve_batch(2)
    assert only_global.batch_size == 16


def test_mixed_precision_reduces_gradients_in_float32_unless_asked():
    from fastfilm.train import deepspeed_config

    ds = deepspeed_config(config_from_dict({"deepspeed": {"bf16": {"enabled": True}}}))
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False} and "optimizer" not in ds
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    opt_in = {"lower_precision_safe_modules": ["torch.nn.Linear"]}
    ds = deepspeed_config(
        config_from_dict({"deepspeed": {"fp16": {"enabled": True}, "torch_autocast": opt_in}})
    )
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16", **opt_in}
    assert "torch_autocast" not in deepspeed_config(config_from_dict({}))


class OneBatch:
    """A loader of one batch with the given answers and families (what `evaluate` reads)."""

    split = "val"

    def __init__(self, answers, families):
        self.answers, self.families = torch.tensor(answers), torch.tensor(families)

    def epoch(self, epoch):
        n = len(self.answers)
        yield {
            "image": torch.zeros(n, 1),
            "question": torch.zeros(n, 1, dtype=torch.long),
            "length": torch.ones(n, dtype=torch.long),
            "answer": self.answers,
            "family": self.families,
        }


def test_unknown_family_is_its_own_row():
    from fastfilm.evaluate import evaluate

    model = torch.nn.Module()
    model.forward = lambda images, q, lengths: torch.tensor([[1.0, 0.0]] * 4)  # always answers 0
    result = evaluate(
        model, OneBatch([0, 1, 0, 1], [0, -1, 0, -1]), torch.device("cpu"), family_names=["exist"]
    )
    assert result["families"]["exist"] == {"correct": 2, "total": 2, "accuracy": 1.0}
    assert result["families"]["unknown"] == {"correct": 0, "total": 2, "accuracy": 0.0}
    assert result["total"] == 4


def test_an_answer_outside_the_training_answers_is_never_correct():
    from fastfilm.evaluate import UNK_ANSWER, evaluate

    model = torch.nn.Module()
    logits = torch.zeros(2, 8)
    logits[0, UNK_ANSWER] = logits[1, 5] = 1.0  # the model "predicts" <UNK> for the first, 5 for the second
    model.forward = lambda images, q, lengths: logits
    result = evaluate(model, OneBatch([UNK_ANSWER, 5], [0, 0]), torch.device("cpu"))
    assert (result["correct"], result["total"]) == (1, 2)


# Functions allowed past 80 lines: declarative tables (argparse definitions).
LONG_ALLOWED = {("fastfilm/cli.py", "build_parser")}


def test_no_function_in_fastfilm_is_longer_than_80_lines():
    long = []
    for path in sorted(pathlib.Path(ROOT, "fastfilm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and (rel, node.name) not in LONG_ALLOWED:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_eval_shows_a_progress_bar_unless_disabled(dataset, tmp_path, capsys, monkeypatch):
    """`fastfilm eval` (and --predictions) shows a tqdm bar on stderr; `train.progress: false` hides the one of the
    evaluations inside training; TQDM_DISABLE=1 hides the bars that set `disable` themselves (train's, eval's)."""
    from fastfilm.cli import main as cli

    run = tmp_path / "run"
    train(config_from_dict(tiny_config(dataset, run, max_steps=2, eval_every=2)))  # progress: false
    assert "eval val" not in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run), "--tag", "last"]) == 0
    assert "eval val" in capsys.readouterr().err
    assert (
        cli(["eval", "--checkpoint", str(run), "--tag", "last", "--predictions", str(tmp_path / "p.txt")])
        == 0
    )
    # one pass (the accuracy is scored from the predictions): one bar started; a slow machine redraws it more often
    assert len(re.findall(r"eval val:\s+0%", capsys.readouterr().err)) == 1
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert cli(["eval", "--checkpoint", str(run), "--tag", "last"]) == 0
    assert "eval val" not in capsys.readouterr().err
    raw = tiny_config(dataset, tmp_path / "run2", max_steps=2, eval_every=2)
    raw["train"]["progress"] = True
    train(config_from_dict(raw))
    err = capsys.readouterr().err
    assert "epoch 1/" not in err and "eval val" not in err


def test_an_error_line_starts_its_own_line_after_an_open_progress_bar(capsys):
    """An error that ends a command while a bar is open (training's epoch bar on a non-finite loss) is printed on
    its own line, not after the bar's text."""
    from tqdm import tqdm

    from fastfilm.errors import UsageError, with_one_line_errors

    def command():
        bar = tqdm(total=5, desc="epoch 1/3")
        bar.update(2)
        raise UsageError("boom")

    assert with_one_line_errors(command) == 2
    last = [x for x in capsys.readouterr().err.split("\n") if x.strip()][-1]
    assert last == "fastfilm: error: boom", last


def test_metrics_jsonl_is_strict_json_with_non_finite_values(tmp_path):
    from fastfilm.files.checkpoint import RunLogger

    def strict(text):
        return json.loads(
            text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl")
        )

    logger = RunLogger(str(tmp_path), config_from_dict({}), tensorboard=False)
    logger.log(3, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "x": -float("inf"), "y": 0.5})
    logger.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(line) == {"step": 3, "train/loss": "nan", "train/grad_norm": "inf", "x": "-inf", "y": 0.5}


def test_an_engine_does_not_inherit_an_earlier_engines_autocast(dataset, tmp_path):
    """DeepSpeed keeps the last engine's autocast dtype in module globals: a float32 ZeRO engine built after an fp16
    one in the same process got fp16's GradScaler (gradients and the logged grad norm scaled by 2**16)."""
    from deepspeed.runtime.torch_autocast import is_autocast_initialized

    from fastfilm import train as trainer

    vocab = {"question_token_to_idx": {f"q{i}": i for i in range(8)}, "answer_token_to_idx": {"a": 0, "b": 1}}
    engines = []
    for precision, stage in (("fp16", 0), (None, 1)):
        raw = tiny_config(dataset, tmp_path / str(stage))
        raw["deepspeed"]["zero_optimization"] = {"stage": stage}
        if precision:
            raw["deepspeed"][precision] = {"enabled": True}
        cfg = config_from_dict(raw)
        trainer.setup_distributed(cfg)
        engines.append(trainer.build_engine(cfg, vocab, torch.device("cpu"))[0])
        assert is_autocast_initialized() == bool(precision)
    assert engines[1].optimizer.torch_autocast_gradscaler is None  # ZeRO's own scaler: none in float32


def test_deepspeed_builds_no_shared_memory_op_on_a_cpu(dataset, tmp_path):
    """DeepSpeed's CPU init would JIT-build its inference-only shm all-reduce op (~1 min of C++ per machine and venv);
    the trainer's process group has none, and the trainer's all-reduces still work (gloo)."""
    import deepspeed.comm as dist

    from fastfilm import train as trainer

    trainer.setup_distributed(config_from_dict(tiny_config(dataset, tmp_path / "run")))
    assert dist.comm.cdb.shm_comm_op is None
    t = torch.ones(3)
    dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0, 1.0]  # a world of one


def test_default_evaluation_is_at_each_epochs_end_also_after_a_resume_on_another_layout(dataset, tmp_path):
    """eval_every 0 = once per epoch, at its end: a run resumed with half the micro-batch (12 steps per epoch instead
    of 6) evaluates where its epochs end (steps 10 and 22), not every 12 steps of the new layout (12, 24)."""
    run = tmp_path / "run"
    raw = tiny_config(dataset, run, max_steps=2)  # 48 questions, 1 rank × micro-batch 8: 6 steps per epoch
    train(config_from_dict(raw))
    raw["train"]["max_steps"] = 0
    raw["deepspeed"]["train_micro_batch_size_per_gpu"] = 4  # 32 questions left in epoch 0: 8 steps
    summary = train(config_from_dict(raw), resume=True)
    assert summary["step"] == 22 and summary["epoch"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/acc" in r] == [10, 22]

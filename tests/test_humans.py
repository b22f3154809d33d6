"""CLEVR-Humans-style fine-tuning through the trainer: train.init_from + train.trainable=generator on a question
set with new words (prep --vocab-from --expand-vocab)."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastfilm.config import config_from_dict
from fastfilm.data import prep
from fastfilm.train import train
from tests.test_train import tiny_config

# A deterministic rewording: the second question set says the same things with words the first never uses.
REWORD = {
    "What": "Which",
    "color": "hue",
    "How": "Tell",
    "many": "count",
    "Is": "Does",
    "Are": "Do",
    "there": "here",
    "thing": "item",
    "things": "items",
    "object": "item",
    "objects": "items",
    "cube": "box",
    "cubes": "boxes",
    "block": "box",
    "blocks": "boxes",
    "sphere": "orb",
    "spheres": "orbs",
    "ball": "orb",
    "balls": "orbs",
    "shape": "form",
    "size": "bulk",
    "material": "stuff",
    "same": "identical",
}


def reword(text: str) -> str:
    return re.sub(r"[A-Za-z]+", lambda m: REWORD.get(m.group(0), m.group(0)), text)


def add_reworded_split(root, src_split, new_split):
    """`new_split`: `src_split`'s questions reworded, on the same images (a symlinked images folder)."""
    with open(os.path.join(root, "questions", f"CLEVR_{src_split}_questions.json")) as f:
        doc = json.load(f)
    for q in doc["questions"]:
        q["question"] = reword(q["question"])
    with open(os.path.join(root, "questions", f"CLEVR_{new_split}_questions.json"), "w") as f:
        json.dump(doc, f)
    link = os.path.join(root, "images", new_split)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(root, "images", src_split)), link)


def test_trainable_generator_keeps_the_network_bit_identical(dataset, tmp_path):
    base = tmp_path / "base"
    train(config_from_dict(tiny_config(dataset, base, epochs=1)))
    # The second set: the train and val questions reworded (new words), the vocabulary grown from the base's.
    root = tmp_path / "clevr"
    shutil.copytree(dataset / "clevr" / "questions", root / "questions")
    os.makedirs(root / "images")
    for s in ("train", "val"):
        os.symlink(dataset / "clevr" / "images" / s, root / "images" / s)
        add_reworded_split(str(root), s, f"{s}_humans")
    cache = tmp_path / "cache"
    prep.prepare(
        str(root),
        str(cache),
        image_size=32,
        splits=["train_humans", "val_humans"],
        workers=1,
        vocab_from=str(dataset / "cache"),
        expand_vocab=True,
    )
    raw = tiny_config(dataset, tmp_path / "ft", max_steps=4, eval_every=2)
    raw["data"].update(root=str(root), cache=str(cache), train_split="train_humans", val_split="val_humans")
    raw["train"].update(init_from=str(base), trainable="generator")
    train(config_from_dict(raw))
    before = load_file(str(base / "checkpoints" / "best" / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "checkpoints" / "last" / "model.safetensors"))
    params = {n for n, _ in torch.nn.Module.named_parameters(_model_for(raw, cache))}
    net_params = [k for k in params if k.startswith("net.")]
    assert net_params and all(torch.equal(after[k], before[k]) for k in net_params)
    gen_changed = [
        k
        for k in params
        if k.startswith("generator.") and not torch.equal(after[k], _grown(before, after, k))
    ]
    assert gen_changed  # the generator trained
    assert not torch.equal(after["net.blocks.0.bn1.running_mean"], before["net.blocks.0.bn1.running_mean"])
    emb_b, emb_a = before["generator.encoder_embed.weight"], after["generator.encoder_embed.weight"]
    assert emb_a.shape[0] > emb_b.shape[0]  # new words got rows

    # Zero-shot: the base model on the reworded questions with its own vocabulary (new words → <UNK>), through
    # `eval --cache`; the expanded cache's ids do not fit the base model and are refused.
    from fastfilm.cli import main
    from fastfilm.prepare import prepare  # the job: a run folder's vocabulary is a model file, not data

    zero = tmp_path / "zero"
    prepare(str(root), str(zero), image_size=32, splits=["val_humans"], workers=1, vocab_from=str(base))
    assert main(["eval", "--checkpoint", str(base), "--split", "val_humans", "--cache", str(zero)]) == 0
    assert main(["eval", "--checkpoint", str(base), "--split", "val_humans", "--cache", str(cache)]) == 2


def _model_for(raw, cache):
    from fastfilm.data import load_vocab
    from fastfilm.model import FiLMModel

    v = load_vocab(str(cache))
    cfg = config_from_dict(raw)
    return FiLMModel(cfg.model, len(v["question_token_to_idx"]), len(v["answer_token_to_idx"]))


def _grown(before, after, k):
    b = before[k]
    return b if b.shape == after[k].shape else torch.cat([b, after[k][b.shape[0] :]])


@pytest.mark.slow
def test_humans_style_finetune_raises_accuracy_on_the_new_set(tmp_path):
    """The CLEVR-Humans recipe on synthetic data: a model trained on one question set, evaluated zero-shot on a
    reworded set (its new words → <UNK>), then fine-tuned generator-only on the reworded set with the vocabulary
    expanded; its accuracy on the reworded val rises. Prints the figures. About 10 CPU-minutes: runs only when
    asked for (`pytest -m slow tests/test_humans.py`)."""
    from fastfilm.cli import main
    from fastfilm.data import synth

    root = tmp_path / "clevr"
    synth.generate(
        str(root),
        train_images=800,
        val_images=150,
        test_images=0,
        questions_per_image=5,
        seed=0,
        min_objects=3,
        max_objects=5,
        object_scale=2.0,
        max_filters=1,
    )
    for s in ("train", "val"):
        add_reworded_split(str(root), s, f"{s}_humans")
    base_cache, zero_cache, ft_cache = tmp_path / "c_base", tmp_path / "c_zero", tmp_path / "c_ft"
    prep.prepare(str(root), str(base_cache), image_size=48, splits=["train", "val"])
    prep.prepare(str(root), str(zero_cache), image_size=48, splits=["val_humans"], vocab_from=str(base_cache))
    prep.prepare(
        str(root),
        str(ft_cache),
        image_size=48,
        splits=["train_humans", "val_humans"],
        vocab_from=str(base_cache),
        expand_vocab=True,
    )

    def config(run, cache, **kw):
        raw = {
            "model": {
                "image_size": 48,
                "stem_num_layers": 3,
                "stem_kernel_size": 3,
                "num_blocks": 3,
                "module_dim": 24,
                "wordvec_dim": 32,
                "rnn_hidden_dim": 96,
                "classifier_proj_dim": 48,
                "classifier_fc_dims": [96],
            },
            "data": {"root": str(root), "cache": str(cache), "num_threads": 2},
            "train": {
                "run_dir": str(run),
                "epochs": 12,
                "patience": 4,
                "log_every": 20,
                "progress": False,
                "tensorboard": False,
                **kw,
            },
            "deepspeed": {
                "train_micro_batch_size_per_gpu": 32,
                "optimizer": {"type": "Adam", "params": {"lr": 2e-3, "weight_decay": 1e-5}},
            },
        }
        return raw

    base = tmp_path / "base"
    train(config_from_dict(config(base, base_cache, max_minutes=6)))

    def acc(run, cache, split):
        res = tmp_path / f"{os.path.basename(run)}_{split}.json"
        # eval reads the run's data.cache: point a copy of the run's best checkpoint config at `cache`
        folder = tmp_path / f"eval_{os.path.basename(run)}_{os.path.basename(cache)}"
        shutil.copytree(run / "checkpoints" / "best", folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["data"]["cache"] = str(cache)
        (folder / "config.json").write_text(json.dumps(cfg))
        from fastfilm.files.checkpoint import write_manifest

        write_manifest(str(folder))
        assert main(["eval", "--checkpoint", str(folder), "--split", split, "--json", str(res)]) == 0
        return json.loads(res.read_text())["accuracy"]

    base_val = acc(base, base_cache, "val")
    zero_shot = acc(base, zero_cache, "val_humans")
    ft = tmp_path / "ft"
    raw = config(ft, ft_cache, max_minutes=4, init_from=str(base), trainable="generator")
    raw["data"].update(train_split="train_humans", val_split="val_humans")
    train(config_from_dict(raw))
    tuned = acc(ft, ft_cache, "val_humans")
    figures = {"base_val": base_val, "zero_shot_val_humans": zero_shot, "finetuned_val_humans": tuned}
    print("HUMANS-STYLE FIGURES", json.dumps(figures))
    assert tuned > zero_shot + 0.05, figures


def test_resumed_finetune_needs_no_source_and_keeps_the_network(dataset, tmp_path):
    from fastfilm.cli import main

    base = tmp_path / "base"
    train(config_from_dict(tiny_config(dataset, base, max_steps=2)))
    src = tmp_path / "models" / "base"
    assert main(["export", "--checkpoint", str(base), "--tag", "last", "--out", str(src)]) == 0
    raw = tiny_config(dataset, tmp_path / "ft", max_steps=2)
    raw["train"].update(init_from=str(src), trainable="generator", frozen_mode="eval")
    train(config_from_dict(raw))
    shutil.rmtree(src)  # a resumed run takes its weights from its own checkpoint
    raw["train"]["max_steps"] = 4
    train(config_from_dict(raw), resume=True)
    before = load_file(str(base / "checkpoints" / "last" / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "checkpoints" / "last" / "model.safetensors"))
    net = [k for k in before if k.startswith("net.")]
    assert all(torch.equal(after[k], before[k]) for k in net)  # frozen_mode=eval: BN statistics fixed too
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("generator."))

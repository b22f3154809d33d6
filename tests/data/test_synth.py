"""`fastfilm synth`: CLEVR v1.0 layout and schema, determinism, answers that follow from the scenes, balance."""

from __future__ import annotations

import filecmp
import json
import os
from collections import Counter

import pytest
from PIL import Image

from fastfilm.data import synth

# CLEVR v1.0's 28 answers, written out here rather than imported from the code under test.
CLEVR_ANSWERS = {
    "yes",
    "no",
    *(str(i) for i in range(11)),
    "gray",
    "red",
    "blue",
    "green",
    "brown",
    "purple",
    "cyan",
    "yellow",
    "cube",
    "sphere",
    "cylinder",
    "large",
    "small",
    "rubber",
    "metal",
}
FAMILIES = {
    "exist",
    "count",
    "query_color",
    "query_shape",
    "query_size",
    "query_material",
    "compare_integer",
    "same_attribute",
    "count_same",
    "relate_query",
    "relate_exist",
}


def load(root, kind, split):
    with open(os.path.join(root, kind, f"CLEVR_{split}_{kind}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_layout_and_png_format(synth_set):
    root, _ = synth_set
    for split, n in (("train", 12), ("val", 6), ("test", 4)):
        names = sorted(os.listdir(root / "images" / split))
        assert names == [f"CLEVR_{split}_{i:06d}.png" for i in range(n)]
        with Image.open(root / "images" / split / names[0]) as im:
            assert im.format == "PNG" and im.mode == "RGBA" and im.size == (480, 320)
            assert im.getextrema()[3] == (255, 255)  # opaque, like CLEVR
    assert (root / "synth_summary.json").is_file()


def test_question_schema(synth_set):
    root, _ = synth_set
    for split in ("train", "val", "test"):
        doc = load(root, "questions", split)
        assert set(doc) == {"info", "questions"}
        assert doc["info"]["split"] == split
        assert doc["info"]["question_families"] and all(
            isinstance(n, str) for n in doc["info"]["question_families"]
        )
        for i, q in enumerate(doc["questions"]):
            keys = {"question", "image_filename", "image_index", "question_family_index", "question_index"}
            keys |= {"split", "program"}
            assert keys <= set(q)
            assert isinstance(q["question"], str) and q["question"].endswith("?")
            assert q["image_filename"] == f"CLEVR_{split}_{q['image_index']:06d}.png"
            assert q["question_index"] == i and q["split"] == split
            assert 0 <= q["question_family_index"] < len(doc["info"]["question_families"])
            assert isinstance(q["program"], list)
            for node in q["program"]:
                assert set(node) == {"inputs", "function", "value_inputs"}
            if split == "test":
                assert "answer" not in q  # like CLEVR's test split
            else:
                assert isinstance(q["answer"], str)


def test_scene_schema(synth_set):
    root, _ = synth_set
    attrs = {
        "color": {"gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"},
        "shape": {"cube", "sphere", "cylinder"},
        "size": {"large", "small"},
        "material": {"rubber", "metal"},
    }
    for split, n in (("train", 12), ("val", 6), ("test", 4)):
        doc = load(root, "scenes", split)
        assert set(doc) == {"info", "scenes"} and len(doc["scenes"]) == n
        for i, s in enumerate(doc["scenes"]):
            assert s["image_index"] == i and s["split"] == split
            assert s["image_filename"] == f"CLEVR_{split}_{i:06d}.png"
            assert 3 <= len(s["objects"]) <= 10
            for o in s["objects"]:
                assert set(o) == {
                    "color",
                    "shape",
                    "size",
                    "material",
                    "3d_coords",
                    "pixel_coords",
                    "rotation",
                }
                for a, values in attrs.items():
                    assert o[a] in values
                assert len(o["3d_coords"]) == 3 and len(o["pixel_coords"]) == 3
                assert 0 <= o["pixel_coords"][0] < 480 and 0 <= o["pixel_coords"][1] < 320
            assert set(s["relationships"]) == {"left", "right", "front", "behind"}
            for rel in s["relationships"].values():
                assert len(rel) == len(s["objects"])
            for j in range(len(s["objects"])):  # left/right and front/behind are mirror images
                left = set(s["relationships"]["left"][j])
                assert left | set(s["relationships"]["right"][j]) == set(range(len(s["objects"]))) - {j}


def test_families_answers_and_programs(synth_set):
    root, _ = synth_set
    doc = load(root, "questions", "train")
    names = doc["info"]["question_families"]
    assert set(names) == FAMILIES
    seen = {names[q["question_family_index"]] for q in doc["questions"]}
    assert seen == FAMILIES  # every family present
    for split in ("train", "val"):
        for q in load(root, "questions", split)["questions"]:
            assert q["answer"] in CLEVR_ANSWERS


def execute(program: list[dict], scene: dict):
    """A small CLEVR program executor (the semantics of CLEVR's functional programs)."""
    objs, rels = scene["objects"], scene["relationships"]
    out: list = []
    for node in program:
        f, args, v = node["function"], [out[i] for i in node["inputs"]], node["value_inputs"]
        if f == "scene":
            r = list(range(len(objs)))
        elif f.startswith("filter_"):
            r = [i for i in args[0] if objs[i][f[7:]] == v[0]]
        elif f == "unique":
            assert len(args[0]) == 1, f"not unique: {args[0]}"
            r = args[0][0]
        elif f == "relate":
            r = rels[v[0]][args[0]]
        elif f == "count":
            r = len(args[0])
        elif f == "exist":
            r = "yes" if args[0] else "no"
        elif f.startswith("query_"):
            r = objs[args[0]][f[6:]]
        elif f.startswith("same_"):
            a = f[5:]
            r = [i for i in range(len(objs)) if i != args[0] and objs[i][a] == objs[args[0]][a]]
        elif f.startswith("equal_") and f != "equal_integer":
            r = "yes" if args[0] == args[1] else "no"
        elif f == "equal_integer":
            r = "yes" if args[0] == args[1] else "no"
        elif f == "greater_than":
            r = "yes" if args[0] > args[1] else "no"
        elif f == "less_than":
            r = "yes" if args[0] < args[1] else "no"
        else:
            raise AssertionError(f"unknown function {f}")
        out.append(r)
    return str(out[-1])


def test_answers_follow_from_scenes(synth_set):
    """Each question's program, run on its scene, gives its answer (so answers are right, not just balanced)."""
    root, _ = synth_set
    final = {
        "exist": {"exist"},
        "count": {"count"},
        "compare_integer": {"greater_than", "less_than", "equal_integer"},
        "same_attribute": {"equal_color", "equal_shape", "equal_size", "equal_material"},
        "count_same": {"count"},
        "relate_exist": {"exist"},
        "relate_query": {"query_color", "query_shape", "query_size", "query_material"},
    }
    for split in ("train", "val"):
        doc = load(root, "questions", split)
        scenes = load(root, "scenes", split)["scenes"]
        names = doc["info"]["question_families"]
        for q in doc["questions"]:
            fam = names[q["question_family_index"]]
            assert q["program"][-1]["function"] in final.get(fam, {fam})
            assert execute(q["program"], scenes[q["image_index"]]) == q["answer"], q["question"]


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    kw = {"train_images": 4, "val_images": 2, "test_images": 2, "questions_per_image": 3}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate(str(a), seed=7, workers=1, **kw)
    synth.generate(str(b), seed=7, workers=2, **kw)
    synth.generate(str(c), seed=8, workers=1, **kw)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 4 + 2 + 2 + 3 + 3 + 1
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    _, differ, _ = filecmp.cmpfiles(a, c, files, shallow=False)
    assert "questions/CLEVR_train_questions.json" in differ
    assert "images/train/CLEVR_train_000000.png" in differ


def test_rerun_with_fewer_images_removes_the_extra_ones(tmp_path):
    kw = {"val_images": 1, "test_images": 1, "questions_per_image": 1, "seed": 0, "workers": 1}
    synth.generate(str(tmp_path), train_images=3, **kw)
    synth.generate(str(tmp_path), train_images=2, **kw)
    assert sorted(os.listdir(tmp_path / "images" / "train")) == [
        "CLEVR_train_000000.png",
        "CLEVR_train_000001.png",
    ]


def test_bad_arguments_are_data_errors(tmp_path):
    from fastfilm.data import DataError

    with pytest.raises(DataError, match="train_images"):
        synth.generate(
            str(tmp_path), train_images=-1, val_images=1, test_images=1, questions_per_image=1, seed=0
        )
    with pytest.raises(DataError, match="questions_per_image"):
        synth.generate(
            str(tmp_path), train_images=1, val_images=1, test_images=1, questions_per_image=0, seed=0
        )


def test_a_clevr_set_synth_did_not_write_is_never_overwritten(tmp_path, capsys):
    """`synth --out data/CLEVR_v1.0` (a slip) must not replace the real set's questions and images."""
    from fastfilm.cli import main as cli

    real = tmp_path / "CLEVR_v1.0"
    (real / "questions").mkdir(parents=True)
    (real / "images" / "train").mkdir(parents=True)
    qfile = real / "questions" / "CLEVR_train_questions.json"
    qfile.write_text('{"questions": []}')
    (real / "images" / "train" / "CLEVR_train_000000.png").write_bytes(b"real image")
    before = sorted(p.relative_to(real) for p in real.rglob("*"))
    assert cli(["synth", "--out", str(real), "--train-images", "2", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CLEVR_train_questions.json" in err[0] and "synth_summary.json" in err[0], err
    assert sorted(p.relative_to(real) for p in real.rglob("*")) == before
    assert qfile.read_text() == '{"questions": []}'
    assert (real / "images" / "train" / "CLEVR_train_000000.png").read_bytes() == b"real image"


def test_question_only_baseline_is_reported(synth_set, capsys):
    root, summary = synth_set
    b = summary["question_only_baseline"]
    assert b["fit_on"] == "train" and b["measured_on"] == "val"
    for key in ("family", "template", "text", "best"):
        assert 0.0 <= b["overall"][key] <= 1.0
    assert set(b["families"]) <= FAMILIES
    for e in b["families"].values():
        assert {"questions", "chance", "chance_template", "family", "template", "text", "best"} <= set(e)
    with open(root / "synth_summary.json", encoding="utf-8") as f:
        written = json.load(f)
    assert written["question_only_baseline"] == b
    assert written["splits"]["test"]["answers_written"] is False
    print(synth.format_baseline(b))
    assert "overall" in capsys.readouterr().out


def test_answers_are_balanced_per_family(tmp_path):
    """Yes/no and attribute answers near-uniform per family (the balancer, on ~1,000 train questions)."""
    s = synth.generate(
        str(tmp_path),
        train_images=110,
        val_images=0,
        test_images=0,
        questions_per_image=10,
        seed=3,
        workers=2,
    )
    by_family = s["splits"]["train"]["answers_by_family"]
    for fam in ("exist", "compare_integer", "same_attribute", "relate_exist", "query_size", "query_material"):
        c = Counter(by_family[fam])
        assert len(c) == 2
        assert max(c.values()) / sum(c.values()) <= 0.56, (fam, c)
    for fam, k in (("query_color", 8), ("query_shape", 3)):
        c = Counter(by_family[fam])
        assert len(c) == k and max(c.values()) <= 2 * min(c.values()) + 2, (fam, c)
    assert s["question_only_baseline"] is None  # no val split to measure it on


def test_run_prints_summary(tmp_path, capsys):
    import argparse

    args = argparse.Namespace(
        out=str(tmp_path),
        train_images=3,
        val_images=2,
        test_images=1,
        questions_per_image=2,
        seed=0,
        workers=1,
    )
    assert synth.run(args) == 0
    out = capsys.readouterr().out
    assert "question-only baseline" in out and "train 3 images / 6 questions" in out

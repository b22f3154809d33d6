"""`fastfilm prep`: the cache's contents, train-only vocabulary, no-op reruns, atomic writes, bad input."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastfilm.data import DataError, load_split, load_vocab, prep

SAMPLES = os.environ.get(
    "FASTFILM_CLEVR_SAMPLES",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "..",
        "shared",
        "clevr_samples",
    ),
)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def edit_questions(root: Path, split: str, fn) -> None:
    path = root / "questions" / f"CLEVR_{split}_questions.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def png(w: int, h: int, depth: int, color_type: int, channels: int) -> bytes:
    """A minimal valid PNG of any bit depth / colour type (PIL cannot write 16-bit RGB)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + bytes(w * channels * depth // 8) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------ contents
def test_cache_contents(synth_set, cache):
    root, _ = synth_set
    v = load_vocab(str(cache))
    assert set(v) >= {"question_token_to_idx", "answer_token_to_idx", "question_family_names", "hash"}
    assert list(v["answer_token_to_idx"])[:4] == [
        "<NULL>",
        "<START>",
        "<END>",
        "<UNK>",
    ]  # written in id order
    for vocab in (v["question_token_to_idx"], v["answer_token_to_idx"]):
        assert sorted(vocab.values()) == list(range(len(vocab)))
        assert [vocab[t] for t in ("<NULL>", "<START>", "<END>", "<UNK>")] == [0, 1, 2, 3]
    assert v["question_family_names"]["0"] == "exist" and len(v["question_family_names"]) == 11
    doc = json.loads((root / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    a = load_split(str(cache), "val")
    q, n = a["questions"], len(doc)
    assert q.dtype == np.int32 and q.shape == (n, a["lengths"].max())
    for r in range(n):
        length = a["lengths"][r]
        assert (
            q[r, 0] == 1
            and q[r, length - 1] == 2
            and (q[r, length:] == 0).all()
            and (q[r, 1 : length - 1] > 2).all()
        )
        assert v["answer_token_to_idx"].get(doc[r]["answer"], 3) == a["answers"][r]
        assert (
            a["image_index"][r] == doc[r]["image_index"] and a["family"][r] == doc[r]["question_family_index"]
        )
        assert a["question_index"][r] == doc[r]["question_index"]
    assert (load_split(str(cache), "test")["answers"] == -1).all()
    imgs = np.load(cache / "val_images_32.npy", mmap_mode="r")
    assert imgs.dtype == np.uint8 and imgs.shape == (6, 32, 32, 3)
    for i in range(6):  # PIL bicubic of the RGB image, like the original's imresize
        with Image.open(root / "images" / "val" / f"CLEVR_val_{i:06d}.png") as im:
            ref = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC))
        assert np.array_equal(imgs[i], ref)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"]["train"]["source"]["questions"]["size"] > 0


def test_vocabulary_from_train_only(clevr_copy, tmp_path):
    def add_zebra(doc):
        doc["questions"][0]["question"] = "Is there a zebra behind the cube?"
        doc["questions"][1]["answer"] = "maybe"  # not one of train's answers

    edit_questions(clevr_copy, "val", add_zebra)
    out = tmp_path / "cache"
    s = prep.prepare(str(clevr_copy), str(out), workers=1)
    v = load_vocab(str(out))
    assert "zebra" not in v["question_token_to_idx"] and "maybe" not in v["answer_token_to_idx"]
    assert s["splits"]["val"]["unknown_words"]["zebra"] == 1
    assert s["splits"]["val"]["questions_with_unknown_words"] >= 1
    assert s["splits"]["val"]["unknown_answers"]["maybe"] == 1  # (this tiny train lacks some answers, too)
    a = load_split(str(out), "val")
    assert 3 in a["questions"][0] and a["answers"][1] == 3  # <UNK>
    assert "unknown words → <UNK>" in prep.format_summary(s)


# ------------------------------------------------------------------------------------------------ reruns
def test_rerun_is_a_noop_and_says_so(clevr_copy, tmp_path, capsys):
    out = tmp_path / "cache"
    args = argparse.Namespace(
        clevr=str(clevr_copy), out=str(out), image_size=16, workers=1, splits="train,val,test"
    )
    assert prep.run(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert prep.run(args) == 0
    assert "is up to date (nothing to do)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    edit_questions(clevr_copy, "val", lambda d: d["questions"][0].update(question="Is there a cube?"))
    s = prep.prepare(str(clevr_copy), str(out), image_size=16, workers=1)
    assert not s["up_to_date"]
    assert sorted(os.path.basename(p) for p in s["written"]) == ["val_images_16.npy", "val_questions.npz"]
    # a new image size is new work for every split; the old size stays usable
    s = prep.prepare(str(clevr_copy), str(out), image_size=8, workers=1)
    assert {os.path.basename(p) for p in s["written"]} >= {"train_images_8.npy", "val_images_8.npy"}
    assert (out / "train_images_16.npy").is_file()


def test_killed_run_leaves_the_old_cache_intact(clevr_copy, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    prep.prepare(str(clevr_copy), str(out), image_size=16, workers=1)
    old = snapshot(out)
    edit_questions(clevr_copy, "train", lambda d: d["questions"][0].update(question="Is there a zebra?"))

    real = prep._replace

    def killed(tmp, final):  # the temp file is complete; the process dies before the rename
        assert os.path.exists(tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_replace", killed)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(clevr_copy), str(out), image_size=16, workers=1)
    assert snapshot(out) == old and not temps(out)

    def dies_while_writing_images(*a, **k):  # mid-way through the image cache (its temp memmap exists)
        assert temps(out)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_replace", real)
    monkeypatch.setattr(prep, "process_images", dies_while_writing_images)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(clevr_copy), str(out), image_size=16, workers=1)
    assert snapshot(out) == old and not temps(out)
    assert load_split(str(out), "train")["questions"].shape[0] == 36  # still readable


def test_temp_files_of_dead_runs_are_removed(cache, tmp_path, synth_set):
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    (out / "vocab.json.tmp-999999999").write_text("{")
    prep.prepare(str(synth_set[0]), str(out), image_size=32, workers=1)
    assert not temps(out)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such folder"):
        prep.prepare(str(tmp_path / "nope"), str(tmp_path / "c"))


def test_missing_questions_file_and_images_folder(clevr_copy, tmp_path):
    os.remove(clevr_copy / "questions" / "CLEVR_test_questions.json")
    with pytest.raises(DataError, match=r"CLEVR_test_questions\.json: questions file not found"):
        prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=1)
    shutil.rmtree(clevr_copy / "images" / "val")
    with pytest.raises(DataError, match=r"images/val: images folder not found"):
        prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=1, splits=("train", "val"))
    assert prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=1, splits=("train",))["splits"]["train"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["questions"][2].pop("image_index"), r"question 2: missing field 'image_index'"),
        (lambda d: d["questions"][1].update(answer=3), r"question 1: field 'answer' must be str, found int"),
        (
            lambda d: d["questions"][0].update(image_index=True),
            r"question 0: field 'image_index' must be int",
        ),
        (lambda d: d["questions"][4].update(question=None), r"question 4: field 'question' must be str"),
        (lambda d: d["questions"].__setitem__(5, "text"), r"question 5: expected an object, found str"),
        (lambda d: d["questions"][0].update(image_filename="../x.png"), r"question 0: image_filename"),
        (lambda d: d["questions"][0].update(image_index=-2), r"question 0: image_index -2 is negative"),
        (lambda d: d.pop("questions"), r'expected an object with a "questions" list'),
        (lambda d: d.update(questions=[]), r"the split has no questions"),
        (lambda d: d["questions"][3].pop("answer"), r"1 of 18 questions have no 'answer'"),
    ],
)
def test_bad_question_json(clevr_copy, tmp_path, edit, message):
    edit_questions(clevr_copy, "val", edit)
    with pytest.raises(DataError, match=message) as e:
        prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=1)
    assert "CLEVR_val_questions.json" in str(e.value)
    assert not (tmp_path / "c" / "vocab.json").exists() and not temps(tmp_path / "c")


def test_not_json(clevr_copy, tmp_path):
    (clevr_copy / "questions" / "CLEVR_train_questions.json").write_text('{"questions": [')
    with pytest.raises(DataError, match=r"CLEVR_train_questions\.json: not valid JSON"):
        prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=1)


def test_question_naming_a_missing_image_is_skipped_and_counted(clevr_copy, tmp_path, capsys):
    os.remove(clevr_copy / "images" / "val" / "CLEVR_val_000005.png")
    args = argparse.Namespace(
        clevr=str(clevr_copy), out=str(tmp_path / "c"), image_size=8, workers=1, splits="train,val"
    )
    assert prep.run(args) == 0
    captured = capsys.readouterr()
    assert "3 skipped (image missing)" in captured.out and "CLEVR_val_000005.png" in captured.err
    a = load_split(str(tmp_path / "c"), "val")
    assert len(a["answers"]) == 15 and 5 not in a["image_index"]


@pytest.mark.parametrize(
    "data,message,needs_decode",
    [
        (b"", "zero-byte file", False),
        (b"GIF89a" + bytes(100), "not a PNG file", False),
        ("truncated", "cannot decode", True),
        ("gray", "grayscale PNG", False),
        ("palette", "palette PNG", False),
        (png(480, 320, 16, 2, 3), "16-bit PNG", False),
        (png(480, 320, 16, 0, 1), "grayscale PNG", False),
        ("small", "100×100 pixels", False),
    ],
)
def test_bad_images(clevr_copy, tmp_path, data, message, needs_decode):
    path = clevr_copy / "images" / "val" / "CLEVR_val_000002.png"
    if data == "truncated":
        data = path.read_bytes()[:5000]
    elif data in ("gray", "palette", "small"):
        im = Image.open(path)
        im = {"gray": im.convert("L"), "palette": im.convert("P"), "small": im.resize((100, 100))}[data]
        im.save(path)
    if isinstance(data, bytes):
        path.write_bytes(data)
    out = tmp_path / "c"
    with pytest.raises(DataError, match=message) as e:
        prep.prepare(str(clevr_copy), str(out), image_size=16, workers=2)
    assert str(path) in str(e.value) and "1 bad image(s)" in str(e.value)
    assert not (out / "vocab.json").exists() and not temps(out)
    if needs_decode:  # the header is fine: only decoding finds it
        assert prep.prepare(str(clevr_copy), str(out), workers=1)["splits"]["val"]["questions"] == 18
    else:  # PNG headers are checked even without an image cache
        with pytest.raises(DataError, match=message):
            prep.prepare(str(clevr_copy), str(out), workers=1)


def test_many_bad_images_are_listed_with_a_count(clevr_copy, tmp_path):
    for p in glob.glob(str(clevr_copy / "images" / "train" / "*.png")):
        Path(p).write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)12 bad image\(s\).*… and 2 more") as e:
        prep.prepare(str(clevr_copy), str(tmp_path / "c"), workers=2)
    assert str(e.value).count("zero-byte file") == 10


def test_rgb_png_is_fine(clevr_copy, tmp_path):
    path = clevr_copy / "images" / "val" / "CLEVR_val_000001.png"
    Image.open(path).convert("RGB").save(path)
    prep.prepare(str(clevr_copy), str(tmp_path / "c"), image_size=8, workers=1)


def test_bad_split_names_and_sizes(synth_set, tmp_path):
    with pytest.raises(DataError, match="bad split name"):
        prep.prepare(str(synth_set[0]), str(tmp_path / "c"), splits=("../x",))
    with pytest.raises(DataError, match="image-size"):
        prep.prepare(str(synth_set[0]), str(tmp_path / "c"), image_size=0)
    with pytest.raises(DataError, match="no train split"):
        prep.prepare(str(synth_set[0]), str(tmp_path / "c"), splits=("val",))


def test_run_reports_data_errors(tmp_path, capsys):
    from fastfilm.cli import main

    assert main(["prep", "--clevr", str(tmp_path / "none"), "--out", str(tmp_path / "c"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastfilm: data error:") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ vocab hash
def test_split_prepared_with_another_vocabulary_is_refused(clevr_copy, cache, tmp_path):
    edit_questions(clevr_copy, "train", lambda d: d["questions"][0].update(question="Is there a zebra?"))
    other = tmp_path / "other"
    prep.prepare(str(clevr_copy), str(other), workers=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(cache, mixed)
    shutil.copy(other / "val_questions.npz", mixed / "val_questions.npz")
    with pytest.raises(DataError, match=r"val_questions\.npz was encoded with vocabulary .*vocab\.json"):
        load_split(str(mixed), "val")
    load_split(str(mixed), "train")
    with pytest.raises(DataError, match="the expected vocabulary"):
        load_split(str(cache), "val", vocab_hash="0" * 64)


def test_edited_vocab_is_refused(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    v = json.loads((c / "vocab.json").read_text())
    v["question_token_to_idx"]["zebra"] = 999
    (c / "vocab.json").write_text(json.dumps(v))
    with pytest.raises(DataError, match="does not match its hash"):
        load_vocab(str(c))
    with pytest.raises(DataError, match=r"vocab\.json: not found"):
        load_vocab(str(tmp_path))
    with pytest.raises(DataError, match=r"nosplit_questions\.npz: not found"):
        load_split(str(cache), "nosplit")


# ------------------------------------------------------------------------------------------------ real CLEVR
def real_samples() -> list[str]:
    files = sorted(glob.glob(os.path.join(SAMPLES, "CLEVR_val_*.png")))
    if not files:
        pytest.skip(f"no real CLEVR samples in {SAMPLES}")
    return files


def test_real_clevr_pngs_decode_as_rgb():
    files = real_samples()
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGBA" and im.size == (480, 320)
        assert prep.check_png_header(f) is None
        rgb = prep.load_image(f, None)
        assert rgb.shape == (320, 480, 3) and rgb.dtype == np.uint8
        assert prep.load_image(f, 224).shape == (224, 224, 3)

    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def decode():
        enc = fn.external_source(source=lambda: [np.fromfile(f, np.uint8) for f in files], batch=True)
        return fn.decoders.image(enc, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    for i, f in enumerate(files):  # DALI's CPU decoder: the same RGB pixels as PIL (PNG is lossless)
        assert np.array_equal(np.asarray(out[i]), prep.load_image(f, None))


def test_real_clevr_folder_without_family_names(tmp_path):
    """A real-CLEVR-like folder: family names come from the programs' last function (CLEVR_eval_with_q_type)."""
    files = real_samples()
    root = tmp_path / "real"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        questions = []
        for k, f in enumerate(files):
            name = f"CLEVR_{split}_{k:06d}.png"
            shutil.copy(f, root / "images" / split / name)
            fam, fn = (3, "count") if k % 2 else (7, "exist")
            questions.append(
                {
                    "image_index": k,
                    "image_filename": name,
                    "question_index": k,
                    "question_family_index": fam,
                    "split": split,
                    "question": "How many cubes are there?" if k % 2 else "Is there a cube?",
                    "answer": str(k % 3) if k % 2 else "yes",
                    "program": [
                        {"inputs": [], "function": "scene", "value_inputs": []},
                        {"inputs": [0], "function": "filter_shape", "value_inputs": ["cube"]},
                        {"inputs": [1], "function": fn, "value_inputs": []},
                    ],
                }
            )
        (root / "questions").mkdir(exist_ok=True)
        info = {"split": split, "license": "CC BY 4.0", "version": "1.0", "date": "2/14/2017"}
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"info": info, "questions": questions})
        )
    out = tmp_path / "cache"
    s = prep.prepare(str(root), str(out), image_size=64, workers=2, splits=("train", "val"))
    assert s["splits"]["val"]["questions"] == len(files)
    v = load_vocab(str(out))
    assert v["question_family_names"] == {"3": "count", "7": "exist"}
    imgs = np.load(out / "val_images_64.npy", mmap_mode="r")
    assert imgs.shape == (len(files), 64, 64, 3) and imgs.std() > 5


def test_command_line(tmp_path, capsys):
    """`fastfilm synth` then `fastfilm prep` through the real argument parser."""
    from fastfilm.cli import main

    root, out = str(tmp_path / "clevr"), str(tmp_path / "cache")
    synth_args = ["synth", "--out", root, "--train-images", "3", "--val-images", "2", "--test-images", "1"]
    assert main([*synth_args, "--questions-per-image", "2", "--seed", "1", "--workers", "1"]) == 0
    assert (
        main(
            [
                "prep",
                "--clevr",
                root,
                "--out",
                out,
                "--image-size",
                "8",
                "--workers",
                "1",
                "--splits",
                "train,val",
            ]
        )
        == 0
    )
    assert main(["prep", "--clevr", root, "--out", out, "--image-size", "8", "--splits", "train,val"]) == 0
    text = capsys.readouterr().out
    assert "question-only baseline" in text and "is up to date (nothing to do)" in text
    assert not os.path.exists(os.path.join(out, "test_questions.npz"))

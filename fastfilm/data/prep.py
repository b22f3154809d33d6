"""`fastfilm prep`: tokenise a CLEVR-format folder into a cache the DALI loader reads.

Cache layout (`out_dir/`):

- `vocab.json`: `question_token_to_idx`, `answer_token_to_idx` (both start with `<NULL> <START> <END> <UNK>`, as
  in the original code: CLEVR's 28 answers become 32 ids), `question_family_names` (family index → name), and
  `hash`, a content hash of the two vocabularies. Built from the TRAIN split only.
- `{split}_questions.npz`: `questions` int32 [Q, L] (`<START> … <END>` padded with 0 to the split's longest),
  `lengths` int32 [Q], `answers` int32 [Q] (-1 where the split has none, e.g. CLEVR's test), `image_index`,
  `family` (-1 where unknown), `question_index` (int32 [Q]), `image_files` (str [num_images]: the file of each
  image row) and `vocab_hash` (the vocabulary the ids belong to).
- `{split}_images_{N}.npy` (with `--image-size N`): uint8 [num_images, N, N, 3], RGB (alpha dropped), resized
  bicubic with PIL like the original (`scipy.misc.imresize`, which is PIL); row = `image_index`. Rows no
  question refers to stay zero. Memory-mappable (`np.load(..., mmap_mode="r")`).
- `manifest.json`: source file sizes/mtimes, options and versions; a rerun with nothing changed is a no-op.
- `{split}_features.npy` is NOT written here: the "features" image source reads one you provide (see
  `fastfilm.data.loader`).

Input problems and what happens:

- missing CLEVR folder, questions file, or images folder; a questions file that is not JSON, lacks the
  `questions` list, or has a question with a missing/ill-typed field; a split with no questions: `DataError`
  naming the file (and the question's position).
- a question naming an image file that does not exist: the question is skipped, counted and reported.
- a word not in the (train) vocabulary: encoded as `<UNK>`, counted and reported.
- an answer not in the (train) answer vocabulary: encoded as `<UNK>` (id 3, never a training target), counted
  and reported; the question stays, so accuracy is still over the whole split (such a question cannot be
  answered right). The original code would stop with a KeyError.
- an image that is zero-byte, not a PNG, truncated/corrupt, grayscale/palette, 16-bit, or not 480×320:
  `DataError` listing the files (up to 10) and how many. PNG headers are always checked; with `--image-size`
  every image is fully decoded too. RGBA (CLEVR's format) and RGB are fine.

All files are written to a temp file and renamed into place, so a killed run leaves the old cache readable;
each split's file records the vocabulary hash, so a cache mixing two vocabularies is detected on load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastfilm.core.errors import DataError, check_output_folder
from fastfilm.data.tokenize import SPECIAL_TOKENS, UNK, build_vocab, encode_tokens, tokenize, vocab_hash

FORMAT_VERSION = 1
CLEVR_SIZE = (480, 320)  # width, height of every CLEVR v1.0 image
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


# ------------------------------------------------------------------------------------------------ files
def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _replace(tmp: str, path: str) -> None:
    """Rename a finished temp file into place (one call, so tests can simulate a kill here)."""
    os.replace(tmp, path)


def _write_json(path: str, obj: Any, temps: list[str]) -> str:
    tmp = _tmp(path)
    temps.append(tmp)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    return tmp


def _clean_stale_temps(out_dir: str) -> None:
    """Remove temp files left by killed runs (their process is gone)."""
    for name in os.listdir(out_dir):
        m = re.search(r"\.tmp-(\d+)$", name)
        if not m:
            continue
        pid = int(m.group(1))
        alive = pid != os.getpid()
        if alive:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive:
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


def _file_fp(path: str) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _dir_listing(folder: str) -> tuple[set[str], dict[str, int]]:
    """The PNG file names of a folder and a fingerprint (count, total size, newest mtime)."""
    names: set[str] = set()
    total, newest = 0, 0
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(".png") and e.is_file():
                names.add(e.name)
                st = e.stat()
                total += st.st_size
                newest = max(newest, st.st_mtime_ns)
    return names, {"count": len(names), "size": total, "mtime_ns": newest}


def questions_path(clevr_dir: str, split: str) -> str:
    """Where CLEVR keeps a split's questions."""
    return os.path.join(clevr_dir, "questions", f"CLEVR_{split}_questions.json")


def images_dir(clevr_dir: str, split: str) -> str:
    """Where CLEVR keeps a split's images."""
    return os.path.join(clevr_dir, "images", split)


def split_file(cache_dir: str, split: str) -> str:
    """The cache file of a split's encoded questions."""
    return os.path.join(cache_dir, f"{split}_questions.npz")


def image_cache_file(cache_dir: str, split: str, size: int) -> str:
    """The cache file of a split's resized images."""
    return os.path.join(cache_dir, f"{split}_images_{size}.npy")


# ------------------------------------------------------------------------------------------------ questions
def _kind(v: Any) -> str:
    return type(v).__name__


def _read_json(path: str) -> Any:
    """The parsed JSON file, or a DataError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


class _Fallback(Exception):
    """The streaming reader met a document it does not handle: parse it whole with `json.loads` instead."""


def _question_row(q: Any, i: int, where: str, split: str, strings: dict[str, str]) -> dict[str, Any]:
    """Question `i` of a questions file, checked, as the dict `read_questions` returns (a DataError names the
    question). `strings` shares equal file names, answers and types between questions (memory)."""
    if not isinstance(q, dict):
        raise DataError(f"{where}: expected an object, found {_kind(q)}")
    for key, types, required in (
        ("question", (str,), True),
        ("image_index", (int,), True),
        ("answer", (str,), False),
        ("question_family_index", (int,), False),
        ("question_index", (int,), False),
        ("image_filename", (str,), False),
    ):
        if key not in q:
            if required:
                raise DataError(f"{where}: missing field '{key}'")
            continue
        v = q[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise DataError(f"{where}: field '{key}' must be {types[0].__name__}, found {_kind(v)} {v!r:.40}")
    if q["image_index"] < 0:
        raise DataError(f"{where}: image_index {q['image_index']} is negative")
    name = q.get("image_filename", f"CLEVR_{split}_{q['image_index']:06d}.png")
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise DataError(f"{where}: image_filename {name!r} is not a plain file name")
    program = q.get("program")
    ftype = None
    if isinstance(program, list) and program and isinstance(program[-1], dict):
        ftype = program[-1].get("function", program[-1].get("type"))
    answer = q.get("answer")
    return {
        "question": q["question"],
        "answer": None if answer is None else strings.setdefault(answer, answer),
        "image_index": q["image_index"],
        "family": q.get("question_family_index", -1),
        "question_index": q.get("question_index", i),
        "image_filename": strings.setdefault(name, name),
        "type": strings.setdefault(ftype, ftype) if isinstance(ftype, str) else None,
    }


class _QuestionSink:
    """Takes the questions of a "questions" list one at a time, as they are decoded, and keeps each one checked
    and compact (`_question_row`): the file's programs and other fields are dropped at once, never held whole.
    The first bad question's DataError is kept, to be raised once the whole file is known to be valid JSON."""

    def __init__(self, path: str, split: str):
        self.path, self.split = path, split
        self.rows: list[dict[str, Any]] = []
        self.error: DataError | None = None
        self.strings: dict[str, str] = {}

    def __call__(self, i: int, q: Any) -> None:
        if self.error is None:
            try:
                self.rows.append(_question_row(q, i, f"{self.path}: question {i}", self.split, self.strings))
            except DataError as e:
                self.error, self.rows = e, []


def _stream_list(dec: json.JSONDecoder, text: str, i: int, sink: _QuestionSink, bar: Any) -> tuple[Any, int]:
    """Decode the JSON list starting at text[i] (a "[") one element at a time into `sink`; (sink, end)."""
    ws = _WS.match
    i, n, mark = ws(text, i + 1).end(), 0, i
    if text[i : i + 1] == "]":
        return sink, i + 1
    while True:
        item, i = dec.raw_decode(text, i)
        sink(n, item)
        n += 1
        if n % 4096 == 0:
            bar.update(i - mark)
            mark = i
        i = ws(text, i).end()
        c = text[i : i + 1]
        if c == "]":
            bar.update(i - mark)
            return sink, i + 1
        if c != ",":
            raise _Fallback
        i = ws(text, i + 1).end()


def _stream_questions(text: str, path: str, split: str, bar: Any) -> dict[str, Any]:
    """The members of the JSON object `text`, its "questions" list streamed into a `_QuestionSink` (the same
    values `json.loads` gives, the last of repeated keys winning); `_Fallback` (or a JSONDecodeError) when
    `text` is anything else, so that `json.loads` then gives the usual result or error."""
    dec, ws = json.JSONDecoder(), _WS.match
    members: dict[str, Any] = {}
    i = ws(text, 0).end()
    if text[i : i + 1] != "{":
        raise _Fallback
    i = ws(text, i + 1).end()
    while text[i : i + 1] != "}":
        if text[i : i + 1] != '"':
            raise _Fallback
        key, i = dec.raw_decode(text, i)
        i = ws(text, i).end()
        if text[i : i + 1] != ":":
            raise _Fallback
        i = ws(text, i + 1).end()
        if key == "questions" and text[i : i + 1] == "[":
            members[key], i = _stream_list(dec, text, i, _QuestionSink(path, split), bar)
        else:
            members[key], i = dec.raw_decode(text, i)
        i = ws(text, i).end()
        if text[i : i + 1] == ",":
            i = ws(text, i + 1).end()
            if text[i : i + 1] == "}":  # a trailing comma
                raise _Fallback
        elif text[i : i + 1] != "}":
            raise _Fallback
    if ws(text, i + 1).end() != len(text):
        raise _Fallback
    return members


def _read_text(path: str) -> str:
    """The file as text, or a DataError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_questions(path: str, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parse and validate a CLEVR questions file: (questions as checked dicts, the file's `info`).

    The questions list is decoded one question at a time (with a progress bar on stderr), so that memory holds
    the file's text and the checked questions, never the whole parsed file with its programs (its peak is the
    read, about twice the file's size; the parsed file took about six times, and the garbage collector's passes
    over its millions of objects took most of the parse's time).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: questions file not found (prepare other splits with --splits)")
    text = _read_text(path)
    bar = _bar(None, f"read {os.path.basename(path)}", total=len(text), unit="B", unit_scale=True)
    try:
        try:
            doc = _stream_questions(text, path, split, bar)
        except (_Fallback, json.JSONDecodeError):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            if isinstance(doc, dict) and isinstance(doc.get("questions"), list):
                sink = _QuestionSink(path, split)
                for i, q in enumerate(doc["questions"]):
                    sink(i, q)
                doc["questions"] = sink
    finally:
        bar.close()
    del text
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), _QuestionSink):
        raise DataError(f'{path}: expected an object with a "questions" list (CLEVR v1.0 format)')
    if doc["questions"].error is not None:
        raise doc["questions"].error
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    return doc["questions"].rows, info


def family_names(questions: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, str]:
    """Family index → name: `info["question_families"]` (fastfilm synth) or, for real CLEVR, the question type
    of `CLEVR_eval_with_q_type.py` (the last program function, e.g. `count`, `equal_color`; several families
    share one type, and evaluation then reports per type, as that script does)."""
    names = info.get("question_families")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return {str(i): n for i, n in enumerate(names)}
    by_family: dict[int, Counter] = defaultdict(Counter)  # (not setdefault: a Counter made per question)
    for q in questions:
        if q["family"] >= 0:
            by_family[q["family"]][q["type"] or f"family_{q['family']}"] += 1
    return {str(f): c.most_common(1)[0][0] for f, c in sorted(by_family.items())}


def make_vocab(
    train: list[dict[str, Any]],
    info: dict[str, Any],
    min_count: int = 1,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The vocabulary of a train split (questions and answers), with family names and its hash.

    Words seen fewer than `min_count` times are left out (they encode as `<UNK>`; the original's
    `--unk_threshold`). With `base` (another vocabulary): its ids and answers are kept and the split's words it
    lacks are appended in sorted order (the original's `preprocess_questions.py --expand_vocab 1`).
    """
    counts = Counter(t for q in train for t in tokenize(q["question"]))
    kept = [t for t, c in counts.items() if c >= min_count]
    if base is None:
        q2i = build_vocab([kept])
        a2i = build_vocab([q["answer"]] for q in train if q["answer"] is not None)
    else:
        q2i = dict(base["question_token_to_idx"])
        for t in sorted(kept):
            q2i.setdefault(t, len(q2i))
        a2i = dict(base["answer_token_to_idx"])
    return {
        "format": FORMAT_VERSION,
        "question_token_to_idx": q2i,
        "answer_token_to_idx": a2i,
        "question_family_names": family_names(train, info),
        "hash": vocab_hash(q2i, a2i),
    }


def vocab_source_file(path: str) -> str:
    """The file `--vocab-from PATH` reads here: PATH, or PATH/vocab.json for a folder (a cache, an exported model,
    a checkpoint tag). A run folder and the original's checkpoints are model files: `fastfilm.prepare` reads them."""
    return os.path.join(path, "vocab.json") if os.path.isdir(path) else path


def read_vocab_source(path: str) -> tuple[str, dict[str, Any]]:
    """The vocabulary `--vocab-from` names, as (the file read, the vocabulary): a vocab.json (fastfilm's, or the
    original's with program tokens) or a folder holding one (a cache, an exported model, a checkpoint tag).

    `prepare`'s `read_vocab` reads more: `fastfilm.prepare.read_vocab_source` also takes a run folder (its `best`
    checkpoint's) and a checkpoint of the original code, the sources `fastfilm prep --vocab-from` takes."""
    file = vocab_source_file(path)
    if not os.path.isfile(file):
        raise DataError(
            f"{file}: not found (--vocab-from takes a vocab.json, a cache or model folder, or an original checkpoint)"
        )
    if not file.endswith(".json"):
        raise DataError(f"{file}: not a vocab.json (`fastfilm prep --vocab-from` also reads original checkpoints)")
    return file, check_vocab(_read_json(file), file)


def check_vocab(raw: Any, file: str) -> dict[str, Any]:
    """A vocabulary read from `file` (fastfilm's or the original's) as `make_vocab` takes it: both token → id maps,
    ids 0..n-1, the special tokens at their ids, and the question family names (if any); DataError otherwise."""
    out: dict[str, Any] = {}
    for key in ("question_token_to_idx", "answer_token_to_idx"):
        tok = raw.get(key) if isinstance(raw, dict) else None
        if not isinstance(tok, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in tok.values()
        ):
            raise DataError(f"{file}: '{key}' missing or not a token → id mapping")
        if sorted(tok.values()) != list(range(len(tok))):
            raise DataError(f"{file}: {key}: the ids are not 0..{len(tok) - 1}")
        out[key] = {str(k): v for k, v in sorted(tok.items(), key=lambda kv: kv[1])}
    for special, idx in SPECIAL_TOKENS.items():
        if out["question_token_to_idx"].get(special) != idx:
            raise DataError(f"{file}: question_token_to_idx: {special} must be {idx}")
    names = raw.get("question_family_names") if isinstance(raw, dict) else None
    out["question_family_names"] = names if isinstance(names, dict) else {}
    return out


def discover_splits(clevr_dir: str) -> list[str]:
    """Every split with a `questions/CLEVR_{split}_questions.json` (train splits first, then by name)."""
    folder = os.path.join(clevr_dir, "questions")
    if not os.path.isdir(folder):
        raise DataError(
            f"{folder}: no such folder (expected a CLEVR v1.0 folder with questions/ and images/)"
        )
    found = []
    for name in os.listdir(folder):
        m = re.fullmatch(r"CLEVR_(.+)_questions\.json", name)
        if m and _SPLIT_RE.match(m.group(1)):
            found.append(m.group(1))
    if not found:
        raise DataError(f"{folder}: no CLEVR_{{split}}_questions.json files")
    return sorted(found, key=lambda s: (not s.startswith("train"), s))


def _bar(items: Any, desc: str, **kwargs: Any) -> Any:
    """A tqdm progress bar on stderr, cleared when done (TQDM_DISABLE=1 hides it)."""
    from tqdm import tqdm

    from fastfilm.core.errors import progress_off

    return tqdm(items, desc=desc, leave=False, mininterval=0.5, disable=progress_off(), **kwargs)


def encode_split(
    questions: list[dict[str, Any]], vocab: dict[str, Any], present: set[str] | None, where: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of a split (see the module docstring) and its counts (skips, unknown words and answers)."""
    q2i, a2i = vocab["question_token_to_idx"], vocab["answer_token_to_idx"]
    unk = a2i.get(UNK, SPECIAL_TOKENS[UNK])
    ids, answers, image_index, family, qindex = [], [], [], [], []
    files: dict[int, str] = {}
    missing: list[str] = []
    unknown_words = Counter()
    unknown_answers = Counter()
    n_unk_q = 0
    no_answer = 0
    with _bar(questions, f"encode {os.path.basename(where)}", unit="q") as bar:
        for i, q in enumerate(bar):
            if present is not None and q["image_filename"] not in present:
                missing.append(f"question {i} → {q['image_filename']}")
                continue
            prev = files.setdefault(q["image_index"], q["image_filename"])
            if prev != q["image_filename"]:
                raise DataError(
                    f"{where}: question {i}: image_index {q['image_index']} names {q['image_filename']}, an earlier "
                    f"question names {prev} for the same index"
                )
            toks = tokenize(q["question"])
            row, n_unknown = encode_tokens(toks, q2i)
            if n_unknown:
                n_unk_q += 1
                unknown_words.update(t for t in toks if t not in q2i)
            ids.append(row)
            if q["answer"] is None:
                answers.append(-1)
                no_answer += 1
            elif q["answer"] in a2i:
                answers.append(a2i[q["answer"]])
            else:
                answers.append(unk)
                unknown_answers[q["answer"]] += 1
            image_index.append(q["image_index"])
            family.append(q["family"])
            qindex.append(q["question_index"])
    if not ids:
        detail = f" ({len(missing)} skipped: their images are missing)" if missing else ""
        raise DataError(f"{where}: the split has no usable questions{detail}")
    if no_answer and no_answer != len(ids):
        raise DataError(f"{where}: {no_answer} of {len(ids)} questions have no 'answer' (all or none must)")
    max_len = max(len(r) for r in ids)
    qs = np.zeros((len(ids), max_len), np.int32)
    for r, row in enumerate(ids):
        qs[r, : len(row)] = row
    num_images = max(files) + 1
    image_files = [files.get(i, "") for i in range(num_images)]
    arrays = {
        "questions": qs,
        "lengths": np.array([len(r) for r in ids], np.int32),
        "answers": np.array(answers, np.int32),
        "image_index": np.array(image_index, np.int32),
        "family": np.array(family, np.int32),
        "question_index": np.array(qindex, np.int64),
        "image_files": np.array(image_files, dtype=f"<U{max(1, max(len(s) for s in image_files))}"),
        "vocab_hash": np.array(vocab["hash"]),
    }
    stats = {
        "questions": len(ids),
        "max_length": int(max_len),
        "images": num_images,
        "images_referenced": len(files),
        "skipped_missing_image": len(missing),
        "skipped_examples": missing[:5],
        "questions_with_unknown_words": n_unk_q,
        "unknown_words": dict(unknown_words.most_common(20)),
        "unknown_answers": dict(unknown_answers.most_common(20)),
        "questions_with_unknown_answer": sum(unknown_answers.values()),
        "has_answers": no_answer == 0,
    }
    return arrays, stats


# ------------------------------------------------------------------------------------------------ images
def check_png_header(path: str) -> str | None:
    """Why a file is not an 8-bit RGB/RGBA 480×320 PNG (from its IHDR chunk), or None if it looks fine."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if not head:
        return "zero-byte file"
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return "not a PNG file"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, ctype = head[24], head[25]
    if ctype not in (2, 6):
        return f"{_COLOR_TYPES.get(ctype, f'color type {ctype}')} PNG (expected RGB or RGBA)"
    if depth != 8:
        return f"{depth}-bit PNG (expected 8 bits per channel)"
    if (w, h) != CLEVR_SIZE:
        return f"{w}×{h} pixels (expected CLEVR's {CLEVR_SIZE[0]}×{CLEVR_SIZE[1]})"
    return None


def load_image(path: str, size: int | None) -> np.ndarray:
    """An image as uint8 RGB [H, W, 3], resized to size×size with PIL bicubic (the original's resize) if given."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    if size is not None:
        rgb = rgb.resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def _image_job(job: tuple[str, list[tuple[int, str]], int | None]) -> list[tuple[int, Any]]:
    """Worker: check (and, with a size, decode and resize) images; (row, array or None) or (row, error)."""
    folder, items, size = job
    out: list[tuple[int, Any]] = []
    for row, name in items:
        path = os.path.join(folder, name)
        try:
            why = check_png_header(path)
            if why is None and size is not None:
                out.append((row, load_image(path, size)))
                continue
        except Exception as e:  # a corrupt or truncated file: report it, never crash the worker
            why = f"cannot decode ({type(e).__name__}: {e})"
        out.append((row, why if why is not None else None))
    return out


def _pool(workers: int):
    import multiprocessing as mp

    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)


def process_images(
    folder: str,
    image_files: Sequence[str],
    size: int | None,
    workers: int,
    dest: np.ndarray | None,
    desc: str,
) -> None:
    """Check every named image (and with `size` write its resized pixels into `dest[row]`), in parallel.

    Raises DataError listing the bad files; never leaves a worker crashed or a pool running.
    """
    from tqdm import tqdm

    items = [(r, n) for r, n in enumerate(image_files) if n]
    step = 16 if size is not None else 512
    jobs = [(folder, items[i : i + step], size) for i in range(0, len(items), step)]
    bad: list[str] = []
    pool = _pool(workers) if workers > 1 and len(jobs) > 1 else None
    bar = tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True, leave=False)
    try:
        results = pool.imap_unordered(_image_job, jobs) if pool is not None else map(_image_job, jobs)
        for res in results:
            for row, value in res:
                if isinstance(value, str):
                    bad.append(f"{os.path.join(folder, image_files[row])}: {value}")
                elif value is not None and dest is not None:
                    dest[row] = value
            bar.update(len(res))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if bad:
        bad.sort()
        more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad image(s) in {folder}:\n  " + "\n  ".join(bad[:10]) + more)


# ------------------------------------------------------------------------------------------------ loading
def load_vocab(cache_dir: str) -> dict[str, Any]:
    """The cache's vocabulary (`question_token_to_idx`, `answer_token_to_idx`, `question_family_names`, `hash`).

    The model's sizes are `len(v["question_token_to_idx"])` and `len(v["answer_token_to_idx"])`.
    """
    path = os.path.join(cache_dir, "vocab.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (run `fastfilm prep --clevr DIR --out {cache_dir}` first)")
    v = _read_json(path)
    for key in ("question_token_to_idx", "answer_token_to_idx", "hash"):
        if key not in v:
            raise DataError(f"{path}: missing '{key}' (rerun fastfilm prep)")
    if vocab_hash(v["question_token_to_idx"], v["answer_token_to_idx"]) != v["hash"]:
        raise DataError(
            f"{path}: the vocabulary does not match its hash (edited or corrupt; rerun fastfilm prep)"
        )
    v.setdefault("question_family_names", {})
    return v


def load_split(cache_dir: str, split: str, *, vocab_hash: str | None = None) -> dict[str, np.ndarray]:
    """A split's arrays (see the module docstring), checked against the cache's vocab.json (or `vocab_hash`)."""
    path = split_file(cache_dir, split)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (run `fastfilm prep --splits {split}` on the CLEVR folder)")
    expected = vocab_hash or load_vocab(cache_dir)["hash"]
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated .npz is a bad zip file
        raise DataError(f"{path}: cannot read ({e}); rerun fastfilm prep") from None
    got = str(arrays.pop("vocab_hash", ""))
    if got != expected:
        source = "the expected vocabulary" if vocab_hash else os.path.join(cache_dir, "vocab.json")
        raise DataError(
            f"{path} was encoded with vocabulary {got[:12] or '?'}…, but {source} is {expected[:12]}… "
            "(questions prepared with another vocabulary); rerun fastfilm prep"
        )
    return arrays


# ------------------------------------------------------------------------------------------------ prepare
def _versions() -> dict[str, str]:
    import PIL

    return {"format": str(FORMAT_VERSION), "numpy": np.__version__, "pillow": PIL.__version__}


@dataclass
class _Plan:
    """One `prepare` run: its options, the inputs as they are now, and the previous manifest."""

    clevr_dir: str
    out_dir: str
    splits: list[str]
    image_size: int | None
    workers: int
    old: dict[str, Any]  # the previous manifest ({} when missing, unreadable or of other versions)
    src: dict[str, dict[str, Any]] = field(default_factory=dict)  # per split: questions/images fingerprints
    listings: dict[str, set[str]] = field(default_factory=dict)  # per split: the PNG files present

    def split_ok(self, s: str, vhash: str | None) -> bool:
        """Whether split `s`'s cached files are up to date (for vocabulary `vhash`, None: any)."""
        e = self.old.get("splits", {}).get(s, {})
        return (
            os.path.isfile(split_file(self.out_dir, s))
            and e.get("source") == self.src[s]
            and (vhash is None or e.get("vocab_hash") == vhash)
            and (
                self.image_size is None
                or (
                    os.path.isfile(image_cache_file(self.out_dir, s, self.image_size))
                    and self.image_size in e.get("image_sizes", [])
                )
            )
        )


@dataclass
class _VocabPlan:
    """Where `prepare` takes the vocabulary from, and whether the cache's vocab.json already is that one."""

    base: dict[str, Any] | None  # the --vocab-from vocabulary
    vocab_split: str | None  # the first train split asked for
    build_split: str | None  # the split the vocabulary is built from (None: --vocab-from as it is, or kept)
    source: Any  # what the manifest records the vocabulary was made from
    opts: dict[str, Any]  # --vocab-from / --expand-vocab / --unk-threshold, as recorded
    unk_threshold: int
    ok: bool = False  # vocab.json exists and was made from `source`


def _check_arguments(
    clevr_dir: str,
    splits: Sequence[str],
    image_size: int | None,
    vocab_from: str | None,
    expand_vocab: bool,
    unk_threshold: int,
    read_vocab: Callable[[str], tuple[str, dict[str, Any]]],
) -> tuple[list[str], tuple[str, dict[str, Any]] | None]:
    """Validate `prepare`'s options (nothing on disk is touched yet): (the splits, repeats dropped; the
    --vocab-from (file, vocabulary) or None)."""
    if not isinstance(unk_threshold, int) or isinstance(unk_threshold, bool) or unk_threshold < 1:
        raise DataError(f"prep: --unk-threshold must be a positive integer, got {unk_threshold!r}")
    if expand_vocab and not vocab_from:
        raise DataError("prep: --expand-vocab needs --vocab-from (the vocabulary to expand)")
    given = read_vocab(vocab_from) if vocab_from else None
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise DataError("prep: no splits given")
    for s in splits:
        if not _SPLIT_RE.match(s):
            raise DataError(f"prep: bad split name {s!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"prep: --image-size must be a positive integer, got {image_size!r}")
    if not os.path.isdir(clevr_dir):
        raise DataError(
            f"{clevr_dir}: no such folder (expected a CLEVR v1.0 folder with questions/ and images/)"
        )
    return splits, given


def _read_manifest(path: str) -> dict[str, Any]:
    """The cache's previous manifest, or {} when it is missing, unreadable or written by other versions."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("versions") != _versions() or not isinstance(old.get("splits"), dict):
            old = {}
    except (OSError, ValueError):
        old = {}
    return old


def _look_at_inputs(plan: _Plan) -> None:
    """Fill `plan.src` and `plan.listings`: each split's questions file and images folder as they are now."""
    for s in plan.splits:
        qp = questions_path(plan.clevr_dir, s)
        if not os.path.isfile(qp):
            raise DataError(f"{qp}: questions file not found (prepare other splits with --splits)")
        folder = images_dir(plan.clevr_dir, s)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: images folder not found")
        plan.listings[s], dir_fp = _dir_listing(folder)
        plan.src[s] = {"questions": _file_fp(qp), "images": dir_fp}


def _plan_vocab(
    plan: _Plan,
    given: tuple[str, dict[str, Any]] | None,
    expand_vocab: bool,
    unk_threshold: int,
) -> _VocabPlan:
    """Where the vocabulary comes from, and whether the cache already holds it (a DataError when it cannot be
    made: --expand-vocab without a train split, or no vocab.json and nothing to build one from)."""
    vf, base = given if given is not None else (None, None)  # --vocab-from's (file, vocabulary)
    vocab_split = next((s for s in plan.splits if s.startswith("train")), None)
    vocab_path = os.path.join(plan.out_dir, "vocab.json")
    if expand_vocab and vocab_split is None:
        raise DataError("prep: --expand-vocab needs a train split (a name starting with 'train') in --splits")
    if unk_threshold != 1 and vocab_split is None and base is None:
        raise DataError(
            "prep: --unk-threshold needs a train split (a name starting with 'train') in --splits: the vocabulary "
            "is built from it"
        )
    build_split = vocab_split if base is None or expand_vocab else None  # the split the vocabulary reads
    source: Any = plan.src[build_split]["questions"] if build_split else None
    opts: dict[str, Any] = {}
    if base is not None:
        opts = {"vocab_from": os.path.abspath(vf), "vocab_from_file": _file_fp(vf), "expand": expand_vocab}
    if unk_threshold != 1:
        opts["unk_threshold"] = unk_threshold
    if opts:
        source = {"questions": source, **opts}
    v = _VocabPlan(base, vocab_split, build_split, source, opts, unk_threshold)
    v.ok = os.path.isfile(vocab_path) and (
        (vocab_split is None and not opts) or plan.old.get("vocab", {}).get("source") == source
    )
    if vocab_split is None and base is None and not os.path.isfile(vocab_path):
        raise DataError(f"prep: {vocab_path} does not exist and no train split was given to build it from")
    return v


def _vocabulary(plan: _Plan, v: _VocabPlan, parsed: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary: the cache's (when up to date), --vocab-from's as it is, or built from the train split
    (whose parsed questions are left in `parsed` for encoding)."""
    if v.ok:
        return load_vocab(plan.out_dir)
    if v.build_split is None:  # --vocab-from as it is
        q2i, a2i = v.base["question_token_to_idx"], v.base["answer_token_to_idx"]
        return {
            "format": FORMAT_VERSION,
            "question_token_to_idx": q2i,
            "answer_token_to_idx": a2i,
            "question_family_names": v.base["question_family_names"],
            "hash": vocab_hash(q2i, a2i),
        }
    qp = questions_path(plan.clevr_dir, v.build_split)
    parsed[v.build_split] = read_questions(qp, v.build_split)
    if not parsed[v.build_split][0]:
        raise DataError(f"{qp}: the split has no questions")
    return make_vocab(*parsed[v.build_split], min_count=v.unk_threshold, base=v.base)


def _new_manifest(plan: _Plan, v: _VocabPlan, vocab: dict[str, Any]) -> dict[str, Any]:
    """The manifest this run writes, holding (so far) the entries of the splits it leaves alone."""
    old = plan.old
    return {
        "versions": _versions(),
        "clevr_dir": os.path.abspath(plan.clevr_dir),
        "vocab": {
            "source": v.source if (v.vocab_split or v.opts) else old.get("vocab", {}).get("source"),
            "hash": vocab["hash"],
        },
        "vocab_summary": {
            "question_tokens": len(vocab["question_token_to_idx"]),
            "answers": len(vocab["answer_token_to_idx"]),
            "families": len(vocab["question_family_names"]),
            "hash": vocab["hash"],
            "built_from": v.build_split
            or (v.opts.get("vocab_from") if v.base is not None else None)
            or old.get("vocab_summary", {}).get("built_from"),
            "vocab_from": v.opts.get("vocab_from"),
            "new_words": len(vocab["question_token_to_idx"]) - len(v.base["question_token_to_idx"])
            if v.base is not None
            else 0,
        },
        "splits": {k: e for k, e in old.get("splits", {}).items() if k not in plan.splits},
    }


def _write_image_cache(
    plan: _Plan, s: str, folder: str, files: list[str], temps: list[str]
) -> tuple[str, str]:
    """Decode and resize split `s`'s images into a temp .npy; returns (temp, final path)."""
    size = plan.image_size
    final = image_cache_file(plan.out_dir, s, size)
    tmp = _tmp(final)
    temps.append(tmp)
    dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    process_images(folder, files, size, plan.workers, dest, f"prep {s}: images {size}px")
    dest.flush()
    del dest
    return tmp, final


def _write_split(
    plan: _Plan,
    s: str,
    vocab: dict[str, Any],
    parsed: dict[str, Any],
    temps: list[str],
    commits: list[tuple[str, str]],
    written: list[str],
) -> dict[str, Any]:
    """Encode split `s` (and check its images, or write their cache) into temp files queued in `commits`;
    returns its manifest entry."""
    entry = plan.old.get("splits", {}).get(s, {})
    qp = questions_path(plan.clevr_dir, s)
    questions, _ = parsed.pop(s, None) or read_questions(qp, s)
    if not questions:
        raise DataError(f"{qp}: the split has no questions (leave it out with --splits)")
    arrays, stats = encode_split(questions, vocab, plan.listings[s], qp)
    del questions
    folder = images_dir(plan.clevr_dir, s)
    files = [str(x) for x in arrays["image_files"]]
    sizes = [n for n in entry.get("image_sizes", []) if entry.get("source") == plan.src[s]]
    if plan.image_size is None:
        process_images(folder, files, None, plan.workers, None, f"prep {s}: check images")
    else:
        tmp, final = _write_image_cache(plan, s, folder, files, temps)
        commits.append((tmp, final))
        written.append(final)
        sizes = sorted(set(sizes) | {plan.image_size})
        stats["image_cache"] = final
    final = split_file(plan.out_dir, s)
    tmp = _tmp(final)
    temps.append(tmp)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    commits.insert(0, (tmp, final))
    written.append(final)
    return {"source": plan.src[s], "vocab_hash": vocab["hash"], "image_sizes": sizes, "stats": stats}


def _remove_stale_image_caches(plan: _Plan, manifest_splits: dict[str, Any]) -> None:
    """Delete the image caches of the re-encoded splits whose size the manifest no longer lists."""
    for s_name, e in manifest_splits.items():
        if s_name in plan.splits:
            for name in os.listdir(plan.out_dir):
                m = re.fullmatch(rf"{re.escape(s_name)}_images_(\d+)\.npy", name)
                if m and int(m.group(1)) not in e["image_sizes"]:
                    os.remove(os.path.join(plan.out_dir, name))


def _write_cache(plan: _Plan, v: _VocabPlan) -> dict[str, Any]:
    """Write what is out of date (temp files, renamed into place only once all are written); returns the
    summary without its time."""
    temps: list[str] = []
    commits: list[tuple[str, str]] = []  # (temp, final), renamed in this order at the very end
    parsed: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    try:
        vocab = _vocabulary(plan, v, parsed)
        manifest = _new_manifest(plan, v, vocab)
        summary: dict[str, Any] = {
            "cache": plan.out_dir,
            "up_to_date": False,
            "vocab": manifest["vocab_summary"],
            "splits": {},
            "written": [],
        }
        for s in plan.splits:
            if plan.split_ok(s, vocab["hash"]):
                entry = dict(plan.old.get("splits", {}).get(s, {}))
                manifest["splits"][s] = entry
                summary["splits"][s] = entry.get("stats", {})
                continue
            manifest["splits"][s] = _write_split(plan, s, vocab, parsed, temps, commits, summary["written"])
            summary["splits"][s] = manifest["splits"][s]["stats"]
        if not v.ok:
            vocab_path = os.path.join(plan.out_dir, "vocab.json")
            commits.append((_write_json(vocab_path, vocab, temps), vocab_path))
            summary["written"].append(vocab_path)
        manifest_path = os.path.join(plan.out_dir, "manifest.json")
        commits.append((_write_json(manifest_path, manifest, temps), manifest_path))
        for tmp, final in commits:
            _replace(tmp, final)
        _remove_stale_image_caches(plan, manifest["splits"])
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return summary


def prepare(
    clevr_dir: str,
    out_dir: str,
    *,
    image_size: int | None = None,
    workers: int | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    vocab_from: str | None = None,
    expand_vocab: bool = False,
    unk_threshold: int = 1,
    read_vocab: Callable[[str], tuple[str, dict[str, Any]]] = read_vocab_source,
) -> dict[str, Any]:
    """Build (or bring up to date) the cache of a CLEVR-format folder; returns a summary of what it did.

    The vocabulary is built from the first split whose name starts with `train` (words seen at least
    `unk_threshold` times), or taken from `vocab_from`, read by `read_vocab` (`read_vocab_source`: a vocab.json or
    a folder holding one; `fastfilm.prepare.prepare` passes a reader of model files too); with `expand_vocab`
    the train split's new words are appended to it.
    """
    t0 = time.time()
    splits, given = _check_arguments(
        clevr_dir, splits, image_size, vocab_from, expand_vocab, unk_threshold, read_vocab
    )
    workers = max(1, workers or os.cpu_count() or 1)
    check_output_folder(out_dir, "prep --out")
    os.makedirs(out_dir, exist_ok=True)
    _clean_stale_temps(out_dir)
    old = _read_manifest(os.path.join(out_dir, "manifest.json"))
    plan = _Plan(clevr_dir, out_dir, splits, image_size, workers, old)
    _look_at_inputs(plan)
    v = _plan_vocab(plan, given, expand_vocab, unk_threshold)
    if v.ok and all(plan.split_ok(s, old.get("vocab", {}).get("hash")) for s in splits):
        return {
            "cache": out_dir,
            "up_to_date": True,
            "vocab": old.get("vocab_summary", {}),
            "splits": {s: old["splits"][s].get("stats", {}) for s in splits},
            "written": [],
            "seconds": round(time.time() - t0, 2),
        }
    summary = _write_cache(plan, v)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The prep summary as console lines."""
    if s["up_to_date"]:
        head = f"prep: cache {s['cache']} is up to date (nothing to do)"
    else:
        head = f"prep: wrote {len(s['written'])} file(s) to {s['cache']} in {s['seconds']:.1f}s"
    v = s.get("vocab", {})
    lines = [
        head,
        f"  vocabulary: {v.get('question_tokens', '?')} question tokens, {v.get('answers', '?')} answer ids "
        f"(hash {str(v.get('hash', '?'))[:12]})"
        + (f"; from {v['vocab_from']}, {v.get('new_words', 0)} new word(s)" if v.get("vocab_from") else ""),
    ]
    for name, st in s["splits"].items():
        if not st:
            continue
        line = f"  {name}: {st['questions']} questions, {st['images']} images, max length {st['max_length']}"
        extras = []
        if st.get("skipped_missing_image"):
            extras.append(f"{st['skipped_missing_image']} skipped (image missing)")
        if st.get("questions_with_unknown_words"):
            extras.append(f"{st['questions_with_unknown_words']} with unknown words → <UNK>")
        if st.get("questions_with_unknown_answer"):
            extras.append(
                f"{st['questions_with_unknown_answer']} answers not in the train vocabulary → <UNK>"
            )
        if not st.get("has_answers", True):
            extras.append("no answers")
        lines.append(line + (f" ({'; '.join(extras)})" if extras else ""))
    return "\n".join(lines)


def run(
    args: argparse.Namespace, read_vocab: Callable[[str], tuple[str, dict[str, Any]]] = read_vocab_source
) -> int:
    """`fastfilm prep`: prepare the cache and print what was done (or that nothing needed doing); `read_vocab`
    reads `--vocab-from` (see `prepare`; the command passes `fastfilm.prepare.read_vocab_source`)."""
    given = getattr(args, "splits", None)
    if given is None:
        splits = discover_splits(args.clevr)
    else:
        splits = [s.strip() for s in str(given).split(",") if s.strip()]
    s = prepare(
        args.clevr,
        args.out,
        image_size=args.image_size,
        workers=args.workers,
        splits=splits,
        vocab_from=getattr(args, "vocab_from", None),
        expand_vocab=getattr(args, "expand_vocab", False),
        unk_threshold=getattr(args, "unk_threshold", 1),
        read_vocab=read_vocab,
    )
    print(format_summary(s))
    if getattr(args, "features_h5", None):
        from fastfilm.data.feature_files import convert_features_h5, features_file, h5_split

        for spec in args.features_h5:
            split, h5 = h5_split(spec)
            shape, dtype = convert_features_h5(h5, features_file(args.out, split))
            print(f"  {split}: {h5} → {features_file(args.out, split)} ({dtype} {list(shape)})")
    for name, st in s["splits"].items():
        if st.get("skipped_examples"):
            print(f"  {name}: skipped e.g. {', '.join(st['skipped_examples'][:3])}", file=sys.stderr)
    return 0

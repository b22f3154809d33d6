"""`fastfilm synth`: a synthetic data set in exactly CLEVR v1.0's layout and JSON schema.

Scenes hold 3–10 non-overlapping objects with CLEVR's attributes (8 colours, 3 shapes, 2 sizes, 2 materials),
drawn with numpy/PIL (simple diffuse shading; metal adds a specular highlight) on a 480×320 RGBA canvas.
Difficulty knobs (defaults are CLEVR's): objects per scene (`min_objects`/`max_objects`), `object_scale`
(draw objects larger), `families` (ask only some families) and `max_filters` (at most this many attribute
words in one object description; CLEVR: 3).
Questions come from 11 families (below) with CLEVR's 28 answers, and are balanced so that the question alone
says little about the answer:

1. Per image and question slot, every *pattern* of the slot's family (a template with its attribute slots,
   e.g. "count of things with a given colour and shape") is tried on the scene (all fillings, or a random
   sample of them), giving the set of answers the scene can produce for that pattern.
2. Then, one image after the other in a fixed order, a greedy balancer picks (pattern, answer): a pattern may
   only take an answer whose count is at most one above the least-given of the pattern's usual answers (those
   the scenes allow at least 10% of the time). Each pattern's answers thus stay near-uniform, whatever the
   filled-in words (those are symmetric: every colour, shape… is equally likely), so neither the family nor
   the exact question text predicts the answer well. The summary measures this: the accuracy on val of the
   best question-only predictor (majority answer per family, per template, per exact text), fit on train.
3. A random filling of the pattern with that answer is rendered to text (with CLEVR-style synonyms) and a
   CLEVR-style functional program.

Everything is deterministic for a seed: each image's scene, drawing and candidate questions use an RNG seeded
from (seed, split, index, …), so any number of worker processes gives the same bytes; the balancer runs in the
parent in index order. Writes are atomic (temp file, then `os.replace`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fastfilm.core.errors import DataError, check_output_folder

WIDTH, HEIGHT = 480, 320
SPLITS = ("train", "val", "test")
# CLEVR-CoGenT: condition A gives cubes and cylinders these colours, condition B swaps them; spheres take any.
COGENT_COLORS: dict[str, dict[str, tuple[str, ...]]] = {
    "A": {"cube": ("gray", "blue", "brown", "yellow"), "cylinder": ("red", "green", "purple", "cyan")},
    "B": {"cube": ("red", "green", "purple", "cyan"), "cylinder": ("gray", "blue", "brown", "yellow")},
}
COGENT_SPLITS = ("trainA", "valA", "valB", "testA", "testB")

COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("large", "small")
MATERIALS = ("rubber", "metal")
ATTRS = ("size", "color", "material", "shape")  # CLEVR's word order in a noun phrase
VALUES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "color": tuple(COLORS),
    "material": MATERIALS,
    "shape": SHAPES,
}
RELATIONS = ("left", "right", "front", "behind")
COUNT_ANSWERS = tuple(str(i) for i in range(11))
ANSWERS: tuple[str, ...] = ("yes", "no", *COUNT_ANSWERS, *COLORS, *SHAPES, *SIZES, *MATERIALS)  # CLEVR's 28

FAMILIES = (
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
)

SYNONYMS: dict[str, tuple[str, ...]] = {
    "large": ("large", "big"),
    "small": ("small", "tiny"),
    "rubber": ("rubber", "matte"),
    "metal": ("metal", "shiny", "metallic"),
    "cube": ("cube", "block"),
    "sphere": ("sphere", "ball"),
    "cylinder": ("cylinder",),
    "thing": ("thing", "object"),
}
REL_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "front": ("in front of",),
    "behind": ("behind",),
}
TAU = 0.10  # an answer is "usual" for a pattern when scenes allow it at least this often
SLACK = 1  # how far one answer's count may run ahead of the pattern's least-given usual answer
CAP = 48  # fillings tried per pattern and slot (all of them when there are fewer)
PATTERNS_PER_SLOT = (
    8  # patterns of the slot's family tried per slot (a random subset, independent of answers)
)


# ------------------------------------------------------------------------------------------------ scenes
def make_scene(
    rng: random.Random,
    min_objects: int = 3,
    max_objects: int = 10,
    object_scale: float = 1.0,
    condition: str | None = None,
) -> list[dict[str, Any]]:
    """`min_objects`–`max_objects` objects (CLEVR: 3–10) with random attributes, placed without overlap and
    with unambiguous relations; `object_scale` > 1 draws them larger than CLEVR's. With a CoGenT `condition`
    ("A" or "B"), cubes and cylinders take only that condition's colours (`COGENT_COLORS`)."""
    while True:
        n = rng.randint(min_objects, max_objects)
        objs: list[dict[str, Any]] = []
        for _ in range(400):
            if len(objs) == n:
                break
            size = rng.choice(SIZES)
            x3, y3 = rng.uniform(-2.8, 2.8), rng.uniform(-3.0, 3.0)
            t = (y3 + 3.0) / 6.0
            scale = 0.65 + 0.45 * t
            r = (34.0 if size == "large" else 19.0) * scale * object_scale
            ground = 110.0 + 180.0 * t
            px, py = 240.0 + x3 * 62.0 * scale, ground - r
            ok = all(
                math.hypot(px - o["_px"], py - o["_py"]) >= r * 1.05 + o["_r"] * 1.05 + 4.0
                and abs(px - o["_px"]) >= 6.0
                and abs(ground - o["_ground"]) >= 3.0
                for o in objs
            )
            if not ok:
                continue
            if condition is None:
                color, shape = rng.choice(VALUES["color"]), rng.choice(SHAPES)
            else:
                shape = rng.choice(SHAPES)
                color = rng.choice(COGENT_COLORS[condition].get(shape, VALUES["color"]))
            objs.append(
                {
                    "color": color,
                    "shape": shape,
                    "size": size,
                    "material": rng.choice(MATERIALS),
                    "3d_coords": [round(x3, 4), round(y3, 4), 0.7 if size == "large" else 0.35],
                    "pixel_coords": [int(round(px)), int(round(py)), round(12.0 - 1.5 * y3, 4)],
                    "rotation": round(rng.uniform(0.0, 360.0), 4),
                    "_px": px,
                    "_py": py,
                    "_r": r,
                    "_ground": ground,
                }
            )
        if len(objs) >= min_objects:
            return objs


def relationships(objs: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """CLEVR's `relationships`: rel[name][i] lists the objects that are `name` of object i (as seen)."""
    n = len(objs)
    rel: dict[str, list[list[int]]] = {k: [] for k in RELATIONS}
    for i in range(n):
        oi = objs[i]
        others = [j for j in range(n) if j != i]
        rel["left"].append([j for j in others if objs[j]["_px"] < oi["_px"]])
        rel["right"].append([j for j in others if objs[j]["_px"] > oi["_px"]])
        rel["front"].append([j for j in others if objs[j]["_ground"] > oi["_ground"]])
        rel["behind"].append([j for j in others if objs[j]["_ground"] < oi["_ground"]])
    return rel


# ------------------------------------------------------------------------------------------------ drawing
_BACKGROUND: np.ndarray | None = None
_LIGHT = np.array([-0.45, -0.65, 0.62]) / np.linalg.norm([-0.45, -0.65, 0.62])
_HALF = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + np.array([0.0, 0.0, 1.0]))


def _background() -> np.ndarray:
    global _BACKGROUND
    if _BACKGROUND is None:
        y = np.linspace(0.0, 1.0, HEIGHT)[:, None]
        x = np.linspace(-1.0, 1.0, WIDTH)[None, :]
        g = 152.0 - 34.0 * y - 10.0 * x**2
        _BACKGROUND = np.repeat(g[:, :, None], 3, axis=2).astype(np.float32)
    return _BACKGROUND


def _paste(canvas: np.ndarray, x0: int, y0: int, cover: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-blend `rgb` (h×w×3) into canvas at (x0, y0) with coverage `cover` (h×w in [0, 1]), clipped."""
    h, w = cover.shape
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, WIDTH), min(y0 + h, HEIGHT)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    c = cover[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None]
    src = rgb[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    dst = canvas[cy0:cy1, cx0:cx1]
    dst[...] = dst * (1.0 - c) + src * c


def _grid(cx: float, cy: float, half_w: float, half_h: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    x0, y0 = int(math.floor(cx - half_w - 2)), int(math.floor(cy - half_h - 2))
    x1, y1 = int(math.ceil(cx + half_w + 2)), int(math.ceil(cy + half_h + 2))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return x0, y0, xs + 0.5, ys + 0.5


def _shade(base: np.ndarray, nx, ny, nz, metal: bool) -> np.ndarray:
    """Colour for surface normals (nx, ny, nz): ambient + diffuse; metal is darker with a specular spot."""
    lx, ly, lz = (float(v) for v in _LIGHT)
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)
    if metal:
        hx, hy, hz = (float(v) for v in _HALF)
        spec = np.clip(nx * hx + ny * hy + nz * hz, 0.0, 1.0) ** 40
        out = base * (0.22 + 0.58 * diffuse)[..., None]
        out += (235.0 * spec)[..., None]
        return np.minimum(out, 255.0, out=out)
    return base * (0.38 + 0.62 * diffuse)[..., None]


def draw_scene(objs: list[dict[str, Any]]) -> np.ndarray:
    """The scene as a 320×480×4 uint8 RGBA array (alpha 255, like CLEVR's PNGs)."""
    canvas = _background().copy()
    for o in objs:  # soft shadows on the ground
        x0, y0, xs, ys = _grid(o["_px"] + 0.35 * o["_r"], o["_ground"], 1.3 * o["_r"], 0.45 * o["_r"])
        d = ((xs - o["_px"] - 0.35 * o["_r"]) / (1.3 * o["_r"])) ** 2 + (
            (ys - o["_ground"]) / (0.45 * o["_r"])
        ) ** 2
        cover = np.clip(1.0 - d, 0.0, 1.0) * 0.45
        _paste(canvas, x0, y0, cover, np.zeros(cover.shape + (3,), np.float32))
    for o in sorted(objs, key=lambda o: o["_ground"]):  # back to front
        base = np.array(COLORS[o["color"]], np.float32)
        metal = o["material"] == "metal"
        cx, cy, r = o["_px"], o["_py"], o["_r"]
        if o["shape"] == "sphere":
            x0, y0, xs, ys = _grid(cx, cy, r, r)
            nx, ny = (xs - cx) / r, (ys - cy) / r
            rr = nx**2 + ny**2
            nz = np.sqrt(np.clip(1.0 - rr, 0.0, 1.0))
            cover = np.clip((1.0 - np.sqrt(rr)) * r + 0.5, 0.0, 1.0)
            _paste(canvas, x0, y0, cover, _shade(base, nx, ny, nz, metal))
        elif o["shape"] == "cylinder":
            ry = 0.32 * r  # ellipse half-height of the top and bottom
            top, bottom = cy - 0.85 * r + ry, cy + 0.85 * r - ry
            x0, y0, xs, ys = _grid(cx, cy, r, 0.85 * r)
            nx = np.clip((xs - cx) / r, -1.0, 1.0)
            in_x = np.clip((1.0 - np.abs(nx)) * r + 0.5, 0.0, 1.0)
            e_top = nx**2 + ((ys - top) / ry) ** 2
            e_bot = nx**2 + ((ys - bottom) / ry) ** 2
            body = in_x * ((ys >= top) & ((ys <= bottom) | (e_bot <= 1.0)))
            cap = np.clip((1.0 - np.sqrt(e_top)) * ry + 0.5, 0.0, 1.0)
            nz = np.sqrt(np.clip(1.0 - nx**2, 0.0, 1.0))
            side = _shade(base, nx, np.full_like(nx, 0.15), nz, metal)
            lid = _shade(base, nx * 0.3, np.full_like(nx, -0.9), np.full_like(nx, 0.35), metal)
            _paste(canvas, x0, y0, np.maximum(body, cap), np.where((cap > 0)[..., None], lid, side))
        else:  # cube: front face, top face and one side face (which side follows the rotation)
            s = r / 0.7
            d = 0.4 * s
            flip = (o["rotation"] % 90.0) >= 45.0
            fx0 = cx - 0.7 * r + (d if flip else 0.0)
            fy0 = cy - 0.7 * r + d
            x0, y0, xs, ys = _grid(cx, cy, r, r)
            u, v = xs - fx0, ys - fy0  # front-face coordinates
            front = (u >= 0) & (u <= s) & (v >= 0) & (v <= s)
            w = u - v if flip else u + v  # the top face leans towards the visible side
            top = (v < 0) & (v >= -d) & (w >= 0) & (w <= s)
            if flip:
                side = (u < 0) & (u >= -d) & (v - u <= s) & (v - u >= 0) & ~top
            else:
                side = (u > s) & (u <= s + d) & (v + (u - s) >= 0) & (v + (u - s) <= s) & ~top
            ones = np.ones_like(u)
            g = (u / s - 0.5) * 0.5
            c_front = _shade(base, g, 0.1 * ones, 0.95 * ones, metal)
            c_top = _shade(base, g * 0.4, -0.9 * ones, 0.4 * ones, metal)
            c_side = _shade(base, (0.85 if not flip else -0.85) * ones, 0.1 * ones, 0.5 * ones, metal)
            rgb = np.where(front[..., None], c_front, np.where(top[..., None], c_top, c_side))
            _paste(canvas, x0, y0, (front | top | side).astype(np.float32), rgb)
    out = np.full((HEIGHT, WIDTH, 4), 255, np.uint8)
    canvas += 0.5
    np.clip(canvas, 0.0, 255.0, out=canvas)
    out[..., :3] = canvas
    return out


# ------------------------------------------------------------------------------------------------ questions
class SceneIndex:
    """Bit masks of a scene's objects per attribute value and relation, for fast question evaluation."""

    def __init__(self, objs: list[dict[str, Any]], rel: dict[str, list[list[int]]]):
        self.objs = objs
        self.n = len(objs)
        self.all = (1 << self.n) - 1
        self.masks = {a: {v: 0 for v in VALUES[a]} for a in ATTRS}
        for i, o in enumerate(objs):
            for a in ATTRS:
                self.masks[a][o[a]] |= 1 << i
        self.rel = {k: [sum(1 << j for j in rel[k][i]) for i in range(self.n)] for k in RELATIONS}
        self._uniq: dict[tuple[str, ...], list] = {}
        self._refs: list | None = None

    def mask(self, desc: tuple[tuple[str, str], ...]) -> int:
        m = self.all
        for a, v in desc:
            m &= self.masks[a][v]
        return m

    def unique(self, desc) -> int:
        """The index of the only object matching desc, or -1."""
        m = self.mask(desc)
        return m.bit_length() - 1 if m and not m & (m - 1) else -1

    def uniq(self, subset: tuple[str, ...]) -> list[tuple[tuple, int]]:
        """(description, object) for every description over `subset` that names exactly one object."""
        u = self._uniq.get(subset)
        if u is None:
            seen: dict[tuple, int] = {}
            for o in self.objs:
                d = tuple((a, o[a]) for a in subset)
                if d not in seen:
                    seen[d] = self.unique(d)
            u = self._uniq[subset] = [(d, i) for d, i in seen.items() if i >= 0]
        return u

    def refs(self) -> list[tuple[tuple, int]]:
        """Every (1- or 2-attribute description, object) naming exactly one object (relation anchors)."""
        if self._refs is None:
            self._refs = [r for s in _subsets(ATTRS, (1, 2)) for r in self.uniq(s)]
        return self._refs


@functools.cache
def _subsets(attrs: tuple[str, ...], sizes: tuple[int, ...]) -> list[tuple[str, ...]]:
    return [c for k in sizes for c in itertools.combinations(attrs, k)]


def _others(attr: str) -> tuple[str, ...]:
    return tuple(a for a in ATTRS if a != attr)


@functools.cache
def _descs(subset: tuple[str, ...]) -> list[tuple[tuple[str, str], ...]]:
    return [tuple(zip(subset, vals)) for vals in itertools.product(*(VALUES[a] for a in subset))]


@functools.cache
def _desc_pairs(subset: tuple[str, ...]) -> list[tuple[tuple, tuple]]:
    ds = _descs(subset)
    return [(a, b) for a in ds for b in ds if a != b]


def _sample(items: list, rng: random.Random) -> list:
    return rng.sample(items, min(CAP, len(items)))


def patterns(family: str) -> list[tuple]:
    """The patterns (template structure: attribute slots, operator, queried attribute) of a family."""
    if family == "exist":
        return [("exist", s) for s in _subsets(ATTRS, (1, 2, 3))]
    if family == "count":
        return [("count", s) for s in _subsets(ATTRS, (0, 1, 2, 3))]
    if family.startswith("query_"):
        q = family[6:]
        return [(family, s) for s in _subsets(_others(q), (1, 2, 3))]
    if family == "compare_integer":
        return [
            ("compare_integer", op, s) for op in ("more", "fewer", "equal") for s in _subsets(ATTRS, (1, 2))
        ]
    if family in ("same_attribute", "count_same"):
        return [(family, q, s) for q in ATTRS for s in _subsets(_others(q), (1, 2))]
    if family == "relate_query":
        return [("relate_query", q, s) for q in ATTRS for s in _subsets(_others(q), (0, 1))]
    if family == "relate_exist":
        return [("relate_exist", s) for s in _subsets(ATTRS, (1, 2))]
    raise ValueError(family)


def _relate_fillings(ix: SceneIndex, rng: random.Random, subset2: tuple[str, ...]) -> Iterator[tuple]:
    """Random (relation, d1, object of d1, d2) with d1 naming exactly one object (CAP of them)."""
    refs = ix.refs()
    d2s = _descs(subset2)
    r, n1, n2 = rng.random, len(refs), len(d2s)
    if not n1:
        return
    for _ in range(CAP):
        d1, i = refs[int(r() * n1)]
        yield RELATIONS[int(r() * 4)], d1, i, d2s[int(r() * n2)]


def options(ix: SceneIndex, pattern: tuple, rng: random.Random) -> dict[str, tuple]:
    """answer → one random filling of `pattern` that gives that answer on this scene."""
    family = pattern[0]
    out: dict[str, tuple] = {}

    def add(answer: str, filling: tuple) -> None:
        if answer not in out:
            out[answer] = filling

    if family in ("exist", "count"):
        for d in _sample(_descs(pattern[1]), rng):
            c = ix.mask(d).bit_count()
            add(("yes" if c else "no") if family == "exist" else str(c), (d,))
    elif family.startswith("query_"):
        q = family[6:]
        for d, i in _sample(ix.uniq(pattern[1]), rng):
            add(ix.objs[i][q], (d,))
    elif family == "compare_integer":
        op, subset = pattern[1], pattern[2]
        for d1, d2 in _sample(_desc_pairs(subset), rng):
            c1, c2 = ix.mask(d1).bit_count(), ix.mask(d2).bit_count()
            if c1 + c2 == 0:
                continue
            yes = c1 > c2 if op == "more" else c1 < c2 if op == "fewer" else c1 == c2
            add("yes" if yes else "no", (d1, d2))
    elif family in ("same_attribute", "count_same"):
        q, subset = pattern[1], pattern[2]
        uniq = ix.uniq(subset)
        if family == "same_attribute":
            pairs = [(a, b) for a in uniq for b in uniq if a[1] != b[1]]
            for (d1, i1), (d2, i2) in _sample(pairs, rng):
                add("yes" if ix.objs[i1][q] == ix.objs[i2][q] else "no", (d1, d2))
        else:
            for d, i in _sample(uniq, rng):
                same = ix.masks[q][ix.objs[i][q]] & ~(1 << i)
                add(str(same.bit_count()), (d,))
    elif family == "relate_query":
        q, subset2 = pattern[1], pattern[2]
        for rel, d1, i, d2 in _relate_fillings(ix, rng, subset2):
            m = ix.rel[rel][i] & ix.mask(d2)
            if m and not m & (m - 1):
                add(ix.objs[m.bit_length() - 1][q], (rel, d1, d2))
    elif family == "relate_exist":
        for rel, d1, i, d2 in _relate_fillings(ix, rng, pattern[1]):
            add("yes" if ix.rel[rel][i] & ix.mask(d2) else "no", (rel, d1, d2))
    return out


def _phrase(desc, rng: random.Random, plural: bool = False) -> str:
    vals = dict(desc)
    words = [rng.choice(SYNONYMS.get(vals[a], (vals[a],))) for a in ATTRS[:3] if a in vals]
    words.append(rng.choice(SYNONYMS.get(vals.get("shape", "thing"), (vals.get("shape", "thing"),))))
    return " ".join(words) + ("s" if plural else "")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _filters(prog: list[dict], desc, start: int) -> int:
    last = start
    for a, v in desc:
        prog.append({"inputs": [last], "function": f"filter_{a}", "value_inputs": [v]})
        last = len(prog) - 1
    return last


def _scene_prog(prog: list[dict]) -> int:
    prog.append({"inputs": [], "function": "scene", "value_inputs": []})
    return len(prog) - 1


def _node(prog: list[dict], function: str, inputs: list[int], values: list[str] | None = None) -> int:
    prog.append({"inputs": inputs, "function": function, "value_inputs": values or []})
    return len(prog) - 1


# Question templates per queried attribute (query_* families) and per comparison (compare_integer).
_QUERY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {d}?", "The {d} is what color?", "What is the color of the {d}?"),
    "shape": ("What shape is the {d}?", "What is the shape of the {d}?", "The {d} has what shape?"),
    "size": ("What size is the {d}?", "How big is the {d}?", "What is the size of the {d}?"),
    "material": (
        "What material is the {d}?",
        "What is the {d} made of?",
        "What is the material of the {d}?",
    ),
}
_COMPARE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "more": ("Are there more {p} than {q}?", "Is the number of {p} greater than the number of {q}?"),
    "fewer": ("Are there fewer {p} than {q}?", "Is the number of {p} less than the number of {q}?"),
    "equal": (
        "Are there an equal number of {p} and {q}?",
        "Are there the same number of {p} and {q}?",
        "Is the number of {p} the same as the number of {q}?",
    ),
}
_COMPARE_FUNCTIONS = {"more": "greater_than", "fewer": "less_than", "equal": "equal_integer"}

# Each _render_* writes a family's program into `prog` and returns its text. The order of the RNG draws (the
# template first, then the phrases in the template's argument order) is part of the data: keep it.


def _render_exist(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """exist: "Is there a …?"."""
    (d,) = filling
    text = rng.choice(("Is there {a}?", "Are there any {p}?")).format(
        a=_a(_phrase(d, rng)), p=_phrase(d, rng, True)
    )
    _node(prog, "exist", [_filters(prog, d, _scene_prog(prog))])
    return text


def _render_count(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """count: "How many … are there?"."""
    (d,) = filling
    text = rng.choice(("How many {p} are there?", "What number of {p} are there?")).format(
        p=_phrase(d, rng, True)
    )
    _node(prog, "count", [_filters(prog, d, _scene_prog(prog))])
    return text


def _render_query(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """query_*: "What color is the …?" (the attribute is the family's suffix)."""
    family = pattern[0]
    q = family[6:]
    (d,) = filling
    t = _QUERY_TEMPLATES[q]
    text = rng.choice(t).format(d=_phrase(d, rng))
    last = _node(prog, "unique", [_filters(prog, d, _scene_prog(prog))])
    _node(prog, family, [last])
    return text


def _render_compare_integer(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """compare_integer: "Are there more … than …?" (more, fewer or equal)."""
    op = pattern[1]
    d1, d2 = filling
    t = _COMPARE_TEMPLATES[op]
    text = rng.choice(t).format(p=_phrase(d1, rng, True), q=_phrase(d2, rng, True))
    c1 = _node(prog, "count", [_filters(prog, d1, _scene_prog(prog))])
    c2 = _node(prog, "count", [_filters(prog, d2, _scene_prog(prog))])
    _node(prog, _COMPARE_FUNCTIONS[op], [c1, c2])
    return text


def _render_same_attribute(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """same_attribute: "Is the … the same color as the …?"."""
    q = pattern[1]
    d1, d2 = filling
    t = (
        "Is the {x} the same {q} as the {y}?",
        "Does the {x} have the same {q} as the {y}?",
        "Do the {x} and the {y} have the same {q}?",
    )
    text = rng.choice(t).format(x=_phrase(d1, rng), y=_phrase(d2, rng), q=q)
    u1 = _node(prog, "unique", [_filters(prog, d1, _scene_prog(prog))])
    q1 = _node(prog, f"query_{q}", [u1])
    u2 = _node(prog, "unique", [_filters(prog, d2, _scene_prog(prog))])
    q2 = _node(prog, f"query_{q}", [u2])
    _node(prog, f"equal_{q}", [q1, q2])
    return text


def _render_count_same(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """count_same: "How many other things have the same color as the …?"."""
    q = pattern[1]
    (d,) = filling
    t = (
        "What number of other {o} are the same {q} as the {d}?",
        "How many other {o} have the same {q} as the {d}?",
        "How many other {o} are the same {q} as the {d}?",
    )
    text = rng.choice(t).format(o=rng.choice(("things", "objects")), q=q, d=_phrase(d, rng))
    u = _node(prog, "unique", [_filters(prog, d, _scene_prog(prog))])
    _node(prog, "count", [_node(prog, f"same_{q}", [u])])
    return text


def _render_relate_query(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """relate_query: "What color is the … left of the …?"."""
    q = pattern[1]
    rel, d1, d2 = filling
    t = ("What {q} is the {y} {r} the {x}?", "What is the {q} of the {y} that is {r} the {x}?")
    text = rng.choice(t).format(q=q, y=_phrase(d2, rng), r=rng.choice(REL_WORDS[rel]), x=_phrase(d1, rng))
    u1 = _node(prog, "unique", [_filters(prog, d1, _scene_prog(prog))])
    r = _node(prog, "relate", [u1], [rel])
    u2 = _node(prog, "unique", [_filters(prog, d2, r)])
    _node(prog, f"query_{q}", [u2])
    return text


def _render_relate_exist(pattern: tuple, filling: tuple, rng: random.Random, prog: list[dict]) -> str:
    """relate_exist: "Is there a … left of the …?"."""
    rel, d1, d2 = filling
    t = ("Is there {y} {r} the {x}?", "Are there any {ys} {r} the {x}?")
    text = rng.choice(t).format(
        y=_a(_phrase(d2, rng)),
        ys=_phrase(d2, rng, True),
        r=rng.choice(REL_WORDS[rel]),
        x=_phrase(d1, rng),
    )
    u1 = _node(prog, "unique", [_filters(prog, d1, _scene_prog(prog))])
    r = _node(prog, "relate", [u1], [rel])
    _node(prog, "exist", [_filters(prog, d2, r)])
    return text


_RENDERERS = {
    "exist": _render_exist,
    "count": _render_count,
    "query_": _render_query,
    "compare_integer": _render_compare_integer,
    "same_attribute": _render_same_attribute,
    "count_same": _render_count_same,
    "relate_query": _render_relate_query,
    "relate_exist": _render_relate_exist,
}


def render(pattern: tuple, filling: tuple, rng: random.Random) -> tuple[str, list[dict]]:
    """The question text and CLEVR-style program for a pattern filled with `filling`."""
    family = pattern[0]
    renderer = _RENDERERS.get("query_" if family.startswith("query_") else family)
    if renderer is None:
        raise ValueError(family)
    prog: list[dict] = []
    text = renderer(pattern, filling, rng, prog)
    return text, prog


# ------------------------------------------------------------------------------------------------ workers
def _rng(seed: int, *parts: Any) -> random.Random:
    # str seeds go through sha512: the same stream in every process, whatever PYTHONHASHSEED says
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _image_name(split: str, index: int) -> str:
    return f"CLEVR_{split}_{index:06d}.png"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _scene_task(task: tuple) -> tuple:
    """Worker: draw and write one image; per question slot, the answers (with a filling each) its patterns allow."""
    import io

    from PIL import Image

    out_dir, split, index, seed, k, scene_opts, (fams, max_filters) = task
    objs = make_scene(_rng(seed, split, index, "scene"), *scene_opts)
    rel = relationships(objs)
    buf = io.BytesIO()
    Image.fromarray(draw_scene(objs), "RGBA").save(buf, format="PNG", compress_level=1)
    _write_atomic(os.path.join(out_dir, "images", split, _image_name(split, index)), buf.getvalue())
    ix = SceneIndex(objs, rel)
    slots = []
    for slot in range(k):
        rng = _rng(seed, split, index, slot)
        family_index = (index * k + slot) % len(fams)
        for shift in range(len(fams)):  # a family no pattern of which fits this scene gives way
            fam = fams[(family_index + shift) % len(fams)]
            pats = [p for p in patterns(fam) if len(p[-1]) <= max_filters]
            if len(pats) > PATTERNS_PER_SLOT:
                pats = rng.sample(pats, PATTERNS_PER_SLOT)
            feasible = {p: opts for p in pats if (opts := options(ix, p, rng))}
            if feasible:
                break
        slots.append((FAMILIES.index(fam), feasible, rng.random(), rng.getrandbits(64)))
    scene = {
        "image_index": index,
        "image_filename": _image_name(split, index),
        "split": split,
        "objects": [{k2: v for k2, v in o.items() if not k2.startswith("_")} for o in objs],
        "relationships": rel,
    }
    return split, index, scene, slots


class Balancer:
    """Greedy choice of (pattern, answer) per question slot that keeps each pattern's answers near-uniform."""

    def __init__(self) -> None:
        self.count: Counter = Counter()  # (pattern, answer) → questions given
        self.feasible: Counter = Counter()  # (pattern, answer) → slots where the scene allowed it
        self.evaluated: Counter = Counter()  # pattern → slots where it was tried
        self.used: Counter = Counter()  # pattern → questions given
        self.answers: dict[tuple, set[str]] = defaultdict(set)

    def choose(self, feasible: dict[tuple, Any], tie: float) -> tuple[tuple, str]:
        """Pick (pattern, answer) among those this slot's scene allows."""
        for p, answers in feasible.items():
            self.evaluated[p] += 1
            for a in answers:
                self.feasible[p, a] += 1
                self.answers[p].add(a)
        eligible, fallback = [], []
        for p in sorted(feasible):
            usual = [b for b in self.answers[p] if self.feasible[p, b] >= TAU * self.evaluated[p]]
            floor = min(self.count[p, b] for b in usual) if len(usual) >= 2 else None
            for a in feasible[p]:
                key = (self.count[p, a], self.used[p], p, a)
                fallback.append(key)
                if floor is not None and self.count[p, a] <= floor + SLACK:
                    eligible.append(key)
        pool = eligible or fallback
        best = min(k[:2] for k in pool)
        ties = [k for k in pool if k[:2] == best]
        _, _, p, a = ties[min(int(tie * len(ties)), len(ties) - 1)]
        self.count[p, a] += 1
        self.used[p] += 1
        return p, a


# ------------------------------------------------------------------------------------------------ baseline
def question_only_baseline(train: list[tuple], val: list[tuple]) -> dict[str, Any]:
    """Accuracy on val of majority-answer predictors fit on train; rows are (family, pattern, text, answer).

    Three predictors: the majority answer per family; per (family, template); per (family, exact text), each
    falling back to the coarser one when a key was not seen in train. Per family and overall: each one's
    accuracy, the best of them, chance (1 / number of distinct answers of the family in val) and template
    chance (guessing uniformly among the answers the question's template can have: "What color…" has 8).
    """

    def majority(rows, key):
        c: dict[Any, Counter] = defaultdict(Counter)
        for r in rows:
            c[key(r)][r[3]] += 1
        return {k: v.most_common(1)[0][0] for k, v in c.items()}

    keys = {
        "family": lambda r: r[0],
        "template": lambda r: (r[0], r[1]),
        "text": lambda r: (r[0], r[2]),
    }
    maj = {name: majority(train, k) for name, k in keys.items()}

    def predict(name, r):
        order = {
            "family": ["family"],
            "template": ["template", "family"],
            "text": ["text", "template", "family"],
        }
        for n in order[name]:
            p = maj[n].get(keys[n](r))
            if p is not None:
                return p
        return None

    template_answers: dict[tuple, set[str]] = defaultdict(set)
    for r in (*train, *val):
        template_answers[r[0], r[1]].add(r[3])
    per_family: dict[str, dict[str, Any]] = {}
    hits: dict[str, int] = Counter()
    for fam in sorted({r[0] for r in val}, key=FAMILIES.index):
        rows = [r for r in val if r[0] == fam]
        e: dict[str, Any] = {
            "questions": len(rows),
            "chance": 1.0 / len({r[3] for r in rows}),
            "chance_template": sum(1.0 / len(template_answers[r[0], r[1]]) for r in rows) / len(rows),
        }
        for name in keys:
            h = sum(predict(name, r) == r[3] for r in rows)
            hits[name] += h
            e[name] = h / len(rows)
        e["best"] = max(e[n] for n in keys)
        per_family[fam] = e
    n = len(val)
    overall = {name: (hits[name] / n if n else 0.0) for name in keys}
    overall["best"] = max(overall.values()) if n else 0.0
    best_per_family = sum(e["best"] * e["questions"] for e in per_family.values()) / n if n else 0.0
    return {
        "fit_on": "train",
        "measured_on": "val",
        "overall": overall,
        "overall_best_per_family": best_per_family,
        "families": per_family,
    }


# ------------------------------------------------------------------------------------------------ main
def _dump_json(path: str, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _info(split: str, seed: int) -> dict[str, Any]:
    return {
        "split": split,
        "version": "1.0",
        "date": "",
        "license": "synthetic (fastfilm synth), CC BY 4.0",
        "generator": "fastfilm synth",
        "seed": seed,
        "question_families": list(FAMILIES),
    }


def _check_options(
    sizes: dict[str, Any],
    questions_per_image: Any,
    min_objects: Any,
    max_objects: Any,
    object_scale: Any,
    families: Sequence[str] | None,
    max_filters: Any,
) -> tuple[str, ...]:
    """Validate `generate`'s options (a DataError names the first bad one); returns the families to ask."""
    for name, v in [
        *((f"{k}_images", n) for k, n in sizes.items()),
        ("questions_per_image", questions_per_image),
    ]:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"synth: {name} must be a non-negative integer, got {v!r}")
    if questions_per_image < 1:
        raise DataError("synth: questions_per_image must be at least 1")
    if not (
        isinstance(min_objects, int)
        and isinstance(max_objects, int)
        and 2 <= min_objects <= max_objects <= 12
    ):
        raise DataError(
            f"synth: objects per scene must satisfy 2 <= min <= max <= 12, got {min_objects}-{max_objects}"
        )
    if not (isinstance(object_scale, (int, float)) and 0.5 <= object_scale <= 2.0):
        raise DataError(f"synth: object_scale must be in [0.5, 2.0], got {object_scale!r}")
    fams = tuple(FAMILIES if families is None else families)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown or not fams or len(set(fams)) != len(fams):
        raise DataError(
            f"synth: families must be distinct names from {', '.join(FAMILIES)}; got {', '.join(fams) or 'none'}"
        )
    if not (isinstance(max_filters, int) and 1 <= max_filters <= 3):
        raise DataError(f"synth: max_filters must be 1, 2 or 3, got {max_filters!r}")
    return fams


def _split_plan(sizes: dict[str, int], cogent: bool) -> list[tuple[str, int, str | None]]:
    """(split, images, CoGenT condition): CLEVR's three splits, or CLEVR-CoGenT's five."""
    if cogent:
        return [(s, sizes[s[:-1]], s[-1]) for s in COGENT_SPLITS]
    return [(s, sizes[s], None) for s in SPLITS]


def _refuse_a_set_synth_did_not_write(out_dir: str) -> None:
    """Refuse an `out_dir` that holds CLEVR-format questions but no `synth_summary.json` (e.g. the real CLEVR):
    synth would overwrite its questions, scenes and images."""
    qdir = os.path.join(out_dir, "questions")
    if not os.path.isdir(qdir) or os.path.isfile(os.path.join(out_dir, "synth_summary.json")):
        return
    found = sorted(n for n in os.listdir(qdir) if n.endswith("_questions.json"))
    if found:
        raise DataError(
            f"synth --out {out_dir}: holds a CLEVR-format set that synth did not write ({qdir}/{found[0]}, no "
            "synth_summary.json); nothing was written (give another folder, or delete this one to regenerate)"
        )


def _make_folders(out_dir: str, split_sizes: dict[str, int]) -> None:
    """Create the output folders; remove images of an earlier, larger run and temp files of a killed one."""
    for split in split_sizes:
        folder = os.path.join(out_dir, "images", split)
        os.makedirs(folder, exist_ok=True)
        pat = re.compile(rf"CLEVR_{split}_(\d{{6}})\.png$")
        for name in os.listdir(folder):  # images of an earlier, larger run
            m = pat.match(name)
            if (m and int(m.group(1)) >= split_sizes[split]) or ".png.tmp-" in name:
                os.remove(os.path.join(folder, name))
    os.makedirs(os.path.join(out_dir, "questions"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "scenes"), exist_ok=True)


def _question(
    split: str, index: int, fam: int, text: str, prog: list[dict], number: int, answer: str
) -> dict:
    """One question in CLEVR's JSON schema (test splits carry no answer, as CLEVR's)."""
    q = {
        "image_index": index,
        "program": prog,
        "question_index": number,
        "image_filename": _image_name(split, index),
        "question_family_index": fam,
        "split": split,
        "question": text,
    }
    if not split.startswith("test"):
        q["answer"] = answer
    return q


def _draw_and_ask(
    tasks: list[tuple], workers: int, split_sizes: dict[str, int]
) -> tuple[dict[str, list], dict[str, list], dict[str, list[tuple]]]:
    """Run the scene tasks (in worker processes when `workers` > 1) and balance their questions, in task order.

    Returns per split: the scenes, the questions, and rows (family, pattern, text, answer) for the baseline.
    """
    from tqdm import tqdm

    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
    scenes: dict[str, list] = {s: [] for s in split_sizes}
    questions: dict[str, list] = {s: [] for s in split_sizes}
    rows: dict[str, list[tuple]] = {s: [] for s in split_sizes}  # (family, pattern, text, answer)
    balancers = {s: Balancer() for s in split_sizes}
    try:
        # Results come back in task order, so the balancer sees the same sequence for any worker count.
        results = pool.imap(_scene_task, tasks, chunksize=8) if pool is not None else map(_scene_task, tasks)
        bar = tqdm(total=len(tasks), desc="synth", unit="img", dynamic_ncols=True, leave=False)
        for split, index, scene, slots in results:
            scenes[split].append(scene)
            for fam, feasible, tie, text_seed in slots:
                pattern, answer = balancers[split].choose(feasible, tie)
                text, prog = render(pattern, feasible[pattern][answer], random.Random(text_seed))
                questions[split].append(
                    _question(split, index, fam, text, prog, len(questions[split]), answer)
                )
                rows[split].append((FAMILIES[fam], pattern, text, answer))
            bar.update(1)
        bar.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return scenes, questions, rows


def _write_split(
    out_dir: str, split: str, seed: int, scenes: list, questions: list, rows: list[tuple], images: int
) -> dict[str, Any]:
    """Write a split's questions and scenes files; returns its summary entry."""
    _dump_json(
        os.path.join(out_dir, "questions", f"CLEVR_{split}_questions.json"),
        {"info": _info(split, seed), "questions": questions},
    )
    _dump_json(
        os.path.join(out_dir, "scenes", f"CLEVR_{split}_scenes.json"),
        {"info": _info(split, seed), "scenes": scenes},
    )
    by_family: dict[str, Counter] = defaultdict(Counter)
    for fam, _, _, answer in rows:
        by_family[fam][answer] += 1
    return {
        "images": images,
        "questions": len(questions),
        "answers_written": not split.startswith("test"),
        "answers_by_family": {f: dict(sorted(c.items())) for f, c in sorted(by_family.items())},
    }


def generate(
    out_dir: str,
    *,
    train_images: int,
    val_images: int,
    test_images: int,
    questions_per_image: int,
    seed: int,
    workers: int | None = None,
    min_objects: int = 3,
    max_objects: int = 10,
    object_scale: float = 1.0,
    families: Sequence[str] | None = None,
    max_filters: int = 3,
    cogent: bool = False,
) -> dict[str, Any]:
    """Write a CLEVR v1.0-format data set (images, questions, scenes) to `out_dir`; returns the summary.

    With `cogent`, the splits are CLEVR-CoGenT's: trainA (`train_images`), valA and valB (`val_images` each),
    testA and testB (`test_images` each), condition A and B colouring cubes and cylinders differently
    (`COGENT_COLORS`).

    The summary (also written to `out_dir/synth_summary.json`) holds the counts, the answer distribution per
    family and the question-only baseline (see `question_only_baseline`).
    """
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    fams = _check_options(
        sizes, questions_per_image, min_objects, max_objects, object_scale, families, max_filters
    )
    check_output_folder(out_dir, "synth --out")
    _refuse_a_set_synth_did_not_write(out_dir)
    scene_opts = (min_objects, max_objects, float(object_scale))
    plan = _split_plan(sizes, cogent)
    split_sizes = {s: n for s, n, _ in plan}
    t0 = time.time()
    k = questions_per_image
    _make_folders(out_dir, split_sizes)  # every option is valid: only now is anything on disk touched
    tasks = [
        (out_dir, s, i, seed, k, (*scene_opts, cond), (fams, max_filters))
        for s, n, cond in plan
        for i in range(n)
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, max(1, len(tasks))))
    scenes, questions, rows = _draw_and_ask(tasks, workers, split_sizes)
    summary: dict[str, Any] = {
        "out": os.path.abspath(out_dir),
        "seed": seed,
        "questions_per_image": k,
        "objects": [min_objects, max_objects],
        "object_scale": float(object_scale),
        "families": list(fams),
        "max_filters": max_filters,
        **({"cogent": COGENT_COLORS} if cogent else {}),
        "splits": {
            split: _write_split(out_dir, split, seed, scenes[split], questions[split], rows[split], n)
            for split, n in split_sizes.items()
        },
    }
    train_rows, val_rows = rows[plan[0][0]], rows[plan[1][0]]  # the baseline: fit on train, measured on val
    summary["question_only_baseline"] = (
        question_only_baseline(train_rows, val_rows) if train_rows and val_rows else None
    )
    summary["seconds"] = round(time.time() - t0, 2)
    _write_atomic(
        os.path.join(out_dir, "synth_summary.json"),
        json.dumps({k2: v for k2, v in summary.items() if k2 not in ("seconds", "out")}, indent=2).encode(
            "utf-8"
        ),
    )
    return summary


def format_baseline(b: dict[str, Any] | None) -> str:
    """The question-only baseline as a console table."""
    if not b:
        return "question-only baseline: needs train and val questions"
    lines = [
        "question-only baseline (majority answer fit on train, accuracy on val):",
        f"  {'family':<17} {'n':>6} {'chance':>7} {'t.chance':>8} {'family':>7} {'templ.':>7} {'text':>7} "
        f"{'best':>7}",
    ]
    for fam, e in b["families"].items():
        lines.append(
            f"  {fam:<17} {e['questions']:>6} {100 * e['chance']:>6.1f}% {100 * e['chance_template']:>7.1f}% "
            f"{100 * e['family']:>6.1f}% "
            f"{100 * e['template']:>6.1f}% {100 * e['text']:>6.1f}% {100 * e['best']:>6.1f}%"
        )
    o = b["overall"]
    lines.append(
        f"  {'overall':<17} {'':>6} {'':>7} {'':>8} {100 * o['family']:>6.1f}% {100 * o['template']:>6.1f}% "
        f"{100 * o['text']:>6.1f}% {100 * o['best']:>6.1f}%  (best per family: "
        f"{100 * b['overall_best_per_family']:.1f}%)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`fastfilm synth`: generate the data set and print the summary."""
    s = generate(
        args.out,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        questions_per_image=args.questions_per_image,
        seed=args.seed,
        workers=getattr(args, "workers", None),
        min_objects=getattr(args, "min_objects", 3),
        max_objects=getattr(args, "max_objects", 10),
        object_scale=getattr(args, "object_scale", 1.0),
        families=args.families.split(",") if getattr(args, "families", None) else None,
        max_filters=getattr(args, "max_filters", 3),
        cogent=getattr(args, "cogent", False),
    )
    counts = ", ".join(
        f"{k} {v['images']} images / {v['questions']} questions" for k, v in s["splits"].items()
    )
    print(f"synth: wrote {s['out']} ({counts}) in {s['seconds']:.1f}s")
    print(format_baseline(s["question_only_baseline"]))
    return 0

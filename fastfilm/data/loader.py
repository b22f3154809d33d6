"""The DALI loader: batches of (image, question, length, answer, family, index) from a `fastfilm prep` cache.

One `fn.external_source` (batch mode, with `batch_info`) feeds the question-side arrays and the image data of
a batch together, so the two always belong to the same questions; DALI does the image work:

- `image_source="cache"`: the memory-mapped uint8 `{split}_images_{S}.npy` (written by `prep --image-size S`)
  → `fn.crop_mirror_normalize` to float32 CHW, pixels / 255 (no ImageNet normalisation, like the original's
  raw-pixel model).
- `image_source="png"`: the encoded PNG bytes from the CLEVR folder → `fn.decoders.image` (RGB; "mixed" on a
  GPU) → `fn.resize` to S×S, cubic → the same normalisation. Close to, not bit-identical with, the cache's PIL
  bicubic resize.
- `image_source="features"`: a memory-mapped `{split}_features.npy` in the cache, float16 (or float32)
  [num_images, C, H, W], row = image index, that you provide — e.g. from the original
  `scripts/extract_features.py` (ResNet-101 up to layer3 → 1024×14×14): `np.save(f"{cache}/{split}_features.npy",
  h5py.File("train_features.h5")["features"][:].astype(np.float16))`. Cast to float32.

Order and sharding: an epoch's global order is a permutation of all of the split's questions seeded by
(seed, epoch) (or the file order with `shuffle=False`), the same for any number of ranks and any batch size.
Step k of the epoch takes the next global batch of `batch_size·n` questions of that order, and shard `s` of `n`
the s-th `batch_size` of them. A position in the epoch is therefore a number of questions consumed
(`start_question`), valid for every layout: a run resumed on other ranks or another micro-batch goes on with
exactly the questions not yet seen. Training (`drop_last=True`) runs full global batches only, so all ranks
run the same number of steps (the epoch's last `Q mod (batch_size·n)` questions are left out); evaluation
(`drop_last=False`) splits the last, partial global batch evenly over the shards, so every question is yielded
exactly once. Questions are padded with 0 to the longest in each batch.

Why batch mode: in per-sample mode DALI's external source silently dropped a shard's last partial batch; a
batch-mode source returning a short last batch, read until it raises StopIteration, gives every sample once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastfilm.core.errors import DataError
from fastfilm.data.prep import PNG_SIGNATURE, image_cache_file, images_dir, load_split, load_vocab

OUTPUTS = ("image", "question", "length", "answer", "family", "index")
IMAGE_SOURCES = ("cache", "png", "features")
LOADERS = ("dali", "torch")
DALI_HINT = "install nvidia-dali-cuda130 (pip install nvidia-dali-cuda130)"


def _dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(f"the fastfilm loader needs NVIDIA DALI: {DALI_HINT} ({e})") from e
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


class _Source:
    """The external_source callback: batch k of this shard's epoch plan → the six outputs (numpy)."""

    def __init__(self, loader: Loader, rows: np.ndarray, start_batch: int):
        self.l = loader
        self.rows = rows
        self.start = start_batch

    def __call__(self, info) -> tuple:
        k = self.start + info.iteration
        b = self.l.batch_size
        rows = self.rows[k * b : (k + 1) * b]
        if k < 0 or len(rows) == 0:
            raise StopIteration
        a = self.l.arrays
        lengths = a["lengths"][rows]
        question = np.ascontiguousarray(a["questions"][rows, : int(lengths.max())], dtype=np.int64)
        images = self.l.read_images(a["image_index"][rows])
        return (
            images,
            question,
            lengths.astype(np.int64),
            a["answers"][rows].astype(np.int64),
            a["family"][rows].astype(np.int64),
            rows.astype(np.int64),
        )


class Loader:
    """A split of a prepared cache as DALI batches; see `build_loader`."""

    def __init__(
        self,
        cache_dir: str,
        split: str,
        batch_size: int,
        *,
        image_source: str = "cache",
        clevr_dir: str | None = None,
        image_size: int = 224,
        shard_id: int = 0,
        num_shards: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device_id: int | None = None,
        num_threads: int = 2,
        prefetch: int = 2,
        vocab: dict | None = None,
        bucket_by_length: bool = False,
        bucket_batch: int | None = None,
    ):
        self._check_backend()  # fail early, with the install hint
        if image_source not in IMAGE_SOURCES:
            raise ValueError(f"image_source must be one of {IMAGE_SOURCES}, got {image_source!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_id < num_shards):
            raise ValueError(
                f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.cache_dir, self.split, self.batch_size = cache_dir, split, batch_size
        self.image_source, self.image_size = image_source, image_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.device_id, self.num_threads, self.prefetch = device_id, max(1, num_threads), max(1, prefetch)
        self.vocab = vocab if vocab is not None else load_vocab(cache_dir)
        self.arrays = load_split(cache_dir, split, vocab_hash=self.vocab["hash"])
        self.total = len(self.arrays["answers"])
        self._images, self._folder = self._open_images(clevr_dir)

        self.global_batch = batch_size * num_shards  # questions one step consumes over all shards
        # data.bucket_by_length: global batches of similar question lengths (fastfilm/data/buckets.py), for
        # global batches of `bucket_batch` questions (default this layout's; a run resumed on another layout
        # passes the one its epoch started with, so that the epoch's order stays the same).
        self.bucket_by_length, self.bucket_batch = bool(bucket_by_length), bucket_batch or self.global_batch
        self.num_questions = self.questions_from(0)
        self.num_batches = -(-self.num_questions // batch_size)

    def _check_backend(self) -> None:
        _dali()

    def _open_images(self, clevr_dir: str | None) -> tuple[np.ndarray | None, str | None]:
        """The image data of `image_source`: a memory-mapped array (cache, features) or the PNG folder."""
        num_images = len(self.arrays["image_files"])
        if self.image_source == "cache":
            path = image_cache_file(self.cache_dir, self.split, self.image_size)
            if not os.path.isfile(path):
                raise DataError(
                    f"{path}: no {self.image_size}px image cache (run `fastfilm prep --image-size {self.image_size}` "
                    "or use image_source='png')"
                )
            images = self._memmap(path, num_images)
            if images.dtype != np.uint8 or images.shape[1:] != (self.image_size, self.image_size, 3):
                raise DataError(
                    f"{path}: expected uint8 [N, {self.image_size}, {self.image_size}, 3], found "
                    f"{images.dtype} {list(images.shape)}"
                )
            return images, None
        elif self.image_source == "features":
            path = os.path.join(self.cache_dir, f"{self.split}_features.npy")
            if not os.path.isfile(path):
                raise DataError(
                    f"{path}: not found (image_source='features': make it with `fastfilm features`, or convert "
                    "the original's HDF5 file with `fastfilm prep --features-h5`)"
                )
            images = self._memmap(path, num_images)
            if images.ndim != 4 or images.dtype not in (np.float16, np.float32):
                raise DataError(
                    f"{path}: expected float16/float32 [N, C, H, W], found "
                    f"{images.dtype} {list(images.shape)}"
                )
            return images, None
        else:
            if clevr_dir is None:
                try:
                    with open(os.path.join(self.cache_dir, "manifest.json"), encoding="utf-8") as f:
                        clevr_dir = json.load(f)["clevr_dir"]
                except (OSError, ValueError, KeyError):
                    raise DataError(
                        f"{self.cache_dir}: image_source='png' needs clevr_dir (no manifest.json)"
                    ) from None
            folder = images_dir(clevr_dir, self.split)
            if not os.path.isdir(folder):
                raise DataError(f"{folder}: images folder not found")
            return None, folder

    def _memmap(self, path: str, num_images: int) -> np.ndarray:
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None
        if arr.shape[0] < num_images:
            raise DataError(
                f"{path}: {arr.shape[0]} rows, but the {self.split} questions use {num_images} images"
            )
        return arr

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order of the split's questions (rows), independent of shards and batch size."""
        q = self.total
        order = np.random.default_rng([self.seed, epoch]).permutation(q) if self.shuffle else np.arange(q)
        if self.bucket_by_length:  # then it depends on `bucket_batch` too
            from fastfilm.data.buckets import bucket_rows

            rng = np.random.default_rng([self.seed, epoch, 1])
            order = bucket_rows(order, self.arrays["lengths"], self.bucket_batch, rng)
        return order

    def _split(self, remaining: int) -> tuple[int, int, int]:
        """(full global batches, start and end of this shard's part of the partial last one) of `remaining`."""
        full, tail = divmod(remaining, self.global_batch)
        if self.drop_last:
            return full, 0, 0
        s, n = self.shard_id, self.num_shards
        return full, tail * s // n, tail * (s + 1) // n

    def _check_start(self, start_question: int) -> None:
        if not (isinstance(start_question, (int, np.integer)) and 0 <= start_question <= self.total):
            raise ValueError(f"start_question must be in [0, {self.total}], got {start_question!r}")

    def questions_from(self, start_question: int = 0) -> int:
        """How many questions this shard yields in an epoch whose first `start_question` were consumed."""
        self._check_start(start_question)
        full, lo, hi = self._split(self.total - start_question)
        return full * self.batch_size + hi - lo

    def steps_from(self, start_question: int = 0) -> int:
        """How many batches this shard yields in an epoch whose first `start_question` were consumed (for
        training, the same on every shard)."""
        return -(-self.questions_from(start_question) // self.batch_size)

    def rows(self, epoch: int, start_question: int = 0) -> np.ndarray:
        """The question rows (indices into the split) this shard yields in `epoch`, in order, once the first
        `start_question` questions of the epoch's global order have been consumed (by any layout)."""
        self._check_start(start_question)
        rest = self.order(epoch)[start_question:]
        b, n, s = self.batch_size, self.num_shards, self.shard_id
        full, lo, hi = self._split(len(rest))
        body = rest[: full * b * n].reshape(full, n, b)[:, s].reshape(-1)
        return np.concatenate([body, rest[full * b * n :][lo:hi]])

    def read_images(self, image_index: np.ndarray) -> Any:
        """The image data of a batch as the pipeline's source gets it."""
        if self._images is not None:
            return np.ascontiguousarray(self._images[image_index])
        out = []
        files = self.arrays["image_files"]
        for i in image_index:
            path = os.path.join(self._folder, str(files[i]))
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            if data.size < 8 or data[:8].tobytes() != PNG_SIGNATURE:
                raise DataError(f"{path}: not a PNG file" if data.size else f"{path}: zero-byte file")
            out.append(data)
        return out

    def _pipeline(self, source: _Source):
        fn, pipeline_def, types, _, _ = _dali()
        gpu = self.device_id is not None
        kind = self.image_source
        layout = {"cache": "HWC", "png": None, "features": "CHW"}[kind]

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
        )
        def pipe():
            image, *rest = fn.external_source(
                source=source,
                num_outputs=len(OUTPUTS),
                batch=True,
                batch_info=True,
                layout=[layout, None, None, None, None, None],
            )
            if kind == "png":
                image = fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB)
                image = fn.resize(
                    image,
                    resize_x=self.image_size,
                    resize_y=self.image_size,
                    interp_type=types.INTERP_CUBIC,
                    antialias=True,
                )
            elif gpu:
                image = image.gpu()
            if kind == "features":
                image = fn.cast(image, dtype=types.FLOAT)
            else:
                image = fn.crop_mirror_normalize(
                    image, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0]
                )
            return (image, *rest)

        return pipe()

    def epoch(self, epoch: int, start_batch: int = 0, start_question: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` on this shard, from the position `start_question` (questions of the epoch's
        global order already consumed, by any layout) and then batch `start_batch` (earlier batches are not
        read). After k training steps from `start_question` the position is `start_question + k·global_batch`.

        Each batch: image float32 [B, 3, S, S] (or features [B, C, H, W]), question int64 [B, L] padded with 0
        to the batch's longest, and int64 [B] length, answer (-1 where none), family, index (row in the split).
        Tensors are on the GPU for the image when `device_id` is set, else on the CPU.
        """
        _, _, _, DALIGenericIterator, LastBatchPolicy = _dali()
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be non-negative, got {epoch}, {start_batch}")
        if start_batch >= self.steps_from(start_question):
            return
        rows = self.rows(epoch, start_question)
        pipe = self._pipeline(_Source(self, rows, start_batch))
        it = None
        done = start_batch
        try:
            try:
                it = DALIGenericIterator(
                    pipe, list(OUTPUTS), last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
                )
                for out in it:
                    done += 1
                    yield out[0]
            except RuntimeError as e:
                if self._folder is None:
                    raise
                # DALI names no file: find the undecodable one(s) among the batches in flight.
                ahead = rows[done * self.batch_size : (done + self.prefetch + 1) * self.batch_size]
                raise DataError(self._find_bad_pngs(ahead, e)) from e
        finally:
            del it, pipe

    def _find_bad_pngs(self, rows: np.ndarray, error: Exception) -> str:
        from fastfilm.data.prep import load_image

        bad = []
        for i in sorted(set(self.arrays["image_index"][rows].tolist())):
            path = os.path.join(self._folder, str(self.arrays["image_files"][i]))
            try:
                load_image(path, None)
            except Exception as e:  # any decode failure: name the file
                bad.append(f"{path}: cannot decode ({type(e).__name__}: {e})")
        lines = [x.strip() for x in str(error).splitlines() if x.strip()]
        after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines) - 1
        first = lines[after] if 0 <= after < len(lines) else type(error).__name__
        if not bad:
            return f"{self._folder}: DALI failed on a batch of images ({first})"
        return "\n".join(bad) + f"\n(DALI: {first})"


# The loader class per `data.loader` value; `torch_loader` (which builds on `Loader`, so this module cannot import it)
# adds "torch" when the package `fastfilm.data` imports it.
LOADER_CLASSES: dict[str, type[Loader]] = {"dali": Loader}


def build_loader(
    cache_dir: str,
    split: str,
    batch_size: int,
    *,
    image_source: str = "cache",
    clevr_dir: str | None = None,
    image_size: int = 224,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    device_id: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    vocab: dict | None = None,
    bucket_by_length: bool = False,
    bucket_batch: int | None = None,
    loader: str = "dali",
) -> Loader:
    """A DALI loader over one split of a `fastfilm prep` cache (see the module docstring); `loader="torch"`: the
    same batches from a torch.utils.data pipeline (`fastfilm/data/torch_loader.py`).

    `len(loader)` is the number of batches per epoch on this shard, `loader.num_questions` the questions it
    yields per epoch; iterate with `for batch in loader.epoch(epoch, start_batch=0)`. Vocabulary sizes:
    `len(loader.vocab["question_token_to_idx"])`, `len(loader.vocab["answer_token_to_idx"])` (or `load_vocab`).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    cls = LOADER_CLASSES[loader]  # "torch": registered by fastfilm/data/torch_loader.py (imported by the package)
    return cls(
        cache_dir,
        split,
        batch_size,
        image_source=image_source,
        clevr_dir=clevr_dir,
        image_size=image_size,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        device_id=device_id,
        num_threads=num_threads,
        prefetch=prefetch,
        vocab=vocab,
        bucket_by_length=bucket_by_length,
        bucket_batch=bucket_batch,
    )


def loader_for(
    cfg: Any,
    split: str,
    *,
    train: bool,
    device: Any = None,
    shard_id: int = 0,
    num_shards: int = 1,
    batch_size: int | None = None,
    cache_dir: str | None = None,
    vocab: dict | None = None,
) -> Loader:
    """The loader a run's config (`fastfilm.config.Config`) describes for one split and one rank.

    `train=True`: the seeded shuffled order, cut so that every rank runs the same number of full batches;
    `train=False`: file order, every question exactly once across the ranks. `device` is the rank's
    `torch.device`: on a GPU, DALI decodes and resizes there (`torch.device("cuda")` means the current one).
    `vocab`, when the caller has already read and checked the cache's vocabulary, saves reading it again.
    """
    device_id = None
    if device is not None and device.type == "cuda":
        import torch

        device_id = device.index if device.index is not None else torch.cuda.current_device()
    dc = cfg.data
    loader = build_loader(
        cache_dir or dc.cache,
        split,
        batch_size or cfg.batch_size,
        image_source=dc.image_source,
        clevr_dir=dc.root,
        image_size=cfg.model.image_size,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle=train,
        seed=cfg.train.seed,
        drop_last=train,
        device_id=device_id,
        num_threads=min(dc.num_threads, _cores()),  # never more DALI/worker threads than this process's cores
        prefetch=dc.prefetch,
        vocab=vocab,
        bucket_by_length=train and dc.bucket_by_length,
        loader=resolve_loader(dc.loader, warn=shard_id == 0),
    )
    _check_features_fit(loader, cfg.model)
    return loader


_warned: set[str] = set()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def dali_missing() -> str | None:
    """Why NVIDIA DALI cannot be imported here (None when it can)."""
    try:
        _dali()
    except ImportError as e:
        return str(e.__cause__ or e)
    return None


def resolve_loader(kind: str, warn: bool = True) -> str:
    """The loader that runs for `data.loader=kind`: "dali" falls back to "torch", with one warning line per process
    (when `warn`), where DALI is not importable (e.g. the GPU machine); "torch" stays "torch"."""
    if kind != "dali":
        return kind
    why = dali_missing()
    if why is None:
        return "dali"
    if warn and "dali" not in _warned:
        _warned.add("dali")
        print(
            f"fastfilm: warning: NVIDIA DALI is not importable ({why}): data.loader=torch (the same batches from a "
            f"torch.utils.data pipeline; {DALI_HINT} for the DALI one)",
            file=sys.stderr,
            flush=True,
        )
    return "torch"


def _check_features_fit(loader: Loader, model: Any) -> None:
    """A feature cache whose [C, H, W] is not the feature stem's (model.feature_channels × feature_size²) is a
    DataError naming the file, not a convolution's shape error at the first batch."""
    images = getattr(loader, "_images", None)
    if getattr(loader, "image_source", None) != "features" or images is None:
        return
    want = (model.feature_channels, model.feature_size, model.feature_size)
    if tuple(images.shape[1:]) != want:
        path = os.path.join(loader.cache_dir, f"{loader.split}_features.npy")
        raise DataError(
            f"{path}: features of shape {list(images.shape[1:])}, but the model reads {list(want)} "
            "(model.feature_channels × feature_size²)"
        )

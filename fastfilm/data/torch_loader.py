"""`data.loader: torch`: the DALI loader's batches from a torch.utils.data pipeline, for machines without DALI.

The same questions in the same order for a seed, on every shard (the epoch plan, `Loader.rows`, and the batch
assembly, `_Source`, are the DALI loader's own code); only the image work differs:

- `image_source="cache"`: the memory-mapped uint8 [B, S, S, 3] batch is copied as it is (pinned, non-blocking on
  a GPU) and turned into float32 CHW / 255 on the training device, so a quarter of the bytes cross the bus.
- `image_source="features"`: cast to float32 on the device.
- `image_source="png"`: decoded and resized by PIL bicubic in the workers, as `fastfilm prep` writes the cache
  (the DALI loader resizes with its own cubic filter: close to, not bit-identical with, these images).

Batches are built whole in the worker (one `__getitem__` per batch, no per-sample collation). On a CPU training
device the cache and the features are read in the training process (a worker per core would only compete with
the step's threads for a copy of ~0.8 MB per batch); PNGs, and every source on a GPU, use `data.num_threads`
worker processes with `data.prefetch` batches each in flight.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastfilm.core.errors import DataError
from fastfilm.data.loader import LOADER_CLASSES, OUTPUTS, Loader, _Source


class _Batches(torch.utils.data.Dataset):
    """Batch k of a shard's epoch plan, as numpy → torch tensors (the image still uint8 HWC for the cache)."""

    def __init__(self, source: _Source, count: int):
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        images, *rest = self.source(types.SimpleNamespace(iteration=k))
        if isinstance(images, list):  # PNG bytes: decode here, in the worker
            b = self.source.l.batch_size
            images = self.source.l.decode_pngs(images, self.source.rows[(self.source.start + k) * b :])
        return dict(zip(OUTPUTS, (torch.from_numpy(np.ascontiguousarray(x)) for x in (images, *rest))))


class TorchLoader(Loader):
    """A split of a prepared cache as torch.utils.data batches; the same interface and batches as `Loader`."""

    def _check_backend(self) -> None:
        pass  # torch only

    def decode_pngs(self, data: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """PNG bytes (checked by `read_images`) → uint8 [B, S, S, 3], PIL bicubic as the cache."""
        import io

        from PIL import Image

        out = np.empty((len(data), self.image_size, self.image_size, 3), dtype=np.uint8)
        for j, raw in enumerate(data):
            try:
                with Image.open(io.BytesIO(raw.tobytes())) as im:
                    im.load()
                    rgb = im.convert("RGB")
                out[j] = np.asarray(rgb.resize((self.image_size, self.image_size), Image.BICUBIC))
            except Exception as e:  # a corrupt or truncated file: name it
                name = self.arrays["image_files"][self.arrays["image_index"][rows[j]]]
                raise DataError(
                    f"{os.path.join(self._folder, str(name))}: cannot decode ({type(e).__name__}: {e})"
                ) from None
        return out

    def _workers(self) -> int:
        return self.num_threads if (self.device_id is not None or self.image_source == "png") else 0

    def epoch(self, epoch: int, start_batch: int = 0, start_question: int = 0) -> Iterator[dict[str, Any]]:
        """As `Loader.epoch`: the same batches, keys, dtypes and shapes (the image on the GPU when `device_id`
        is set, the rest on the CPU, pinned)."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be non-negative, got {epoch}, {start_batch}")
        steps = self.steps_from(start_question)
        if start_batch >= steps:
            return
        rows = self.rows(epoch, start_question)
        gpu = self.device_id is not None
        device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        workers = self._workers()
        dl = torch.utils.data.DataLoader(
            _Batches(_Source(self, rows, start_batch), steps - start_batch),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=gpu,
            prefetch_factor=self.prefetch if workers else None,
            multiprocessing_context="fork" if workers and "fork" in _start_methods() else None,
        )
        for b in dl:
            image = b["image"].to(device, non_blocking=True)
            if self.image_source == "features":
                image = image.float()
            else:  # uint8 [B, S, S, 3] → float32 [B, 3, S, S] in [0, 1], as DALI's crop_mirror_normalize
                image = image.permute(0, 3, 1, 2).float().mul_(1.0 / 255.0).contiguous()
            yield {**b, "image": image}


def _start_methods() -> list[str]:
    import multiprocessing as mp

    return mp.get_all_start_methods()


LOADER_CLASSES["torch"] = TorchLoader  # build_loader(loader="torch")

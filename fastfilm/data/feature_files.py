"""The cache's feature files: where a split's `{split}_features.npy` lies, and the original's HDF5 files converted.

`convert_features_h5` turns the original's `{split}_features.h5` (dataset `features`, [N, C, H, W]) into the
`.npy` the loader's `image_source="features"` memory-maps, reading a bounded number of rows at a time (never the
whole file in memory): `fastfilm prep --features-h5`. `fastfilm features` (`fastfilm.files.features`) writes
the same file from the images.
"""

from __future__ import annotations

import os
import re

import numpy as np

from fastfilm.core.errors import DataError


def features_file(cache_dir: str, split: str) -> str:
    """Where the loader's `image_source="features"` reads a split's features."""
    return os.path.join(cache_dir, f"{split}_features.npy")


def h5_split(spec: str) -> tuple[str, str]:
    """`SPLIT=FILE` or `FILE` named `{split}_features.h5` → (split, file)."""
    if "=" in spec:
        split, path = spec.split("=", 1)
    else:
        path = spec
        m = re.fullmatch(r"(.+)_features\.h5", os.path.basename(spec))
        if not m:
            raise DataError(
                f"--features-h5 {spec}: name the split (SPLIT=FILE) or use a {{split}}_features.h5 file"
            )
        split = m.group(1)
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise DataError(f"--features-h5 {spec}: bad split name {split!r}")
    return split, path


def convert_features_h5(
    h5_path: str, out_path: str, *, dataset: str = "features", chunk_bytes: int = 256 << 20
) -> tuple[tuple[int, ...], str]:
    """Copy the original's HDF5 features ([N, C, H, W]) into a `.npy` the loader memory-maps, `chunk_bytes` of
    rows at a time (float16 and float32 kept, other floats → float32). Returns (shape, dtype)."""
    try:
        import h5py
    except ImportError:
        raise DataError("--features-h5 needs h5py (pip install h5py)") from None
    if not os.path.isfile(h5_path):
        raise DataError(f"{h5_path}: no such file")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise DataError(f"{h5_path}: not an HDF5 file ({e})") from None
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with f:
            if dataset not in f:
                raise DataError(f"{h5_path}: no dataset '{dataset}' (found: {', '.join(f.keys()) or 'none'})")
            ds = f[dataset]
            if ds.ndim != 4 or ds.dtype.kind != "f":
                raise DataError(
                    f"{h5_path}: '{dataset}' is {ds.dtype} {list(ds.shape)}; expected float [N, C, H, W]"
                )
            dtype = ds.dtype if ds.dtype in (np.float16, np.float32) else np.dtype(np.float32)
            row_bytes = int(np.prod(ds.shape[1:])) * max(ds.dtype.itemsize, dtype.itemsize)
            step = max(1, chunk_bytes // max(1, row_bytes))
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(ds.shape))
            for i in range(0, ds.shape[0], step):
                j = min(i + step, ds.shape[0])
                dest[i:j] = ds[i:j]
            dest.flush()
            shape = tuple(dest.shape)
            del dest
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return shape, str(dtype)

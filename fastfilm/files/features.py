"""Image features as the original FiLM code extracts them, and its HDF5 feature files converted for the loader.

`fastfilm features --clevr DIR --out CACHE --weights FILE` runs the original's `scripts/extract_features.py`:
ResNet-101 (ImageNet weights) through `layer3`, on each image read as RGB, resized to 224×224 bicubic (PIL, as
`scipy.misc.imresize`), scaled to [0, 1] and normalised with the ImageNet mean (0.485, 0.456, 0.406) and the
std the original uses, (0.229, 0.224, 0.224) (its blue std is 0.224, not torchvision's 0.225: kept, so the
features equal the original's). Output: 1024×14×14 per image, written as `CACHE/{split}_features.npy`
(float32 by default, row = image index from the file name), the file `image_source="features"` reads.

The ResNet-101 trunk is defined here (torchvision's module and parameter names, so torchvision's
`resnet101-*.pth` state dict loads as it is); the weights come from a local file, never a download: a
`.pth`/`.pt` state dict (read with `torch.load(weights_only=True)`) or a `.safetensors` file. Keys of `layer4` and
`fc` are ignored; every trunk key must be present.

The original's HDF5 feature files are converted by `fastfilm prep --features-h5` (`fastfilm.data.feature_files`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from fastfilm.core.devices import compute_device
from fastfilm.core.errors import DataError
from fastfilm.data.feature_files import features_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.224)  # the original's values (extract_features.py, run_model.py)
RESNET101_LAYERS = (3, 4, 23)  # layer1..layer3 of ResNet-101 (layer4 is not used)


# ------------------------------------------------------------------------------------------------ the network
class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3×3 conv), same parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """ResNet-101 from `conv1` through `layer3` (the original's `model_stage=3`): [N, 3, S, S] → [N, 1024, S/16, S/16]."""

    def __init__(self, layers: Sequence[int] = RESNET101_LAYERS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256), layers)):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            mods = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            mods += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def load_trunk(weights: str) -> ResNetTrunk:
    """The ResNet-101 trunk with `weights` (a local torchvision state dict or safetensors file), in eval mode."""
    if not os.path.isfile(weights):
        raise DataError(f"{weights}: no such file (--weights: ResNet-101 ImageNet weights, a local file)")
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{weights}: refused: not a state dict loadable without unpickling code ({first})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{weights}: expected a state dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    trunk = ResNetTrunk()
    own = trunk.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise DataError(
            f"{weights}: not ResNet-101 weights with torchvision's names ({len(missing)} trunk keys missing, "
            f"e.g. {', '.join(missing[:3])})"
        )
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise DataError(
            f"{weights}: shapes differ from ResNet-101's (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)})"
        )
    trunk.load_state_dict({k: state.get(k, own[k]).to(own[k].dtype) for k in own}, strict=True)
    return trunk.eval()


# ------------------------------------------------------------------------------------------------ extraction
def preprocess(path: str, size: int = 224) -> np.ndarray:
    """An image as the original feeds ResNet: RGB, bicubic size×size, /255, ImageNet-normalised; [3, S, S] float32."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array(MEAN, np.float32).reshape(3, 1, 1)
    std = np.array(STD, np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def image_rows(folder: str) -> list[tuple[int, str]]:
    """(image index, path) for every PNG in `folder`, the index read from the name's last number (CLEVR_x_000012)."""
    out = []
    for name in os.listdir(folder):
        m = re.search(r"(\d+)\.png$", name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    out.sort()
    indices = [i for i, _ in out]
    if len(set(indices)) != len(indices):
        raise DataError(f"{folder}: two images with the same index")
    return out


@torch.no_grad()
def extract(
    trunk: nn.Module,
    folder: str,
    out_path: str,
    *,
    batch_size: int = 128,
    size: int = 224,
    dtype: str = "float32",
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[tuple[int, ...], str]:
    """Write the features of every image in `folder` to `out_path` (row = image index; rows without an image
    stay zero), batched, on `device`; written to a temp file and renamed. Returns (shape, dtype)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from fastfilm.core.errors import progress_off

    rows = image_rows(folder)
    if not rows:
        raise DataError(f"{folder}: no PNG images")
    device = device or compute_device()
    trunk = trunk.to(device).eval()
    probe = trunk(torch.from_numpy(preprocess(rows[0][1], size))[None].to(device))
    shape = (rows[-1][0] + 1, *probe.shape[1:])
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        bar = tqdm(
            total=len(rows),
            desc=os.path.basename(out_path),
            unit="img",
            disable=not progress or progress_off(),
            leave=False,
        )
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                batch = np.stack(list(pool.map(lambda r: preprocess(r[1], size), chunk)))
                feats = trunk(torch.from_numpy(batch).to(device)).float().cpu().numpy()
                dest[[r for r, _ in chunk]] = feats.astype(dest.dtype)
                bar.update(len(chunk))
        bar.close()
        dest.flush()
        del dest
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return shape, dtype


# ------------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    """`fastfilm features`: extract the features of every split's images into the cache folder."""
    images = os.path.join(args.clevr, "images")
    if not os.path.isdir(images):
        raise DataError(f"{images}: no such folder (expected a CLEVR v1.0 folder)")
    if args.splits:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    else:
        splits = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    if args.batch_size < 1 or args.image_size < 16:
        raise DataError("features: --batch-size must be >= 1 and --image-size >= 16")
    from fastfilm.core.errors import check_output_folder

    check_output_folder(args.out, "features --out")
    trunk = load_trunk(args.weights)
    device = compute_device()
    os.makedirs(args.out, exist_ok=True)
    for split in splits:
        folder = os.path.join(images, split)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: no such folder")
        out = features_file(args.out, split)
        shape, dtype = extract(
            trunk,
            folder,
            out,
            batch_size=args.batch_size,
            size=args.image_size,
            dtype=args.dtype,
            device=device,
        )
        print(
            f"features: {split}: {len(image_rows(folder))} images → {out} ({dtype} {list(shape)}, row = image "
            f"index) on {device.type}",
            file=sys.stdout,
        )
    return 0

"""The `fastfilm` command: one entry point, one subcommand per job (see README)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fastfilm.core.config import INFERENCE_PRECISIONS, add_config_args, add_set_arg
from fastfilm.core.errors import OneLineParser, with_one_line_errors


def add_precision_option(p: argparse.ArgumentParser) -> None:
    """`--precision` of the jobs that run an exported model (eval, predict, analyze)."""
    p.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="auto",
        help="autocast of the forward: the model's own unless this machine only emulates it — bf16 on a CPU "
        "without bf16 instructions, fp16 on a CPU without fp16 ones, bf16 on a GPU without native bf16: then "
        "fp32, said on stderr (auto); exactly the model's (model); or fp32, bf16, fp16",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = OneLineParser(
        prog="fastfilm",
        description="FiLM visual reasoning: data generation, preprocessing, training, evaluation, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a model (one process; use `deepspeed fastfilm/train.py` for many)"
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's `last` checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run that train.run_dir holds and start afresh"
    )

    p = sub.add_parser("synth", help="write a CLEVR-format synthetic data set")
    p.add_argument("--out", required=True, help="output folder (CLEVR v1.0 layout)")
    p.add_argument(
        "--train-images", type=int, default=2000, help="train images (2000; with --cogent: trainA)"
    )
    p.add_argument(
        "--val-images", type=int, default=400, help="val images (400; with --cogent: valA and valB each)"
    )
    p.add_argument(
        "--test-images", type=int, default=200, help="test images (200; with --cogent: testA and testB each)"
    )
    p.add_argument("--questions-per-image", type=int, default=10, help="questions asked per image (10)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (0)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--min-objects", type=int, default=3, help="fewest objects per scene (CLEVR: 3)")
    p.add_argument("--max-objects", type=int, default=10, help="most objects per scene (CLEVR: 10)")
    p.add_argument(
        "--object-scale", type=float, default=1.0, help="draw objects this much larger than CLEVR's (1.0)"
    )
    p.add_argument(
        "--families", default=None, help="comma-separated question families to ask (default: all 11)"
    )
    p.add_argument(
        "--max-filters",
        type=int,
        default=3,
        help="most attribute words in one object description, e.g. 'large red metal cube' has 3 (CLEVR: 3)",
    )
    p.add_argument(
        "--cogent",
        action="store_true",
        help="CLEVR-CoGenT-style splits trainA, valA, valB, testA, testB: in condition A cubes are gray, blue, "
        "brown or yellow and cylinders red, green, purple or cyan; in B the other way round (spheres any colour)",
    )

    p = sub.add_parser("prep", help="tokenise questions and build the vocabulary / image cache")
    p.add_argument("--clevr", required=True, help="a CLEVR v1.0 folder (real or synthetic)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--image-size", type=int, default=None, help="also write a resized uint8 image cache")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to prepare (default: every questions/CLEVR_{split}_questions.json present)",
    )
    p.add_argument(
        "--vocab-from",
        default=None,
        metavar="VOCAB_OR_CACHE",
        help="reuse a vocabulary: a vocab.json (fastfilm's or the original's), a cache or model folder, or an "
        "original checkpoint",
    )
    p.add_argument(
        "--expand-vocab",
        action="store_true",
        help="with --vocab-from: append the train split's new words (old ids kept), as the original's --expand_vocab",
    )
    p.add_argument(
        "--unk-threshold",
        type=int,
        default=1,
        help="a word enters the vocabulary when the train split has it at least N times (others → <UNK>)",
    )
    p.add_argument(
        "--features-h5",
        action="append",
        default=[],
        metavar="[SPLIT=]FILE",
        help="convert the original's ResNet feature file (HDF5 'features' [N, C, H, W]) into the cache, in "
        "chunks; SPLIT defaults to the file name's prefix ({split}_features.h5); repeatable",
    )

    p = sub.add_parser("eval", help="accuracy overall and per question family")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--split", default="val", help="a split prepared in the cache (val)")
    p.add_argument("--tag", default="best", help="checkpoint tag: best (default) or last")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument(
        "--kernels",
        choices=["reference", "triton", "compile"],
        default=None,
        help="hot-path implementation (default: the model's kernels.mode)",
    )
    p.add_argument(
        "--predictions",
        default=None,
        metavar="FILE",
        help="write the predicted answer of every question, one a line, in the questions file's order "
        "(CLEVR's answer-file format; also for a split without answers)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="read the split from this prepared cache instead of the model's data.cache (same vocabulary)",
    )
    p.add_argument(
        "--predictions-json",
        default=None,
        metavar="FILE",
        help="write question index, image, question, answer and top-5 probabilities per question (JSON lines)",
    )
    add_precision_option(p)

    p = sub.add_parser(
        "export", help="export weights as safetensors + config.json + vocab.json + a sha256 manifest"
    )
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--tag", default="best", help="checkpoint tag: best (default) or last")
    p.add_argument(
        "--out", required=True, help="output folder: new, empty or an earlier export (which is replaced)"
    )

    p = sub.add_parser("predict", help="answer a question about an image with an exported model")
    p.add_argument("--model", required=True, help="folder written by `fastfilm export`")
    p.add_argument("--image", required=True, help="a PNG or JPEG, resized to the model's image size")
    p.add_argument("--question", default=None, help="the question (or use --interactive)")
    p.add_argument("--top", type=int, default=5, help="how many answers to print, most probable first (5)")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="a prompt on the image: type questions, ':image PATH' for another image, ':quit' or end of input",
    )
    p.add_argument(
        "--allow-unknown",
        action="store_true",
        help="answer questions with words outside the training vocabulary (as <UNK>) instead of naming them",
    )
    p.add_argument(
        "--resnet-weights",
        default=None,
        metavar="FILE",
        help="for a feature-stem model: the ResNet-101 weights that turn the image into features (see `features`)",
    )
    add_precision_option(p)

    p = sub.add_parser(
        "import-original", help="an original FiLM checkpoint (ethanjperez/film) → an exported model"
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", help="a .pt file saved by the original's scripts/train_model.py"
    )
    p.add_argument("--out", required=True, help="output folder (as `fastfilm export` writes)")
    add_set_arg(p, "adjust the written config, e.g. --set data.cache=data/cache/clevr")

    p = sub.add_parser(
        "features", help="ResNet-101 conv4 features of a CLEVR folder's images, as the original"
    )
    p.add_argument("--clevr", required=True, help="a CLEVR v1.0 folder")
    p.add_argument("--out", required=True, help="cache folder: writes {split}_features.npy")
    p.add_argument(
        "--weights",
        required=True,
        help="ResNet-101 ImageNet weights, a local file (torchvision's state dict .pth or .safetensors)",
    )
    p.add_argument("--splits", default=None, help="comma-separated splits (default: every images/ folder)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (128)")
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default="float32", help="of the written features (float32)"
    )
    p.add_argument("--image-size", type=int, default=224, help="resize (bicubic) before the network (224)")

    p = sub.add_parser("analyze", help="the paper's FiLM analyses (histograms, t-SNE, ablations, arithmetic)")
    p.add_argument("--model", required=True, help="folder written by `fastfilm export`")
    p.add_argument("--split", default="val", help="a split prepared in the cache (val)")
    p.add_argument("--out", required=True, help="output folder: PNGs, summary.json, summary.md")
    p.add_argument("--cache", default=None, help="preprocessed cache (default: the model's data.cache)")
    p.add_argument(
        "--max-questions", type=int, default=2000, help="questions per pass of the model, at least 3 (2000)"
    )
    add_precision_option(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastfilm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    def dispatch() -> int | None:
        if args.command == "train":
            from fastfilm import train

            return train.run(args)
        if args.command == "synth":
            from fastfilm.data import synth

            return synth.run(args)
        if args.command == "prep":
            from fastfilm import prepare

            return prepare.run(args)
        if args.command == "eval":
            from fastfilm import evaluate

            return evaluate.run(args)
        if args.command == "export":
            from fastfilm.files import export

            return export.run_export(args)
        if args.command == "predict":
            from fastfilm import prompt

            return prompt.run_predict(args)
        if args.command == "analyze":
            from fastfilm import analyze

            return analyze.run(args)
        if args.command == "import-original":
            from fastfilm.files import original

            return original.run_import(args)
        if args.command == "features":
            from fastfilm.files import features

            return features.run(args)
        return None

    status = with_one_line_errors(dispatch)
    if status is not None:
        return status
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

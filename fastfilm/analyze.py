"""The paper's FiLM analyses as one command: `fastfilm analyze --model DIR --split val --out DIR`.

- γ and β histograms per ResBlock and overall (paper Figure 4), with their mean/std per layer;
- t-SNE of (γ, β) per layer, coloured by question family (paper Figure 5);
- test-time ablations (paper Table 2): β (then γ) replaced by its training-set mean; Gaussian noise on β, γ;
- FiLM arithmetic (paper §5.3): γ,β(q1) + γ,β(q2) − γ,β(q3), scored against the target question's answer;
- activation maps: where the final feature map's global max-pool lands, drawn over the image.
Writes PNGs, `summary.json` and `summary.md` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch

from fastfilm.core.precision import autocast

NOISE_SIGMAS = (0.1, 0.5, 1.0)

# A ready FiLM-arithmetic example on CLEVR-format scenes (paper §5.3 uses CLEVR-CoGenT's colour/shape swaps):
# γ,β("how many red cubes") ≈ γ,β(q1) + γ,β(q2) − γ,β(q3); the target's answer is counted from the scene.
ARITHMETIC_EXAMPLE = {
    "q1": "How many red spheres are there?",
    "q2": "How many blue cubes are there?",
    "q3": "How many blue spheres are there?",
    "target": "How many red cubes are there?",
    "count": {"color": "red", "shape": "cube"},
}


def _collect(model, loader, device, max_questions: int, film_fn=None) -> dict[str, Any]:
    """Run the model over up to `max_questions` questions; FiLM parameters, predictions and labels."""
    from fastfilm.core.progress import progress_bar
    from fastfilm.evaluate import UNK_ANSWER

    gammas, betas, fams, hits, answers, preds = [], [], [], [], [], []
    seen = 0
    desc = f"analyze {loader.split}"
    with progress_bar(loader, max_questions, True, desc=desc) as bar:  # closed (cleared) on an error too
        with torch.no_grad():
            for batch in loader.epoch(0):
                bar.update(1)
                q = batch["question"].to(device)
                g, b = model.film_params(q)
                if film_fn is not None:
                    g, b = film_fn(g, b)
                logits = model(batch["image"].to(device), q, batch["length"], film=(g, b))
                p = logits.argmax(1).cpu()
                gammas.append(g.float().cpu())
                betas.append(b.float().cpu())
                fams.append(batch["family"])
                answers.append(batch["answer"])
                preds.append(p)
                hits.append((p == batch["answer"]) & (batch["answer"] != UNK_ANSWER))  # as eval counts them
                seen += len(p)
                if seen >= max_questions:
                    break
    cat = torch.cat
    return {
        "gammas": cat(gammas)[:max_questions],
        "betas": cat(betas)[:max_questions],
        "family": cat(fams)[:max_questions],
        "answer": cat(answers)[:max_questions],
        "pred": cat(preds)[:max_questions],
        "hit": cat(hits)[:max_questions],
    }


def accuracy_by_family(hit: torch.Tensor, family: torch.Tensor, names: dict[int, str]) -> dict[str, float]:
    """Accuracy overall (key "overall") and per question family name."""
    out = {"overall": float(hit.float().mean())}
    for f in sorted(set(family.tolist())):
        m = family == f
        out[names.get(f, f"family_{f}")] = float(hit[m].float().mean())
    return out


def layer_stats(gammas: torch.Tensor, betas: torch.Tensor) -> list[dict[str, float]]:
    """Per ResBlock: mean/std of γ and β, and the fractions of γ near zero (|γ|<0.1) and negative."""
    stats = []
    for i in range(gammas.shape[1]):
        g, b = gammas[:, i].flatten(), betas[:, i].flatten()
        stats.append(
            {
                "block": i + 1,
                "gamma_mean": float(g.mean()),
                "gamma_std": float(g.std()),
                "beta_mean": float(b.mean()),
                "beta_std": float(b.std()),
                "gamma_near_zero": float((g.abs() < 0.1).float().mean()),
                "gamma_negative": float((g < 0).float().mean()),
            }
        )
    return stats


def plot_histograms(gammas: torch.Tensor, betas: torch.Tensor, out: str) -> list[str]:
    """γ and β histograms per block and overall (paper Figure 4); the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    nb = gammas.shape[1]
    for name, values in (("gamma", gammas), ("beta", betas)):
        fig, axes = plt.subplots(1, nb + 1, figsize=(3 * (nb + 1), 2.6), squeeze=False)
        for i in range(nb):
            axes[0, i].hist(values[:, i].flatten().numpy(), bins=80, color="C0" if name == "gamma" else "C1")
            axes[0, i].set_title(f"{name} block {i + 1}")
        axes[0, nb].hist(values.flatten().numpy(), bins=80, color="C2")
        axes[0, nb].set_title(f"{name} overall")
        fig.tight_layout()
        p = os.path.join(out, f"hist_{name}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_tsne(gammas, betas, family, names: dict[int, str], out: str, max_points: int = 1000, seed: int = 0):
    """t-SNE of (γ, β) per block coloured by question family (paper Figure 5); the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from tqdm import tqdm

    n = min(max_points, gammas.shape[0])
    idx = torch.randperm(gammas.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    fams = family[idx].numpy()
    paths = []
    for i in tqdm(range(gammas.shape[1]), desc="t-SNE per block"):
        x = torch.cat([gammas[idx, i], betas[idx, i]], 1).numpy()
        emb = TSNE(
            n_components=2, perplexity=min(30.0, max(2.0, (n - 1) / 3)), random_state=seed
        ).fit_transform(x)
        fig, ax = plt.subplots(figsize=(6, 5))
        present = sorted(set(fams.tolist()))
        colors = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")  # one colour per family (CLEVR: 90)
        for j, f in enumerate(present):
            m = fams == f
            ax.scatter(emb[m, 0], emb[m, 1], s=4, color=colors(j % colors.N), label=names.get(f, str(f)))
        ax.set_title(f"t-SNE of (γ, β), block {i + 1}")
        ax.legend(fontsize=6, markerscale=3, loc="best")
        fig.tight_layout()
        p = os.path.join(out, f"tsne_block{i + 1}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def ablations(model, loader, device, mean_g, mean_b, names, max_questions, seed: int = 0) -> dict[str, Any]:
    """Accuracy with β (γ) replaced by its training-set mean, and with Gaussian noise on β (γ)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def noise_like(t, sigma):
        return (torch.randn(t.shape, generator=gen) * sigma).to(t.device, t.dtype)

    cases = {
        "baseline": None,
        "beta=train mean": lambda g, b: (g, mean_b.to(b).expand_as(b)),
        "gamma=train mean": lambda g, b: (mean_g.to(g).expand_as(g), b),
    }
    for s in NOISE_SIGMAS:
        cases[f"beta+N(0,{s})"] = lambda g, b, s=s: (g, b + noise_like(b, s))
        cases[f"gamma+N(0,{s})"] = lambda g, b, s=s: (g + noise_like(g, s), b)
    results = {}
    for name, fn in cases.items():
        r = _collect(model, loader, device, max_questions, film_fn=fn)
        results[name] = accuracy_by_family(r["hit"], r["family"], names)
    base = results["baseline"]
    for name, acc in results.items():
        acc_drop = {k: base[k] - v for k, v in acc.items()}
        results[name] = {"accuracy": acc, "drop": acc_drop}
    return results


def film_arithmetic(model, vocab, images: torch.Tensor, scenes: list[dict], example: dict, device) -> dict:
    """Answer the target question with γ,β(q1)+γ,β(q2)−γ,β(q3) and with its own γ,β; accuracy of each."""
    from fastfilm.data.tokenize import encode_question

    def film_of(text):
        q = torch.tensor([encode_question(text, vocab)], device=device)
        return model.film_params(q)

    idx_to_answer = {v: k for k, v in vocab["answer_token_to_idx"].items()}
    truth = [
        str(sum(all(o.get(k) == v for k, v in example["count"].items()) for o in s["objects"]))
        for s in scenes
    ]
    with torch.no_grad():
        (g1, b1), (g2, b2), (g3, b3), (gt, bt) = (film_of(example[k]) for k in ("q1", "q2", "q3", "target"))
        n = images.shape[0]
        g_ar, b_ar = (g1 + g2 - g3).expand(n, -1, -1), (b1 + b2 - b3).expand(n, -1, -1)
        q = torch.tensor([encode_question(example["target"], vocab)] * n, device=device)
        p_ar = model(images.to(device), q, None, film=(g_ar, b_ar)).argmax(1).cpu()
        p_plain = model(images.to(device), q, None, film=(gt.expand(n, -1, -1), bt.expand(n, -1, -1)))
        p_plain = p_plain.argmax(1).cpu()
    acc_ar = float(np.mean([idx_to_answer.get(int(p)) == t for p, t in zip(p_ar, truth)]))
    acc_plain = float(np.mean([idx_to_answer.get(int(p)) == t for p, t in zip(p_plain, truth)]))
    from fastfilm.data.tokenize import tokenize

    qv = vocab["question_token_to_idx"]
    unknown = sorted({w for k in ("q1", "q2", "q3", "target") for w in tokenize(example[k]) if w not in qv})
    return {
        **example,
        "images": n,
        "accuracy_arithmetic": acc_ar,
        "accuracy_plain": acc_plain,
        "unknown": unknown,
    }


def activation_maps(
    model, images: torch.Tensor, questions: torch.Tensor, texts: list[str], out: str
) -> list[str]:
    """Where the classifier's global max-pool lands (per feature map), drawn over each image; the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = next(m for m in model.net.classifier if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)))
    captured = {}
    handle = pool.register_forward_hook(lambda mod, inp, outp: captured.__setitem__("x", inp[0].detach()))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(images.to(device), questions.to(device), None)
    finally:
        handle.remove()
    feats = captured["x"].float().cpu()  # [N, C, H, W]
    n, c, h, w = feats.shape
    paths = []
    for i in range(n):
        arg = feats[i].view(c, -1).argmax(1)
        heat = torch.bincount(arg, minlength=h * w).view(h, w).float()
        img = images[i].float().cpu().permute(1, 2, 0).numpy()
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(np.clip(img, 0, 1))
        ax.imshow(heat.numpy(), alpha=0.5, cmap="jet", extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_title(texts[i][:60], fontsize=7)
        ax.axis("off")
        p = os.path.join(out, f"activation_{i}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def analyze(
    model_dir: str,
    split: str,
    out: str,
    cache: str | None = None,
    max_questions: int = 2000,
    precision: str = "auto",
) -> dict:
    """Run every analysis on an exported model and write PNGs + summary.json + summary.md to `out`: on this
    process's GPU when there is one, under `precision` (`fastfilm.auto.inference_precision`)."""
    from fastfilm.auto import PRECISION_DTYPES, prepare_inference
    from fastfilm.core.errors import UsageError, check_model_cache, check_output_folder
    from fastfilm.data import loader_for
    from fastfilm.files.export import load_model_folder

    if not isinstance(max_questions, int) or max_questions < 3:
        raise UsageError(
            f"analyze --max-questions {max_questions}: expected an integer >= 3 (t-SNE needs 3 points)"
        )
    check_output_folder(out, "analyze --out")
    os.makedirs(out, exist_ok=True)
    model, cfg, vocab = load_model_folder(model_dir, kernels="reference")
    if cache is None:
        check_model_cache(cfg.data.cache, model_dir)
    device, choice = prepare_inference(model, cfg, precision)
    names = {int(k): v for k, v in (vocab.get("question_family_names") or {}).items()}
    bs = min(cfg.batch_size, 64)
    val = loader_for(cfg, split, train=False, batch_size=bs, cache_dir=cache)
    train = loader_for(cfg, cfg.data.train_split, train=False, batch_size=bs, cache_dir=cache)
    with autocast(device, PRECISION_DTYPES[choice.value]):
        summary = _analyses(model, cfg, vocab, val, train, names, split, out, cache, max_questions, device)
    summary = {"model": model_dir, "device": device.type, "precision": choice.value, **summary}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(to_markdown(summary))
    return summary


def _analyses(
    model, cfg, vocab, val, train, names, split, out, cache, max_questions, device
) -> dict[str, Any]:
    """Every analysis of `analyze`, on loaders already built; the summary without the model path."""
    summary: dict[str, Any] = {"split": split}
    base = _collect(model, val, device, max_questions)
    summary["questions"] = int(base["hit"].numel())
    summary["layer_stats"] = layer_stats(base["gammas"], base["betas"])
    summary["histograms"] = plot_histograms(base["gammas"], base["betas"], out)
    summary["tsne"] = plot_tsne(base["gammas"], base["betas"], base["family"], names, out)

    if (base["answer"] < 0).any():  # CLEVR's test split: nothing to score the ablations against
        summary["ablations"] = {"skipped": f"the {split} split has no answers"}
    else:
        tr = _collect(model, train, device, max_questions)
        mean_g, mean_b = tr["gammas"].mean(0, keepdim=True), tr["betas"].mean(0, keepdim=True)
        summary["ablations"] = ablations(model, val, device, mean_g, mean_b, names, max_questions)

    # FiLM arithmetic and activation maps on the first images of the split (from the loader, as the model sees them).
    batch = next(iter(val.epoch(0)))
    summary["activation_maps"] = activation_maps(
        model, batch["image"][:4], batch["question"][:4], [f"q{int(i)}" for i in batch["index"][:4]], out
    )
    scenes_path = os.path.join(cfg.data.root, "scenes", f"CLEVR_{split}_scenes.json")
    if os.path.isfile(scenes_path) and cfg.model.stem == "pixels":
        with open(scenes_path, encoding="utf-8") as f:
            scenes = json.load(f)["scenes"]
        from fastfilm.data import load_split

        rows = load_split(cache or cfg.data.cache, split)
        first_rows = [int(i) for i in batch["index"]]
        image_idx = [int(rows["image_index"][r]) for r in first_rows]
        by_index = {s["image_index"]: s for s in scenes}
        summary["arithmetic"] = film_arithmetic(
            model, vocab, batch["image"], [by_index[i] for i in image_idx], ARITHMETIC_EXAMPLE, device
        )
    else:
        summary["arithmetic"] = {"skipped": f"needs {scenes_path} and a raw-pixel model"}
    return summary


def to_markdown(s: dict[str, Any]) -> str:
    """The summary as a short Markdown report."""
    lines = [f"# FiLM analysis of {s['model']} ({s['split']}, {s['questions']} questions)", ""]
    lines += [
        "## γ and β per block",
        "",
        "| block | γ mean | γ std | β mean | β std | γ≈0 | γ<0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["layer_stats"]:
        lines.append(
            f"| {r['block']} | {r['gamma_mean']:.3f} | {r['gamma_std']:.3f} | {r['beta_mean']:.3f} | "
            f"{r['beta_std']:.3f} | {100 * r['gamma_near_zero']:.1f}% | {100 * r['gamma_negative']:.1f}% |"
        )
    lines += [
        "",
        "## Test-time ablations (accuracy, drop in points)",
        "",
        "| case | accuracy | drop |",
        "|---|---|---|",
    ]
    if "skipped" in s["ablations"]:
        lines[-2:] = [f"Skipped: {s['ablations']['skipped']}."]
    else:
        for name, r in s["ablations"].items():
            acc, drop = 100 * r["accuracy"]["overall"], 100 * r["drop"]["overall"]
            lines.append(f"| {name} | {acc:.2f} | {drop:.2f} |")
    a = s["arithmetic"]
    lines += ["", "## FiLM arithmetic", ""]
    if "skipped" in a:
        lines.append(a["skipped"])
    else:
        lines.append(f'γ,β("{a["q1"]}") + γ,β("{a["q2"]}") − γ,β("{a["q3"]}") for "{a["target"]}":')
        lines.append(
            f"accuracy {100 * a['accuracy_arithmetic']:.1f}% vs {100 * a['accuracy_plain']:.1f}% with the "
            f"target's own γ,β ({a['images']} images)"
        )
        if a["unknown"]:
            lines.append(
                f"**Warning:** words outside this model's vocabulary (read as <UNK>): {', '.join(a['unknown'])}"
            )
    lines += [
        "",
        "Plots: "
        + ", ".join(os.path.basename(p) for p in s["histograms"] + s["tsne"] + s["activation_maps"]),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """`fastfilm analyze`."""
    s = analyze(
        args.model,
        args.split,
        args.out,
        cache=args.cache,
        max_questions=args.max_questions,
        precision=getattr(args, "precision", "auto"),
    )
    print(to_markdown(s))
    return 0

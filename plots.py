"""
Every figure the project draws, from the logs and reports it writes: pretraining and SFT loss
curves (train.py), an RL run's training and held-out curves (rl_train.py), the before/after figure
of a report (report.py), several models side by side and the held-out curves of several runs
(compare.py). Each is a PNG written atomically.
"""

import os

import numpy as np

from common import atomic_path, read_jsonl


def pyplot():
    """matplotlib's pyplot without a display, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, png_path):
    """Write fig to png_path atomically (a reader never sees half a PNG) and free it."""
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    pyplot().close(fig)


def losses(log_path, png_path):
    """train.py's log: the training loss of each logged batch and the evaluations' train and val losses,
    against tokens."""
    rows = read_jsonl(log_path)
    evals = [r for r in rows if "val/loss" in r]
    steps = [r for r in rows if "train/loss_step" in r]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in steps], [r["train/loss_step"] for r in steps], alpha=0.3, label="train (batch)")
    ax.plot([r["tokens"] for r in evals], [r["train/loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["tokens"] for r in evals], [r["val/loss"] for r in evals], "o-", label="val (eval)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, png_path)


RL_PANELS = (
    ("env/reward_mean", "eval/score", "score"),
    ("objective/kl", "eval/kl", "KL to the start (nats/response)"),
    ("tokens/responses_len_mean", "eval/len_mean", "response length (tokens)"),
    ("fluency/nll_ratio", "eval/nll_ratio", "NLL ratio (1 = as fluent as the start)"),
)


def rl_log(log_path, png_path, target_len=None):
    """An RL run's log: four panels against episodes (rollouts, or DPO's pairs): score, KL, length and
    fluency, from the training batches (lines) and the held-out evaluations (dots)."""
    rows = read_jsonl(log_path)
    evals = [r for r in rows if "eval/kl" in r]
    fig, axes = pyplot().subplots(1, 4, figsize=(16, 3.6))
    for ax, (train_key, eval_key, title) in zip(axes, RL_PANELS):
        steps = [r for r in rows if train_key in r]
        ax.plot([r["episode"] for r in steps], [r[train_key] for r in steps], "-", alpha=0.6, label="training batches")
        points = [(r["episode"], r[eval_key]) for r in evals if eval_key in r]
        if points:
            ax.plot(*zip(*points), "o-", ms=3, label="held-out prompts")
        ax.set_xlabel("episodes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if target_len:
        axes[2].axhline(target_len, color="k", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    save(fig, png_path)


def before_after(lengths, measures, keys, max_len, target_len, png_path):
    """report.py's figure: response lengths before and after (a histogram; lengths: {name: [tokens]}),
    and the measures in [0, 1] (bars; measures: {name: {key: value}})."""
    fig, (ax, bars) = pyplot().subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for name, values in lengths.items():
        ax.hist(values, bins=np.linspace(0, max_len + 1, 40), alpha=0.5, label=name)
    if target_len:
        ax.axvline(target_len, color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("samples")
    ax.legend()
    x = np.arange(len(keys))
    width = 0.8 / len(measures)
    for i, (name, m) in enumerate(measures.items()):
        bars.bar(x + (i - (len(measures) - 1) / 2) * width, [m[k] for k in keys], width, label=name)
    bars.set_xticks(x, [k.replace("_", " ") for k in keys], fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.grid(alpha=0.3, axis="y")
    bars.legend(fontsize=8)
    save(fig, png_path)


def curves(runs, labels, panels, png_path):
    """Several runs' held-out evaluations against episodes: one panel a (key, title) of panels that any
    run holds, one line a run (runs: lists of log rows)."""
    panels = [(k, title) for k, title in panels if any(k in r for rows in runs for r in rows)]
    cols = min(4, len(panels))
    grid_rows = -(-len(panels) // cols)  # ceil
    fig, axes = pyplot().subplots(grid_rows, cols, figsize=(3.8 * cols, 3.4 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, panels):
        for rows, label in zip(runs, labels):
            points = [(r["episode"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), "o-", ms=2.5, lw=1.2, label=label)
        ax.set_xlabel("episodes (rollouts; DPO: pairs)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    save(fig, png_path)


def compare(sets, names, values, best, key, png_path):
    """compare.py's figure: one panel a held-out set, a bar a model (values: {(set, name): value}), and
    the reference's best-of-n as dashed lines (best: {set: {n: value}})."""
    fig, axes = pyplot().subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sets):
        ax.bar(range(len(names)), [values[s, n] for n in names], color="C0")
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
        for i, (n, v) in enumerate(best.get(s, {}).items()):
            ax.axhline(v, color=f"C{1 + i}", ls="--", lw=1, label=f"best-of-{n}")
        ax.set_title(f"{s}: {key.replace('_', ' ')}", fontsize=10)
        ax.set_ylim(0, max(1.0, *[values[s, n] for n in names]))
        ax.grid(alpha=0.3, axis="y")
        if best.get(s):
            ax.legend(fontsize=7)
    save(fig, png_path)

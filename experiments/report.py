"""The trainer's reports: the markdown results table and PNG plots."""

from __future__ import annotations

import os

import numpy as np


def results_table(results: dict, config, family: str, metric: str) -> str:
    """Markdown: one row per method; per shots, ``metric`` before adaptation (0 steps: for
    classification the prototype head) and after the method's ``eval.report_steps`` steps
    (mean +- 95% CI over test episodes, in %); ``val``: the adapted metric per shots on the
    validation classes, where the family has them; ``test lr``: the fine-tuning learning rate
    per shots chosen on validation classes (ProtoNet and the baselines)."""
    shots = config.eval.shots
    head = f"| method ({metric}, {config.eval.num_episodes} test episodes) | "
    head += " | ".join(f"{k}-shot, 0 steps | {k}-shot, adapted" for k in shots)
    has_val = any(
        f"{shots[0]}-shot/val" in e["scores"].get(family, {}) for e in results["methods"].values()
    )
    val_head = f" | val ({config.eval.val_episodes} episodes)" if has_val else ""
    lines = [
        head + f"{val_head} | adapt steps | test lr | train s |",
        "|---" * (2 * len(shots) + 4 + has_val) + "|",
    ]
    for name, entry in results["methods"].items():
        if family not in entry["scores"]:
            continue
        cells = []
        for k in shots:
            for n in (0, entry["report_steps"]):
                c = entry["scores"][family][f"{k}-shot/{n}-step"][metric]
                cells.append(f"{100 * c['mean']:.1f} ± {100 * c['ci95']:.1f}")
        if has_val:
            vals = [entry["scores"][family].get(f"{k}-shot/val") for k in shots]
            cells.append(" / ".join(f"{100 * x:.1f}" for x in vals) if None not in vals else "-")
        lrs = [entry["scores"][family].get(f"{k}-shot/lr") for k in shots]
        lr_cell = " / ".join(f"{x:g}" for x in lrs) if None not in lrs else "-"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {entry['report_steps']} | {lr_cell} | {entry['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(results, config, metrics: dict[str, str], workdir: str) -> None:
    """``<metric>_vs_steps.png`` (per family: metric vs adaptation steps, one panel per shots
    setting, error bars = 95% CI) and ``training_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots, steps = config.eval.shots, config.eval.steps
    for family, metric in metrics.items():
        fig, axes = plt.subplots(1, len(shots), figsize=(4.5 * len(shots), 3.6), squeeze=False)
        for ax, k in zip(axes[0], shots, strict=True):
            for name, entry in results["methods"].items():
                s = [entry["scores"][family][f"{k}-shot/{n}-step"][metric] for n in steps]
                mean, ci = (100 * np.array([x[f] for x in s]) for f in ("mean", "ci95"))
                ax.errorbar(steps, mean, yerr=ci, marker="o", capsize=3, label=name)
            ax.set(
                xlabel="adaptation steps at test",
                ylabel=f"query {metric} (%)",
                title=f"{family}: {k}-shot",
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        prefix = f"{family}_" if len(metrics) > 1 else ""
        fig.savefig(os.path.join(workdir, f"{prefix}{metric}_vs_steps.png"), dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, entry in results["methods"].items():
        if entry["train_curve"]:
            x, loss, acc = zip(*entry["train_curve"], strict=True)
            axes[0].plot(x, loss, label=name)
            axes[1].plot(x, np.asarray(acc) * 100, label=name)
    axes[0].set(xlabel="step", ylabel="training loss (query, after adaptation)")
    axes[1].set(xlabel="step", ylabel="training query accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "training_curves.png"), dpi=110)
    plt.close(fig)

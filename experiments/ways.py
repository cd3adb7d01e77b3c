"""The fine-tune stage measured: an exported classifier's accuracy against the number of
classes of the new task, and the time to adapt it and label 1,000 texts.

    python -m experiments.ways --model workdirs/clinc150/export/maml --data new_task.jsonl \\
        --ways 5 10 20 0 --shots 1 5 --episodes 100

``--data`` is a labeled file of classes never seen in meta-training. Each episode draws
``ways`` of its classes (0 = all), ``shots`` support and ``--queries`` query examples of each,
adapts with :func:`experiments.adapt.fit` and labels the queries with
:func:`experiments.adapt.predict`: accuracy, mean and 95% CI over the episodes. Then the whole
task (every class, ``shots`` examples each) is adapted and 1,000 of its texts labeled, timed
once with compilation and once without. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import metaflax as mf
from experiments import adapt
from experiments import workdir as wd


def accuracy_vs_ways(
    clf, texts, labels, ways: int, shots: int, queries: int, episodes: int, seed: int = 0
) -> tuple[float, float]:
    """``(mean, ci95)`` accuracy over ``episodes`` tasks of ``ways`` classes (0 = all)."""
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(c for c, rows in by_class.items() if len(rows) >= shots + queries)
    ways = ways or len(classes)
    if ways > len(classes):
        raise ValueError(
            f"{ways} ways, but only {len(classes)} classes have shots+queries="
            f"{shots + queries} examples; lower --ways or --shots/--queries."
        )
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(episodes):
        support, query = [], []
        for c in rng.choice(classes, ways, replace=False):
            rows = rng.choice(by_class[c], shots + queries, replace=False)
            support += list(rows[:shots])
            query += list(rows[shots:])
        fitted = adapt.fit(clf, [texts[i] for i in support], [labels[i] for i in support])
        predicted, _ = adapt.predict(clf, fitted, [texts[i] for i in query])
        accuracies.append(np.mean([p == labels[i] for p, i in zip(predicted, query, strict=True)]))
    return mf.mean_ci95(np.asarray(accuracies))


def time_to_label(clf, texts, labels, shots: int, num_texts: int = 1000, seed: int = 0) -> dict:
    """Seconds to adapt to every class (``shots`` examples each) and label ``num_texts`` texts:
    the first time (compiling) and again (compiled)."""
    rng = np.random.default_rng(seed)
    support = [
        i
        for c in sorted(set(labels))
        for i in rng.permutation([j for j, y in enumerate(labels) if y == c])[:shots]
    ]
    chosen = rng.choice(len(texts), min(num_texts, len(texts)), replace=False)
    out = {"classes": len(set(labels)), "texts": len(chosen)}
    for run in ("first_seconds", "seconds"):
        start = time.perf_counter()
        fitted = adapt.fit(clf, [texts[i] for i in support], [labels[i] for i in support])
        adapt.predict(clf, fitted, [texts[i] for i in chosen])
        out[run] = time.perf_counter() - start
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an export directory")
    parser.add_argument("--data", required=True, help="a labeled file of new classes")
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 10, 20, 0], help="0 = all")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--text_columns", default="text", help="comma-separated")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON (default: print only)")
    args = parser.parse_args(argv)
    clf = adapt.load(args.model)
    data = adapt.read_file(clf, args.data, args.text_columns, args.label_column)
    results = {"model": args.model, "data": args.data, "episodes": args.episodes, "ways": {}}
    rows = ["| ways | " + " | ".join(f"{k}-shot" for k in args.shots) + " |"]
    rows.append("|---" * (len(args.shots) + 1) + "|")
    for ways in args.ways:
        name = str(ways or len(set(data.labels)))
        cells = []
        for shots in args.shots:
            mean, ci = accuracy_vs_ways(
                clf, data.texts, data.labels, ways, shots, args.queries, args.episodes, args.seed
            )
            results["ways"].setdefault(name, {})[f"{shots}-shot"] = {"mean": mean, "ci95": ci}
            cells.append(f"{100 * mean:.1f} ± {100 * ci:.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    results["time_to_label"] = time_to_label(clf, data.texts, data.labels, max(args.shots))
    print("\n".join(rows))
    t = results["time_to_label"]
    print(
        f"adapt to {t['classes']} classes ({max(args.shots)}-shot) and label {t['texts']} texts: "
        f"{t['seconds']:.2f} s ({t['first_seconds']:.2f} s the first time, compiling)"
    )
    if args.out:
        wd.write_json(args.out, results, indent=1)
    return results


if __name__ == "__main__":
    main()

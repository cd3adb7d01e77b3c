"""Episode sampling throughput (episodes/s, one process, one core), 5-way 5-shot 15-query, seq 64.

    python -m benchmarks.episodes --data-dir ../shared/data     # writes benchmarks/results/

Target: >= 2,000 episodes/s, far below the cost of a meta-step. Tokenization happens once,
before timing; sampling is numpy indexing as a pure function of (seed, index).
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import report
from metaflax.data import builders, episode_sampler, families, text_sources


def rate(fn, min_seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn(0, n)
        n += 1
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("METAFLAX_DATA_DIR", "../shared/data"))
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    source = builders.data_source("clinc150", "train", source_dir=args.data_dir)
    texts, intents = text_sources.records_to_texts(
        (source[i] for i in range(len(source))), "text", "intent"
    )
    tokenizer = text_sources.train_wordpiece(texts, vocab_size=8000)
    data = text_sources.tokenize_labeled(texts, intents, tokenizer, max_len=64)
    clf = episode_sampler(data, ways=5, shots=5, queries=15)
    wiki = builders.data_source("unlabeled_text", "wiki", source_dir=args.data_dir)
    lines, _ = text_sources.records_to_texts((wiki[i] for i in range(len(wiki))), "text", "text")
    smlmt = families.smlmt_sampler(lines, tokenizer, ways=5, shots=5, queries=15, max_len=64)
    rows = {
        "classification (CLINC150 intents)": rate(clf.episode, args.min_seconds),
        "self-supervised SMLMT (CLINC wiki sentences)": rate(smlmt.episode, args.min_seconds),
    }
    for name, r in rows.items():
        print(f"{name:48s} {r:10.0f} episodes/s")
    report.write(args.out, "episodes", {"date": time.strftime("%Y-%m-%d"), "episodes_per_s": rows})


if __name__ == "__main__":
    main()

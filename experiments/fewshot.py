"""The meta-pretraining trainer: meta-train on many tasks, adapt few-shot to held-out ones.

One trainer for every task family of :mod:`experiments.families` (classification: CLDR language
identification, CLINC150, HuffPost, FewRel, optionally meta-trained on self-supervised SMLMT
tasks; extractive QA: XQuAD; translation: CLDR terms, Tatoeba; and a mixed run of several
families on one shared encoder). Methods: MAML, FOMAML, Reptile, Meta-SGD, LSLR, ANIL,
ProtoNet, and non-meta baselines with the same model and data: multi-task pretraining,
no pretraining (``scratch``) and a no-learning n-gram nearest-centroid floor. Every method is
evaluated on the same held-out episodes after 0..n adaptation steps; mean +- 95% CI.

    python -m experiments.fewshot                                   # configs/cldr.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Writes ``results.json``, ``results.md``, PNG plots, TensorBoard event files (``tb/<method>``)
and ``config.json`` to the workdir (default ``workdirs/<config.name>``). Rerunning the same
command resumes from the latest good orbax checkpoint (``checkpoints/<method>``); finished
methods are not retrained.
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import os
import sys
import warnings

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import checkpoints, evaluation, report, training
from experiments import families as fam
from experiments import workdir as wd
from experiments.families import CLASSIFICATION
from metaflax.data import text_sources


def check_config(config) -> None:
    """Fails early, naming the fix, on settings that cannot work (before loading any data)."""
    bad = [m for m in config.methods if m not in training.METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(training.METHODS)}.")
    fam.check_config(config)
    for method in config.methods:
        cfg = training.method_config(config, method)
        positive = ["log_every", "checkpoint_every", "meta_batch_size", "eval.num_episodes"]
        if method not in ("scratch", *training.CENTROIDS):  # these train nothing
            positive.insert(0, "num_steps")
        for field in positive:
            value = functools.reduce(getattr, field.split("."), cfg)
            if value < 1:
                raise ValueError(f"{method}: {field}={value}; it must be at least 1.")
        if cfg.eval.report_steps not in cfg.eval.steps:
            raise ValueError(
                f"{method}: eval.report_steps={cfg.eval.report_steps} is not one of eval.steps="
                f"{tuple(cfg.eval.steps)}; add it there (the table reports that column)."
            )
    both = set(config.clinc.val_domains) & set(config.clinc.test_domains)
    if both:
        raise ValueError(
            f"clinc.val_domains and clinc.test_domains share {sorted(both)}: validation "
            "classes must not be test classes; take them out of one of the two."
        )
    classifiers = {"protonet", "r2d2", "anil", *training.CENTROIDS} & set(config.methods)
    if not fam.is_classification(config.dataset) and classifiers:  # mixed runs too
        raise ValueError(
            f"{sorted(classifiers)} need a classification dataset ({', '.join(CLASSIFICATION)} "
            "or a labeled file); "
            f"drop them for {config.dataset!r}."
        )
    if "idf_centroid" in config.methods and config.ngram != 1:
        raise ValueError(
            f"idf_centroid weights single tokens: it needs ngram=1, not {config.ngram} "
            "(word-piece datasets); drop it or use ngram_centroid."
        )
    if config.meta_train_on == "smlmt" and "multitask" in config.methods:
        raise ValueError(
            "'multitask' needs labeled meta-training classes (meta_train_on='classes')."
        )
    devices = training.num_devices(config)
    if config.meta_batch_size % devices:
        raise ValueError(
            f"meta_batch_size={config.meta_batch_size} must be divisible by num_devices="
            f"{devices} (tasks are split evenly across devices); change either."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
) -> dict:
    """Trains every configured method, evaluates it on held-out tasks, writes the reports.

    The workdir belongs to this config (:func:`experiments.workdir.claim`): a rerun resumes, a
    different config is refused unless ``overwrite``, which starts over.
    """
    check_config(config)
    with wd.claim(workdir, config, overwrite):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    wd.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    if config.dataset == "mixed":
        families = fam.mixed_families(config)
    else:
        tokenizer = None
        if config.tokenizer == "hf":
            tokenizer = text_sources.load_tokenizer(config.model.hf_path)
        families = {fam.source_name(config.dataset): fam.make_family(config, tokenizer)}

    for family in families.values():
        if "class_split" in family.info:  # reproducible from the config; written to be read
            wd.write_json(
                os.path.join(workdir, "class_split.json"), family.info["class_split"], indent=1
            )
            cut = ", ".join(f"{k} {100 * v:.1f}%" for k, v in family.info["cut_at_max_len"].items())
            print(f"texts longer than max_len={config.max_len} tokens (cut): {cut}")
    results = {
        "config": config.to_dict(),
        "data": {name: f.info for name, f in families.items()},
        "methods": {},
    }
    for method in config.methods:
        done = os.path.join(workdir, "methods", f"{method}.json")
        if os.path.exists(done):  # finished in an earlier run of the same config
            with open(done) as f:
                results["methods"][method] = json.load(f)
            continue
        cfg = training.method_config(config, method)
        params, curve, seconds = training.train_method(method, cfg, families, workdir)
        entry = {
            "fingerprint": wd.fingerprint(config),
            "train_seconds": seconds,
            "train_curve": curve,
            "report_steps": cfg.eval.report_steps,
            "scores": {
                name: evaluation.evaluate(method, params, cfg, family)
                for name, family in families.items()
            },
        }
        for name, family in families.items():  # the trained classifier, for experiments.adapt
            if family.classes and family.classes.export and method not in training.CENTROIDS:
                scores = entry["scores"][name]
                lrs = {
                    k: scores[f"{k}-shot/lr"] for k in cfg.eval.shots if f"{k}-shot/lr" in scores
                }
                trained = family.to_task_params(params) if method in training.BASELINES else params
                path = os.path.join(workdir, "export", method)
                family.classes.export(path, method, trained, cfg, lrs)
        wd.write_json(done, entry)
        results["methods"][method] = entry

    wd.write_json(os.path.join(workdir, "results.json"), results, indent=1)
    tables = [
        (f"### {name}\n\n" if len(families) > 1 else "")
        + report.results_table(results, config, name, family.metrics[0])
        for name, family in families.items()
    ]
    wd.write_text(os.path.join(workdir, "results.md"), "\n\n".join(tables) + "\n")
    report.plot(results, config, {n: f.metrics[0] for n, f in families.items()}, workdir)
    print("\n\n".join(tables))
    print(f"\nwrote results.json, results.md and PNG plots to {workdir}")
    return results


def default_workdir(config) -> str:
    """``workdirs/<config name>``, plus the sources where they are a user's files or several
    (``clinc150_banking``), plus ``_to_<test source>`` for cross-dataset meta-testing: a
    user's data never lands in a built-in run's workdir."""
    name = fam.source_name(config.dataset)
    parts = [config.name]
    if name != config.dataset or "+" in config.dataset:
        parts.append(name)
    if config.test_dataset:
        parts.append("to_" + fam.source_name(config.test_dataset))
    return os.path.join("workdirs", "_".join(parts))


def _flags():
    """``(config, workdir)`` flags, defined only when run as a script (so that importing
    several experiment modules, as the tests do, never defines a flag twice)."""
    config = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "cldr.py")
    )
    workdir = flags.DEFINE_string(
        "workdir", None, "Outputs and checkpoints (default workdirs/<name>)."
    )
    overwrite = flags.DEFINE_bool(
        "overwrite", False, "Delete what an earlier run wrote in the workdir and start over."
    )
    return config, workdir, overwrite


def main(config: ml_collections.ConfigDict, workdir: str | None, overwrite: bool = False) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # a failed checkpoint write is reported once, below, not per unretrieved asyncio task
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*examples and are excluded.*")  # the sampler's
    if workdir is None:
        workdir = default_workdir(config)
    try:
        train_and_evaluate(config, workdir, overwrite)
    except checkpoints.CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # orbax's writer threads would hold the process open


if __name__ == "__main__":
    config_flag, workdir_flag, overwrite_flag = _flags()
    app.run(lambda argv: main(config_flag.value, workdir_flag.value, overwrite_flag.value))

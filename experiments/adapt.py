"""The fine-tune stage: a meta-pretrained classifier adapted to a new task from a few labeled
examples per class, then used to label texts.

    python -m experiments.adapt --model workdirs/clinc150/export/maml \\
        --support support.jsonl --texts texts.jsonl --out predictions.jsonl

``--model`` is a directory the trainer exports for every classification method
(``<workdir>/export/<method>``). The support file holds K labeled examples of each class of the
new task (any number of classes); the method adapts to it as it does at meta-test time (its own
inner loop and steps, or, for ProtoNet and the baselines, SGD fine-tuning at the learning rate
chosen on validation classes). Every text is written to ``--out`` as a JSON line with its
predicted label and the class probabilities; where the texts carry labels, accuracy with a 95%
CI is printed.

An export directory holds:

- ``config.json``, ``model.safetensors`` and the tokenizer: the encoder as a BERT checkpoint
  (``transformers.AutoModel.from_pretrained(dir)`` loads it unchanged), where the encoder is
  post-LN (initialised from an HF model); pre-LN encoders trained from scratch have no
  ``BertModel`` equivalent and are stored in ``metaflax.safetensors`` only;
- ``metaflax.json``: the method, its training config and test-time settings (inner steps and
  learning rate, the fine-tuned methods' learning rate per shots, the head initialisation, the
  pooling), the vocabulary size and, for a character vocabulary, its characters;
- ``metaflax.safetensors``: what a BERT checkpoint cannot hold, keyed by parameter path: the
  bag-of-words pooling's weights and IDF, learned inner learning rates, the head.

The same from Python::

    clf = adapt.load("workdirs/clinc150/export/maml")
    adapted = adapt.fit(clf, support_texts, support_labels)
    labels, probs = adapt.predict(clf, adapted, texts)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import metaflax as mf
from experiments import workdir as wd
from experiments.evaluation import make_test_adapt
from experiments.families.common import make_encoder
from experiments.training import FINE_TUNED, RULE_METHODS, head_init, make_algorithm, model_params
from metaflax import bert, heads
from metaflax.data import text_sources
from metaflax.data.text import SPECIALS, CharVocab

SETTINGS, EXTRAS = "metaflax.json", "metaflax.safetensors"
FORMAT = 1


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _bert_prefix(config, method: str) -> str:
    """The path of the BERT encoder's parameters inside the meta-parameters."""
    model = "params/" if method in RULE_METHODS else ""
    return model + ("encoder/encoder/" if config.model.pool == "mean+bow" else "encoder/")


def export(
    path: str,
    *,
    method: str,
    meta_params,
    config,
    tokenizer,
    vocab_size: int,
    ways: int,
    bert_config: bert.BertConfig | None = None,
    idf: np.ndarray | None = None,
    test_lr: dict | None = None,
    trunk: bert.FrozenTrunk | None = None,
) -> None:
    """Writes a trained classifier (``meta_params`` of ``method``, trained with ``config``) to
    the directory ``path`` (see the module docstring). ``bert_config``: the encoder's, when it
    is a post-LN BERT (written as a BERT checkpoint); ``idf``: the bag of words' IDF;
    ``test_lr``: the fine-tuned methods' learning rate per shots; ``trunk``: the frozen trunk
    under a trained top (``model.train_layers``), written with it as one BERT checkpoint."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    leaves = {
        _key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(meta_params)[0]
    }
    checkpoint = bert_config is not None and not bert_config.pre_ln
    if checkpoint:  # the encoder as a BERT checkpoint, the rest beside it
        prefix = _bert_prefix(config, method)
        model = meta_params["params"] if method in RULE_METHODS else meta_params
        encoder = (
            model["encoder"]["encoder"] if config.model.pool == "mean+bow" else model["encoder"]
        )
        if trunk is not None:
            encoder = trunk.merge(encoder)
        bert.save_pretrained(path, encoder, bert_config, tokenizer)
        leaves = {k: v for k, v in leaves.items() if not k.startswith(prefix)}
    elif not isinstance(tokenizer, CharVocab):
        tokenizer.save_pretrained(path)
    if idf is not None:
        leaves["idf"] = np.asarray(idf)
    save_file(leaves, os.path.join(path, EXTRAS))
    chars = tokenizer.itos[len(SPECIALS) :] if isinstance(tokenizer, CharVocab) else None
    settings = {
        "format": FORMAT,
        "method": method,
        "config": config.to_dict(),
        "vocab_size": int(vocab_size),
        "ways": int(ways),
        "bert_checkpoint": checkpoint,
        "test_lr": {str(k): float(v) for k, v in (test_lr or {}).items()},
        "chars": chars,
    }
    wd.write_json(os.path.join(path, SETTINGS), settings, indent=1)


class Classifier(NamedTuple):
    """A loaded export: the encoder, the trained meta-parameters and how the method adapts."""

    method: str
    config: Any  # the method's training config
    meta_params: Any
    encode_fn: Any
    tokenize: Any  # tokenize(texts) -> (ids, mask)
    settings: dict


def load(path: str) -> Classifier:
    """Reads an export directory written by :func:`export`, with one clear error where it is
    not one, is damaged, or its parts do not fit together."""
    from safetensors.numpy import load_file

    where = os.path.join(path, SETTINGS)
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"{path} is not a metaflax export (no {SETTINGS}); the trainer writes one per method "
            "to <workdir>/export/<method>."
        )
    try:
        with open(where) as f:
            settings = json.load(f)
        extras = load_file(os.path.join(path, EXTRAS))
    except Exception as e:  # JSONDecodeError, SafetensorError, OSError
        raise ValueError(
            f"{path}: damaged export ({type(e).__name__}: {e}); export again."
        ) from None
    if settings.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {settings.get('format')}, expected {FORMAT}.")
    config = ml_collections.ConfigDict(settings["config"])
    config.model.hf_path = path if settings["bert_checkpoint"] else ""
    if settings["chars"] is not None:
        vocab = CharVocab(settings["chars"])

        def tokenize(texts):
            return vocab.encode(list(texts), config.max_len, bos_eos=True)

    else:
        tokenizer = text_sources.load_tokenizer(path)

        def tokenize(texts):
            enc = tokenizer(
                list(texts),
                max_length=config.max_len,
                truncation=True,
                padding="max_length",
                return_tensors="np",
            )
            return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)

    encode_fn, encoder_params, hidden, trunk = make_encoder(
        config, settings["vocab_size"], extras.pop("idf", None)
    )
    if trunk is not None:  # the model reads the frozen trunk's outputs
        to_ids = tokenize

        def tokenize(texts):
            ids, mask = to_ids(texts)
            return bert.trunk_features(trunk, ids, mask), mask

    method = settings["method"]
    model = heads.init_classifier(encoder_params, hidden, settings["ways"])
    model = model_params(method, config, model)
    meta = model
    if method in RULE_METHODS:  # the inner rule's meta-parameters beside the model
        loss_fn = heads.classification_loss_fn(encode_fn)
        meta = make_algorithm(method, loss_fn, None, config).init(model).meta_params
    flat, treedef = jax.tree_util.tree_flatten_with_path(meta)
    leaves = []
    for p, leaf in flat:
        key = _key(p)
        if key in extras:
            value = extras.pop(key)
            if value.shape != leaf.shape:
                raise ValueError(
                    f"{path}: parameter {key} has shape {value.shape}, the config builds "
                    f"{leaf.shape}; the export's parts do not fit together (export again)."
                )
            leaf = jnp.asarray(value, leaf.dtype)
        elif not settings["bert_checkpoint"]:
            raise ValueError(f"{path}: parameter {key} is missing from {EXTRAS}; export again.")
        leaves.append(leaf)
    if extras:
        raise ValueError(f"{path}: {EXTRAS} holds unknown parameters {sorted(extras)[:5]}.")
    meta = jax.tree_util.tree_unflatten(treedef, leaves)
    return Classifier(method, config, meta, encode_fn, tokenize, settings)


class Adapted(NamedTuple):
    """A classifier adapted to one task: its parameters and class names (the logits' order)."""

    params: Any
    class_names: tuple[str, ...]


def fit(clf: Classifier, texts, labels, *, steps: int | None = None, seed: int = 0) -> Adapted:
    """Adapts ``clf`` to the task of the labeled ``texts`` as its method adapts at meta-test
    time (``steps``: its trained number by default). Any number of classes, each with at least
    one example."""
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise ValueError(f"the support set has {len(classes)} class(es); a task needs >= 2.")
    cfg, method, ways = clf.config, clf.method, len(classes)
    if ways != clf.settings["ways"] and (
        method == "meta_sgd" or head_init(method, cfg) not in ("proto", "ridge")
    ):
        raise ValueError(
            f"{method} with head_init={cfg.head_init!r} learned a {clf.settings['ways']}-way head "
            f"(or per-parameter head rates); this support set has {ways} classes. Give it "
            f"{clf.settings['ways']} classes, or use a method with the prototype head."
        )
    ids, mask = clf.tokenize(texts)
    index = {c: i for i, c in enumerate(classes)}
    support = {"tokens": ids, "mask": mask, "label": np.array([index[y] for y in labels], np.int32)}
    inputs = clf.meta_params
    if method in FINE_TUNED:
        shots = int(np.bincount(support["label"]).min())
        lrs = {int(k): v for k, v in clf.settings["test_lr"].items()}
        lr = lrs[min(lrs, key=lambda k: abs(k - shots))] if lrs else cfg.eval.inner_lr
        inputs = (inputs, jnp.float32(lr))
    steps = cfg.eval.report_steps if steps is None else steps
    return Adapted(_adapter(clf, ways)(inputs, support, jax.random.key(seed), steps), classes)


_COMPILED: dict = {}  # jitted programs per loaded classifier: repeated fits do not recompile


def _adapter(clf: Classifier, ways: int):
    key = ("adapt", clf.encode_fn, ways)
    if key not in _COMPILED:
        loss_fn = heads.classification_loss_fn(clf.encode_fn)
        task_init = heads.classifier_task_init(
            clf.encode_fn, head_init(clf.method, clf.config), ways
        )
        proto = heads.classifier_task_init(clf.encode_fn, "proto", ways)
        adapt = make_test_adapt(clf.method, clf.config, loss_fn, task_init, proto)
        _COMPILED[key] = jax.jit(adapt, static_argnums=3)
    return _COMPILED[key]


def predict(clf: Classifier, adapted: Adapted, texts, batch: int = 256):
    """``(labels, probabilities [n, classes])`` of ``texts`` under the adapted classifier."""
    if not len(texts):
        return [], np.zeros((0, len(adapted.class_names)), np.float32)
    key = ("logits", clf.encode_fn)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, t, m: heads.classifier_logits(clf.encode_fn, p, t, m))
    logits_fn = _COMPILED[key]
    probs = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i : i + batch])
        ids, mask = clf.tokenize(chunk + [""] * (batch - len(chunk)))  # one compiled shape
        logits = logits_fn(adapted.params, ids, mask)[: len(chunk)]
        probs.append(np.asarray(jax.nn.softmax(logits, -1)))
    probs = np.concatenate(probs)
    return [adapted.class_names[i] for i in probs.argmax(-1)], probs


def read_file(clf: Classifier, path: str, text_columns: str, label_column: str, labeled=True):
    """A labeled file for ``clf``: several (comma-separated) text columns joined as its
    tokenizer expects."""
    separator = " " if clf.settings["chars"] is not None else " [SEP] "
    return text_sources.read_labeled_file(
        path,
        text_columns=text_columns.split(","),
        label_column=label_column,
        separator=separator,
        labeled=labeled,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an export directory")
    parser.add_argument("--support", required=True, help="K labeled examples per class")
    parser.add_argument("--texts", required=True, help="texts to label (labels optional)")
    parser.add_argument("--out", required=True, help="predictions, JSON lines")
    parser.add_argument("--text_columns", default="text", help="comma-separated")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--steps", type=int, default=None, help="default: the method's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it.")
    clf = load(args.model)
    support = read_file(clf, args.support, args.text_columns, args.label_column)
    texts = read_file(clf, args.texts, args.text_columns, args.label_column, labeled=False)
    adapted = fit(clf, support.texts, support.labels, steps=args.steps, seed=args.seed)
    labeled = [y for y in texts.labels if y]
    unseen = sorted(set(labeled) - set(adapted.class_names))
    if unseen:
        print(f"labels of texts that no support class has (counted wrong): {unseen[:10]}")
    absent = sorted(set(adapted.class_names) - set(labeled)) if labeled else []
    if absent:
        print(f"support classes that no labeled text has: {absent[:10]}")
    predicted, probs = predict(clf, adapted, texts.texts)
    rows = []
    for text, label, p in zip(texts.texts, predicted, probs, strict=True):
        row = {"text": text, "label": label}
        row["probabilities"] = {
            c: round(float(q), 6) for c, q in zip(adapted.class_names, p, strict=True)
        }
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    wd.write_text(args.out, "".join(rows))
    out = {"texts": len(texts.texts), "classes": len(adapted.class_names)}
    if labeled and len(labeled) == len(texts.texts):
        correct = [float(p == y) for p, y in zip(predicted, texts.labels, strict=True)]
        if len(correct) >= 2:
            out["accuracy"], out["ci95"] = mf.mean_ci95(correct)
            print(
                f"accuracy {100 * out['accuracy']:.1f} +- {100 * out['ci95']:.1f}% "
                f"on {len(correct)} labeled texts"
            )
    print(f"wrote {len(predicted)} predictions to {args.out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

"""Users' labeled files: formats, cleaning, bad input with one clear error, class splits."""

import json
import os

import numpy as np
import pytest

from metaflax.data import corpora, text_sources

ROOT = os.path.join(os.path.dirname(__file__), "..")
ROWS = [("how do i pay my bill", "pay"), ("what is my balance", "balance")]


def _write(path, rows, columns=("text", "label")):
    path.write_text("\n".join(json.dumps(dict(zip(columns, r, strict=True))) for r in rows))
    return str(path)


def test_every_format_reads_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = [t for t, _ in ROWS], [y for _, y in ROWS]
    (tmp_path / "d.csv").write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in ROWS))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "\n".join(f"{t}\t{y}" for t, y in ROWS))
    _write(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps([{"text": t, "label": y} for t, y in ROWS]))
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "d.parquet")
    for ext in ("csv", "tsv", "jsonl", "json", "parquet"):
        data = text_sources.read_labeled_file(str(tmp_path / f"d.{ext}"))
        assert (data.texts, data.labels) == (texts, labels), ext
        assert data.stats == {
            "rows": 2,
            "empty": 0,
            "duplicates": 0,
            "conflicts": 0,
            "conflict_examples": [],
        }


def test_several_text_columns_are_joined_with_the_separator(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [("a question", "a passage", "yes")], ("q", "p", "y"))
    data = text_sources.read_labeled_file(
        path, text_columns=("q", "p"), label_column="y", separator=" [SEP] "
    )
    assert data.texts == ["a question [SEP] a passage"] and data.labels == ["yes"]


def test_cleaning_drops_and_counts(tmp_path):
    rows = [*ROWS, ROWS[0], ("   ", "pay"), ("", "pay"), ("what is my balance", "pay")]
    with pytest.warns(UserWarning, match="1 texts appear under more than one label"):
        data = text_sources.read_labeled_file(_write(tmp_path / "d.jsonl", rows))
    assert data.texts == [*(t for t, _ in ROWS), "what is my balance"]
    assert data.stats["rows"] == 6 and data.stats["empty"] == 2
    assert data.stats["duplicates"] == 1 and data.stats["conflicts"] == 1
    assert data.stats["conflict_examples"] == ["what is my balance"]


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (
            b'{"text": "a", "label": "x"}\n',
            {"label_column": "intent"},
            r"no column\(s\) \['intent'\]; its columns are \['label', 'text'\]",
        ),
        (
            b'{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n',
            {},
            r"line 2: no label in column 'label'",
        ),
        (b'{"text": "a", "label": "x"}\n{"text": "b"}\n', {}, r"line 2: no label"),
        (
            b'{"text": "a", "label": "x"}\n{"label": "y"}\n',
            {},
            r"line 2: no column\(s\) \['text'\]",
        ),
        (
            b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n',
            {},
            r"line 2: bytes that are not UTF-8",
        ),
        (b'{"text": "a", "label": "x"}\n{"text": \n', {}, r"line 2: invalid JSON"),
        (b"\n\n", {}, "has no rows"),
    ],
)
def test_bad_files_name_the_line_and_the_fix(tmp_path, content, kwargs, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        text_sources.read_labeled_file(str(tmp_path / "d.jsonl"), **kwargs)


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_sources.read_labeled_file(str(tmp_path / "none.csv"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported extension '.xlsx'; use .csv"):
        text_sources.read_labeled_file(str(tmp_path / "d.xlsx"))
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        text_sources.read_labeled_file(str(tmp_path / "d.parquet"))
    (tmp_path / "e.csv").write_text("")
    assert text_sources.read_labeled_file(str(tmp_path / "e.csv"), labeled=False).texts == []


def test_random_class_split_is_seeded_disjoint_and_complete():
    classes = [f"c{i}" for i in range(20)] * 3  # repeated names: one class each
    split = corpora.random_class_split(classes, (0.6, 0.2, 0.2), seed=3)
    assert [len(split[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(c for part in split.values() for c in part) == sorted(set(classes))
    assert split == corpora.random_class_split(list(reversed(classes)), (0.6, 0.2, 0.2), seed=3)
    assert split != corpora.random_class_split(classes, (0.6, 0.2, 0.2), seed=4)
    assert corpora.random_class_split(classes, (1.0, 0.0, 0.0))["val"] == []
    with pytest.raises(ValueError, match="sum to 1"):
        corpora.random_class_split(classes, (0.6, 0.2, 0.3))
    with pytest.raises(ValueError, match="too few to split"):
        corpora.random_class_split(["a", "b"], (0.4, 0.3, 0.3))


def test_class_split_file_is_checked(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "test": ["c"]}))
    assert corpora.read_class_split(str(path), "abcd") == {
        "train": ["a", "b"],
        "val": [],
        "test": ["c"],
    }
    path.write_text(json.dumps({"train": ["a", "b"], "test": ["b", "z"]}))
    with pytest.raises(
        ValueError, match=r"more than once \['b'\], classes not in the data \['z'\]"
    ):
        corpora.read_class_split(str(path), "abcd")
    path.write_text(json.dumps({"training": ["a"]}))
    with pytest.raises(ValueError, match="keys 'train', 'val' \\(optional\\) and 'test'"):
        corpora.read_class_split(str(path), "abcd")
    path.write_text("{")
    with pytest.raises(ValueError, match="class split file"):
        corpora.read_class_split(str(path), "abcd")


def test_split_by_class_keeps_order():
    split = corpora.split_by_class(list("abcdef"), list("xyzxyz"), {"y"}, {"z"})
    assert split.train_texts == ["a", "d"] and split.val_texts == ["b", "e"]
    assert split.test_labels == ["z", "z"]
    assert np.all(np.array(split.train_labels) == "x")


def _trainer_config(**fields):
    from experiments.configs import clinc150

    config = clinc150.get_config("runlocal")
    config.update(dict(tokenizer="char", ngram=3, max_len=24, methods=("maml",)))
    config.model.pool = "mean"
    config.eval.shots = (1,)
    config.update(fields)
    return config


def test_clinc150_as_a_users_file_is_the_builtin_dataset(tmp_path, monkeypatch):
    """The oracle of the file path: CLINC150 written out as JSONL, with the built-in class split
    as a JSON file, gives the built-in dataset's texts, labels and split, in order (what the
    trainer builds everything else from)."""
    from experiments import families
    from metaflax.data import builders

    records = [r for s in ("train", "val", "test") for r in builders.records("clinc150", s)]
    rows = [(text_sources.as_text(r["text"]), text_sources.as_text(r["intent"])) for r in records]
    path = _write(tmp_path / "clinc.jsonl", rows, ("utterance", "intent"))
    config = _trainer_config()
    builtin = families.sources.labeled_texts(config)
    split = {k: sorted(set(getattr(builtin, f"{k}_labels"))) for k in ("train", "val", "test")}
    (tmp_path / "split.json").write_text(json.dumps(split))
    user = _trainer_config(dataset=path)
    user.data.update(
        text_columns=("utterance",), label_column="intent", class_split=str(tmp_path / "split.json")
    )
    assert families.sources.labeled_texts(user) == builtin
    assert families.source_name(path) == "clinc"


def _classes_file(tmp_path, counts, name="d.jsonl"):
    rows = [
        (f"text {c} number {i} {'x' * c}", f"class{c}")
        for c, n in enumerate(counts)
        for i in range(n)
    ]
    return _write(tmp_path / name, rows)


def test_a_users_file_through_the_trainer(tmp_path):
    """Random class split written to the workdir, small classes dropped with a warning naming
    them, too few classes one error naming the knob; another file as the meta-test set."""
    from experiments import fewshot

    path = _classes_file(tmp_path, [12] * 14 + [3])
    config = _trainer_config(dataset=path, methods=("ngram_centroid",))  # no training: fast
    config.data.class_fractions = (0.5, 0.0, 0.5)
    config.eval.update(num_episodes=4, chunk=4, batch=4)
    with pytest.warns(UserWarning, match=r"classes have fewer than shots\+queries=.*'class14': 3"):
        results = fewshot.train_and_evaluate(config, str(tmp_path / "run"))
    split = json.loads((tmp_path / "run" / "class_split.json").read_text())
    assert results["data"]["d"]["class_split"] == split and not split["val"]
    assert len(split["train"]) + len(split["test"]) == 14  # class14 dropped
    assert not set(split["train"]) & set(split["test"])
    config.data.class_fractions = (0.8, 0.0, 0.2)
    with pytest.raises(ValueError, match=r"meta-test has 3 classes .* fewer than ways=5: lower"):
        fewshot.train_and_evaluate(config, str(tmp_path / "small"))
    other = _classes_file(tmp_path, [12] * 6, "other.jsonl")
    cross = _trainer_config(dataset=path, test_dataset=other, methods=("ngram_centroid",))
    cross.eval.update(num_episodes=4, chunk=4, batch=4)
    cross.data.class_fractions = (0.8, 0.0, 0.2)
    with pytest.warns(UserWarning, match="6 meta-test classes of .* have the name of a"):
        info = fewshot.train_and_evaluate(cross, str(tmp_path / "cross"))["data"]["d"]
    assert info["meta_test_classes"] == 6 and info["meta_train_classes"] == 14
    with pytest.raises(FileNotFoundError, match=r"nope\.csv does not exist"):
        fewshot.check_config(_trainer_config(dataset=str(tmp_path / "nope.csv")))


def test_a_tfds_catalog_dataset_as_a_source():
    """``tfds:NAME`` (offline: TFDS's mock data) joins the named text features, class ids become
    the dataset's class names, and a misnamed feature is one error listing the features."""
    import tensorflow_datasets as tfds

    from experiments import families
    from metaflax.data import builders

    with tfds.testing.mock_data(num_examples=30):
        data = corpora.tfds_labeled(
            "ag_news_subset", text_features=("title", "description"), separator=" | "
        )
        source = builders.data_source("ag_news_subset", "train")
        names = source.dataset_info.features["label"].names
        expected = {
            (f"{text_sources.as_text(r['title']).strip()} | "
             f"{text_sources.as_text(r['description']).strip()}", names[int(r["label"])])
            for r in (source[i] for i in range(len(source)))
        }  # fmt: skip
        with pytest.raises(ValueError, match=r"no feature\(s\) \['text'\]; its features are"):
            corpora.tfds_labeled("ag_news_subset")
    assert data.stats["rows"] == 30
    assert set(zip(data.texts, data.labels, strict=True)) == expected
    assert set(data.labels) <= {"World", "Sports", "Business", "Sci/Tech"}
    assert families.is_classification("tfds:ag_news_subset+clinc150")
    assert families.source_name("tfds:ag_news_subset") == "tfds_ag_news_subset"

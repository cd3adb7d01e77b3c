"""TFDS builders (without TensorFlow) on the real source files (tests/conftest.py says where
they come from); text sources."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from metaflax.data import builders, episode_sampler, text_sources


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("METAFLAX_CACHE_DIR")
    os.environ["METAFLAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["METAFLAX_CACHE_DIR"]
    else:
        os.environ["METAFLAX_CACHE_DIR"] = old


def test_clinc150_builder_parses_the_real_file(cache):
    splits = {s: builders.data_source("clinc150", s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 15000, "val": 3000, "test": 4500}
    texts, domains = text_sources.records_to_texts(
        (splits["train"][i] for i in range(len(splits["train"]))), "text", "domain"
    )
    _, intents = text_sources.records_to_texts(
        (splits["train"][i] for i in range(len(splits["train"]))), "text", "intent"
    )
    assert len(set(domains)) == 10 and len(set(intents)) == 150
    by_domain = text_sources.classes_by_group(intents, domains)  # split intents by domain
    assert len(by_domain) == 10 and all(len(v) == 15 for v in by_domain.values())
    with open(builders.source_files("clinc150", names=["data_full.json"])["data_full.json"]) as f:
        upstream = json.load(f)["train"]  # TFDS shuffles the order; the rows are the real ones
    assert sorted(zip(texts, intents, strict=True)) == sorted(map(tuple, upstream))


def test_huffpost_builder_and_bao_split(cache):
    source = builders.data_source("huffpost", "train")
    labels = np.array([source[i]["label"] for i in range(len(source))])
    assert len(source) == 36900 and np.bincount(labels).tolist() == [900] * 41
    split = builders.HUFFPOST_CLASS_SPLIT
    assert not set(split["train"]) & set(split["test"]) and len(split["test"]) == 16


def test_missing_and_corrupt_sources_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"clinc150/data_full\.json is missing: download"):
        builders.source_files("clinc150", source_dir=str(tmp_path))
    (tmp_path / "huffpost").mkdir()
    shutil.copy(builders.source_files("huffpost")["huffpost.json"], tmp_path / "huffpost")
    with open(tmp_path / "huffpost" / "huffpost.json", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match=r"SHA-256 mismatch for huffpost/huffpost\.json"):
        builders.source_files("huffpost", source_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        builders.data_source("nope", "train")


def test_offline_without_a_data_directory_fails_at_once(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("METAFLAX_DATA_DIR")
    monkeypatch.setenv("METAFLAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(builders.socket, "create_connection", unreachable)
    with pytest.raises(ConnectionError, match=r"cannot reach .* point METAFLAX_DATA_DIR"):
        builders.records("huffpost", "train")
    assert not list(tmp_path.rglob("*.array_record*"))


def test_a_damaged_prepared_cache_is_rebuilt(cache):
    records = builders.records("huffpost", "train")
    prepared = builders.BUILDERS["huffpost"]().data_dir
    (shard,) = [f for f in os.listdir(prepared) if ".array_record" in f]
    with open(os.path.join(prepared, shard), "r+b") as f:
        f.truncate(100_000)  # a copy or a disk that stopped half way
    builders.records.cache_clear()
    with pytest.warns(UserWarning, match=rf"prepared files of huffpost in {prepared} are damaged"):
        again = builders.records("huffpost", "train")
    assert again == records


def test_catalog_datasets_use_the_same_adapter():
    with tfds.testing.mock_data(num_examples=40):
        source = builders.data_source("clinc_oos", "train")
        texts, intents = text_sources.records_to_texts(
            (source[i] for i in range(len(source))), "text", "intent"
        )
    assert len(texts) == len(intents) == 40 and all(isinstance(t, str) for t in texts)


def test_user_files_wordpiece_and_episodes(tmp_path):
    rows = [(f"how do i pay bill {i}", "pay") for i in range(6)]
    rows += [(f"what is balance {i}", "balance") for i in range(6)]
    (tmp_path / "d.csv").write_text("utterance,intent\n" + "\n".join(f"{t},{y}" for t, y in rows))
    (tmp_path / "d.tsv").write_text("utterance\tintent\n" + "\n".join(f"{t}\t{y}" for t, y in rows))
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"utterance": t, "intent": y}) for t, y in rows)
    )
    for ext in ("csv", "tsv", "jsonl"):
        texts, labels, _ = text_sources.read_labeled_file(
            str(tmp_path / f"d.{ext}"), text_columns="utterance", label_column="intent"
        )
        assert texts == [t for t, _ in rows] and labels == [y for _, y in rows]
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\]; its columns are"):
        text_sources.read_labeled_file(str(tmp_path / "d.csv"), label_column="intent")
    tok = text_sources.train_wordpiece(texts, vocab_size=60, save_dir=str(tmp_path / "tok"))
    again = text_sources.load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(FileNotFoundError, match="is not a tokenizer directory"):
        text_sources.load_tokenizer(str(tmp_path / "nope"))
    assert again(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    data = text_sources.tokenize_labeled(texts, labels, tok, max_len=12)
    assert data.tokens.shape == (12, 12) and data.class_names == ("balance", "pay")
    episode = episode_sampler(data, ways=2, shots=2, queries=3).episode(0, 0)
    assert episode.support["tokens"].shape == (4, 12) and episode.query["mask"].dtype == bool


def test_wordpiece_training_is_deterministic_and_decodes_words_whole():
    # Random words over 8 letters: many equally frequent merges. tokenizers' own trainer broke
    # those ties in hash-map order and gave 10 different vocabularies in 10 runs on this corpus.
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), rng.integers(2, 7))) for _ in range(300)]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    vocabs = [text_sources.train_wordpiece(texts, vocab_size=120).get_vocab() for _ in range(5)]
    assert all(v == vocabs[0] for v in vocabs)
    tok = text_sources.train_wordpiece(texts, vocab_size=120)
    ids = tok("abcdefgh hgf")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and any(p.startswith("##") for p in pieces)
    assert tok.decode(ids, skip_special_tokens=True) == "abcdefgh hgf"
    assert set(tok.all_special_tokens) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def test_fewrel_tatoeba_xquad_and_unlabeled_builders(cache):
    wiki = builders.data_source("fewrel", "wiki")
    assert len(wiki) == 16 * 700
    row = wiki[0]
    tokens = [t.decode() for t in row["tokens"]]
    assert 0 <= row["head"][0] <= row["head"][1] < len(tokens)
    tatoeba = builders.data_source("tatoeba", "train")
    assert len(tatoeba) == 88877  # 112 languages paired with English
    xquad = builders.data_source("xquad", "test")
    assert len(xquad) == 12 * 1190
    for i in range(0, len(xquad), 997):  # answers sit at their character offsets
        r = xquad[i]
        context, answer = r["context"].decode(), r["answer_text"].decode()
        assert context[r["answer_start"] : r["answer_start"] + len(answer)] == answer
    shakespeare = builders.data_source("unlabeled_text", "shakespeare")
    assert len(shakespeare) > 30_000 and shakespeare[0]["text"]

"""Episode sampling: determinism, resume, label permutation, fixed shapes, splits, errors."""

import numpy as np
import pytest

from metaflax.data import CharVocab, LabeledTokens, class_split, cldr, corpora, episode_sampler


def _toy(per_class=(10, 10, 10, 10, 3)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int32)
    tokens = np.arange(len(labels) * 4).reshape(-1, 4).astype(np.int32)
    names = tuple("abcdefgh"[: len(per_class)])
    return LabeledTokens(tokens, tokens > 0, labels, names)


def test_same_seed_same_episodes_and_exact_resume():
    sampler = episode_sampler(_toy(), ways=3, shots=2, queries=3)
    first = [sampler.episode(7, i) for i in range(5)]
    resumed = sampler.episode(7, 3)  # a fresh process asking for episode 3 directly
    for half in ("support", "query"):
        for k in ("tokens", "mask", "label"):
            np.testing.assert_array_equal(getattr(first[3], half)[k], getattr(resumed, half)[k])
    other = sampler.episode(8, 3)
    assert not np.array_equal(other.support["tokens"], resumed.support["tokens"])
    batch = sampler.meta_batch(7, 1, 2)  # episodes 2 and 3
    np.testing.assert_array_equal(batch.support["tokens"][1], first[3].support["tokens"])


def test_fixed_shapes_and_permuted_labels():
    data = _toy()
    sampler = episode_sampler(data, ways=3, shots=2, queries=3)
    assignments = set()
    for i in range(30):
        ep = sampler.episode(0, i)
        assert ep.support["tokens"].shape == (6, 4) and ep.query["tokens"].shape == (9, 4)
        np.testing.assert_array_equal(ep.support["label"], [0, 0, 1, 1, 2, 2])
        # which original class got label 0: recover it from the token rows
        original = data.labels[ep.support["tokens"][0, 0] // 4]
        assignments.add(int(original))
        # support and query rows of a task never overlap
        assert not set(ep.support["tokens"][:, 0]) & set(ep.query["tokens"][:, 0])
    assert len(assignments) > 1  # label 0 means different classes in different episodes


def test_small_classes_are_excluded_with_a_warning_and_too_few_is_an_error():
    with pytest.warns(UserWarning, match=r"1 classes have fewer than shots\+queries=5.*\['e'\]"):
        sampler = episode_sampler(_toy(), ways=4, shots=2, queries=3)
    assert sampler.num_classes == 4
    with pytest.raises(ValueError, match="only 4 classes have >= shots\\+queries=5 examples"):
        with pytest.warns(UserWarning):
            episode_sampler(_toy(), ways=5, shots=2, queries=3)
    with pytest.raises(ValueError, match="shots=0 must be >= 1"):
        episode_sampler(_toy(), ways=2, shots=0, queries=3)


def test_class_split_is_disjoint_and_relabels():
    data = _toy()
    train, test = class_split(data, ["a", "c"]), class_split(data, ["b", "d"])
    assert set(train.class_names).isdisjoint(test.class_names)
    assert sorted(set(train.labels.tolist())) == [0, 1]
    np.testing.assert_array_equal(train.tokens, data.tokens[np.isin(data.labels, [0, 2])])
    with pytest.raises(ValueError, match="unknown classes"):
        class_split(data, ["zz"])


def test_cldr_language_split_and_tasks():
    terms = cldr.cldr_terms()
    assert len(terms) >= 100  # 127 languages have >= 800 terms in babel's CLDR
    train, val, test = cldr.language_split(list(terms), num_test=25, num_val=10)
    assert not (set(train) & set(test)) and not (set(val) & set(test)) and len(test) == 25
    texts, labels, names = cldr.language_id_examples(test)
    assert names == tuple(test) and len(texts) == len(labels) >= 25 * 700
    pairs = cldr.translation_pairs("de")
    assert ("Germany", "Deutschland") in pairs
    vocab = CharVocab.build(texts)
    ids, mask = vocab.encode(["Deutschland"], 16, bos_eos=True)
    assert vocab.decode(ids[0]) == "Deutschland" and mask.sum() == 13


def test_fewrel_entities_are_marked():
    record = {
        "tokens": [b"Marie", b"Curie", b"was", b"born", b"in", b"Warsaw"],
        "head": np.array([0, 1], np.int32),
        "tail": np.array([5, 5], np.int32),
    }
    assert corpora.mark_entities(record) == "[E1] Marie Curie [/E1] was born in [E2] Warsaw [/E2]"

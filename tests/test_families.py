"""Translation and self-supervised (SMLMT) task samplers."""

import numpy as np
import pytest

from metaflax.data import CharVocab, builders, cldr, families, text_sources


def test_translation_tasks_pair_the_same_key():
    pairs = {lang: cldr.translation_pairs(lang) for lang in ("de", "fr")}
    vocab = CharVocab.build(t for p in pairs.values() for pair in p for t in pair)
    sampler = families.translation_sampler(
        pairs,
        lambda xs: vocab.encode(xs, 40),
        lambda xs: vocab.encode(xs, 40, bos_eos=True),
        shots=4,
        queries=3,
    )
    batch = sampler.meta_batch(0, 0, 3)
    assert batch.support["src"].shape == (3, 4, 40) and batch.query["tgt"].shape == (3, 3, 40)
    lookup = {a: b for p in pairs.values() for a, b in p}
    ep = sampler.episode(1, 5)
    for src, tgt in zip(ep.support["src"], ep.support["tgt"], strict=True):
        assert vocab.decode(tgt) == lookup[vocab.decode(src)][:38]
    again = sampler.episode(1, 5)
    np.testing.assert_array_equal(again.query["src"], ep.query["src"])
    with pytest.raises(ValueError, match="fewer than shots\\+queries=7 pairs"):
        families.translation_sampler({"x": [("a", "b")]}, None, None, shots=4, queries=3)


def test_smlmt_masks_the_label_word():
    wiki = builders.source_files("clinc150", names=["all_wiki_sents.txt"])["all_wiki_sents.txt"]
    lines = [line.strip() for line in open(wiki) if line.strip()][:3000]
    tok = text_sources.train_wordpiece(lines, vocab_size=2000)
    sampler = families.smlmt_sampler(lines, tok, ways=3, shots=2, queries=2, max_len=48)
    ep = sampler.episode(0, 0)
    assert ep.support["tokens"].shape == (6, 48)
    np.testing.assert_array_equal(ep.support["label"], [0, 0, 1, 1, 2, 2])
    masked = (ep.support["tokens"] == tok.mask_token_id).any(axis=1)
    assert masked.all()  # every sentence had its class word replaced by [MASK]
    # the same (seed, index) gives the same episode
    ep2 = sampler.episode(0, 0)
    np.testing.assert_array_equal(ep2.query["tokens"], ep.query["tokens"])
    with pytest.raises(ValueError, match="words occur in"):
        families.smlmt_sampler(lines[:5], tok, ways=3, shots=2, queries=2, max_len=48)


def test_qa_spans_map_back_to_the_answer_text(tmp_path, monkeypatch):

    monkeypatch.setenv("METAFLAX_CACHE_DIR", str(tmp_path))
    source = builders.data_source("xquad", "test")
    examples = []
    for i in range(len(source)):
        r = source[i]
        if r["language"] == b"en":
            examples.append(
                families.QAExample(
                    "en/" + r["title"].decode(),
                    r["question"].decode(),
                    r["context"].decode(),
                    r["answer_text"].decode(),
                    int(r["answer_start"]),
                )
            )
    assert len(examples) == 1190
    tok = text_sources.train_wordpiece([e.context for e in examples], vocab_size=3000)
    arrays, kept, dropped = families.tokenize_qa(examples, tok, max_len=192)
    assert dropped > 0 and len(kept) + dropped == 1190  # long contexts lose some answers
    enc = tok(
        [examples[i].question for i in kept],
        [examples[i].context for i in kept],
        max_length=192,
        truncation="only_second",
        return_offsets_mapping=True,
    )
    for row, i in enumerate(kept):
        e, offsets = examples[i], enc["offset_mapping"][row]
        start, end = offsets[arrays["start"][row]][0], offsets[arrays["end"][row]][1]
        span = e.context[start:end]
        assert e.answer_text in span and len(span) <= len(e.answer_text) + 12, (span, e)
    with pytest.warns(UserWarning, match="answers fall outside max_len=192"):
        sampler = families.qa_sampler(examples, tok, shots=3, queries=2, max_len=192)
    ep = sampler.episode(0, 1)
    assert ep.support["tokens"].shape == (3, 192) and ep.query["start"].shape == (2,)
    assert (ep.support["start"] <= ep.support["end"]).all()

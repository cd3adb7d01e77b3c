"""Real multilingual tasks with no download: the Unicode CLDR data shipped by ``babel``.

Every locale's localized names of territories, languages and currencies are *terms*:

- language identification: a class is a language, an example one of its terms;
- term translation: a task is a target language, an example an (English term, its translation)
  pair for the same CLDR key.

Splits are by language, so meta-test languages are never seen in meta-training.
"""

from __future__ import annotations

import functools

import numpy as np

CATEGORIES = ("territories", "languages", "currencies")


@functools.cache
def cldr_terms(min_terms: int = 800) -> dict[str, dict[tuple[str, str], str]]:
    """``{language: {(category, cldr_key): term}}`` for base locales with >= ``min_terms``.

    >>> terms = cldr_terms()
    >>> len(terms) >= 100, terms["fr"][("territories", "FR")]
    (True, 'France')
    """
    from babel import Locale, localedata

    out = {}
    for ident in sorted(localedata.locale_identifiers()):
        if "_" in ident or ident == "root":
            continue
        locale = Locale.parse(ident)
        terms = {
            (cat, key): name
            for cat in CATEGORIES
            for key, name in getattr(locale, cat).items()
            if isinstance(name, str) and name.strip()
        }
        if len(terms) >= min_terms:
            out[ident] = terms
    return out


def language_split(languages: list[str], num_test: int, num_val: int, seed: int = 0):
    """Disjoint (train, val, test) lists of languages, shuffled with ``seed``."""
    if num_test + num_val >= len(languages):
        raise ValueError(
            f"num_test={num_test} + num_val={num_val} leaves no meta-training language out of "
            f"{len(languages)}."
        )
    order = np.random.default_rng(seed).permutation(sorted(languages)).tolist()
    return order[num_test + num_val :], order[num_test : num_test + num_val], order[:num_test]


def language_id_examples(languages: list[str]) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """``(texts, labels, class_names)``: every distinct term of each language, labeled by it."""
    terms = cldr_terms()
    texts, labels = [], []
    for label, lang in enumerate(languages):
        distinct = sorted(set(terms[lang].values()))
        texts += distinct
        labels += [label] * len(distinct)
    return texts, np.asarray(labels, np.int32), tuple(languages)


def translation_pairs(target: str, source: str = "en") -> list[tuple[str, str]]:
    """(source term, target term) pairs for the CLDR keys both languages name."""
    terms = cldr_terms()
    src, tgt = terms[source], terms[target]
    return [(src[k], tgt[k]) for k in sorted(src.keys() & tgt.keys())]

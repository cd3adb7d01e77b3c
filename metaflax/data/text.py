"""Character-level tokenization, for short multilingual terms (CLDR names)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


class CharVocab:
    """A character vocabulary built once from a corpus; encodes to fixed-length id arrays.

    >>> vocab = CharVocab.build(["abc", "cab"])
    >>> ids, mask = vocab.encode(["ab", "zz"], max_len=4)
    >>> ids.tolist(), mask.tolist()
    ([[4, 5, 0, 0], [1, 1, 0, 0]], [[True, True, False, False], [True, True, False, False]])
    """

    def __init__(self, chars: Iterable[str]):
        self.itos = [*SPECIALS, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> CharVocab:
        counts: dict[str, int] = {}
        for text in texts:
            for ch in text:
                counts[ch] = counts.get(ch, 0) + 1
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, texts: list[str], max_len: int, *, bos_eos: bool = False):
        """``(ids [n, max_len] int32, mask [n, max_len] bool)``, truncated and padded."""
        ids = np.full((len(texts), max_len), PAD, np.int32)
        for row, text in enumerate(texts):
            seq = [self.stoi.get(c, UNK) for c in text]
            if bos_eos:
                seq = [BOS, *seq[: max_len - 2], EOS]
            seq = seq[:max_len]
            ids[row, : len(seq)] = seq
        return ids, ids != PAD

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i > EOS)

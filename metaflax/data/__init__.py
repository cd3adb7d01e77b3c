"""Episode data: labeled text sources, class splits and N-way K-shot samplers."""

from metaflax.data.sampler import EpisodeSampler, LabeledTokens, class_split, episode_sampler
from metaflax.data.text import CharVocab

__all__ = ["CharVocab", "EpisodeSampler", "LabeledTokens", "class_split", "episode_sampler"]

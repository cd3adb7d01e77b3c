"""TensorFlow Datasets builders for the meta-learning text datasets, used without TensorFlow.

Each builder writes ``array_record`` files and is read through ``builder.as_data_source()``
(random access, which episodic sampling needs). Source files come from a local directory when
one is given (``source_dir=`` or ``METAFLAX_DATA_DIR``, laid out like ``shared/data``: one folder
per dataset with the upstream files), otherwise they are downloaded from their canonical
upstream locations. Either way every file's SHA-256 is checked.

Prepared datasets go to ``METAFLAX_CACHE_DIR`` (default ``~/.cache/metaflax``), never next to
the sources, so a read-only data directory works.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import urllib.parse
import warnings

import numpy as np
import tensorflow_datasets as tfds


def _load_sources() -> dict[str, dict[str, tuple[str, str]]]:
    """dataset -> {file: (upstream url, sha256)} from sources.tsv (TFDS owns "checksums.tsv")."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    with open(os.path.join(os.path.dirname(__file__), "sources.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            dataset, name, sha, url = line.rstrip("\n").split("\t")
            out.setdefault(dataset, {})[name] = (url, sha)
    return out


SOURCES = _load_sources()


def cache_dir() -> str:
    return os.environ.get("METAFLAX_CACHE_DIR", os.path.expanduser("~/.cache/metaflax"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_reachable(url: str, dataset: str, timeout: float = 10.0) -> None:
    """Fails at once, naming ``METAFLAX_DATA_DIR``, where the download host cannot be reached
    (instead of the download manager's minutes of retries)."""
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout
        ).close()
    except OSError as e:
        raise ConnectionError(
            f"cannot reach {parts.hostname} to download {dataset} ({e}). Offline, point "
            f"METAFLAX_DATA_DIR (or config.data_dir) at a folder with a {dataset}/ folder of its "
            f"source files (see metaflax/data/sources.tsv for the files and URLs)."
        ) from None


def source_files(
    dataset: str, dl_manager=None, source_dir: str | None = None, names=None
) -> dict[str, str]:
    """Paths of ``dataset``'s verified source files (all, or ``names``): from ``source_dir``
    (else ``METAFLAX_DATA_DIR``), else downloaded (with ``dl_manager``, or into
    ``<cache_dir()>/tfds/downloads``).

    Raises one ``FileNotFoundError`` / ``ValueError`` / ``ConnectionError`` naming the file and
    how to provide it.
    """
    files = {n: SOURCES[dataset][n] for n in (names or SOURCES[dataset])}
    source_dir = source_dir or os.environ.get("METAFLAX_DATA_DIR")
    paths = {}
    for name, (url, sha) in files.items():
        if source_dir:
            path = os.path.join(source_dir, dataset, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: download {url} into {os.path.join(source_dir, dataset)} "
                    "(or unset METAFLAX_DATA_DIR / source_dir to download it where there is "
                    "internet)."
                )
        else:
            _check_reachable(url, dataset)
            if dl_manager is None:
                downloads = os.path.join(cache_dir(), "tfds", "downloads")
                dl_manager = tfds.download.DownloadManager(download_dir=downloads)
            path = os.fspath(dl_manager.download(url))
        if _sha256(path) != sha:
            raise ValueError(
                f"{path}: SHA-256 mismatch for {dataset}/{name} (expected {sha}); the file is "
                f"corrupt or not the upstream version. Replace it with {url}."
            )
        paths[name] = path
    return paths


class _LocalOrDownload(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: sources from ``source_dir`` (or the environment) or the internet."""

    VERSION = tfds.core.Version("1.0.0")
    SOURCE: str = ""

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self._source_dir = source_dir
        kwargs.setdefault("data_dir", os.path.join(cache_dir(), "tfds"))
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _sources(self, dl_manager, names=None) -> dict[str, str]:
        return source_files(self.SOURCE, dl_manager, self._source_dir, names)


class Clinc150(_LocalOrDownload):
    """CLINC150 (Larson et al. 2019): 150 intents in 10 domains (in-scope utterances)."""

    SOURCE = "clinc150"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLINC150 in-scope intent utterances with their domain.",
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "intent": tfds.features.Text(),
                    "domain": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/clinc/oos-eval",
            license="CC BY 3.0",
        )

    def _split_generators(self, dl_manager):
        paths = self._sources(dl_manager, ["data_full.json", "domains.json"])
        with open(paths["data_full.json"]) as f:
            data = json.load(f)
        with open(paths["domains.json"]) as f:
            domain_of = {i: d for d, intents in json.load(f).items() for i in intents}
        return {
            split: self._generate_examples(data[split], domain_of)
            for split in ("train", "val", "test")
        }

    def _generate_examples(self, rows, domain_of):
        for i, (text, intent) in enumerate(rows):
            yield i, {"text": text, "intent": intent, "domain": domain_of[intent]}


class HuffPost(_LocalOrDownload):
    """HuffPost headlines, few-shot version of Bao et al. 2020: 41 classes x 900 headlines.

    One split ``train`` with every headline; the standard class split is
    :data:`HUFFPOST_CLASS_SPLIT`.
    """

    SOURCE = "huffpost"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="HuffPost news headlines with their category id (0-40).",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=41)}
            ),
            homepage="https://github.com/YujiaBao/Distributional-Signatures",
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self._sources(dl_manager)["huffpost.json"])}

    def _generate_examples(self, path):
        with open(path) as f:
            for i, line in enumerate(f):
                row = json.loads(line)
                yield i, {"text": row["raw"], "label": int(row["label"])}


class FewRel(_LocalOrDownload):
    """FewRel 1.0 validation relations (Han et al. 2018): 68 relations over 4 domains.

    One split per domain (``wiki``, ``nyt``, ``pubmed``, ``semeval``); head/tail entity token
    spans (first mention).
    """

    SOURCE = "fewrel"
    DOMAINS = ("wiki", "nyt", "pubmed", "semeval")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="FewRel 1.0 validation sentences with relation and entity spans.",
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Sequence(tfds.features.Text()),
                    "relation": tfds.features.Text(),
                    "relation_name": tfds.features.Text(),
                    "head": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "tail": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                }
            ),
            homepage="https://github.com/thunlp/FewRel",
            license="MIT",
        )

    def _split_generators(self, dl_manager):
        paths = self._sources(dl_manager)
        with open(paths["pid2name.json"]) as f:
            names = {k: v[0] for k, v in json.load(f).items()}
        return {d: self._generate_examples(paths[f"val_{d}.json"], names) for d in self.DOMAINS}

    def _generate_examples(self, path, names):
        with open(path) as f:
            data = json.load(f)
        for relation in sorted(data):
            for i, row in enumerate(data[relation]):
                span = lambda e: [e[2][0][0], e[2][0][-1]]  # noqa: E731
                yield (
                    f"{relation}-{i}",
                    {
                        "tokens": row["tokens"],
                        "relation": relation,
                        "relation_name": names.get(relation, relation),
                        "head": np.asarray(span(row["h"]), np.int32),
                        "tail": np.asarray(span(row["t"]), np.int32),
                    },
                )


class Tatoeba(_LocalOrDownload):
    """Tatoeba parallel sentences, LASER test set: 112 languages paired with English."""

    SOURCE = "tatoeba"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tatoeba sentence pairs: a language (ISO 639-3) and English.",
            features=tfds.features.FeaturesDict(
                {
                    "language": tfds.features.Text(),
                    "source": tfds.features.Text(),
                    "english": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/facebookresearch/LASER",
            license="CC BY 2.0 FR",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self._sources(dl_manager))}

    def _generate_examples(self, paths):
        languages = sorted({n.split(".")[1].split("-")[0] for n in paths})
        for lang in languages:
            with open(paths[f"tatoeba.{lang}-eng.{lang}"], encoding="utf-8") as f:
                src = f.read().splitlines()
            with open(paths[f"tatoeba.{lang}-eng.eng"], encoding="utf-8") as f:
                eng = f.read().splitlines()
            if len(src) != len(eng):
                raise ValueError(f"tatoeba {lang}: {len(src)} source but {len(eng)} English lines.")
            for i, (a, b) in enumerate(zip(src, eng, strict=True)):
                yield f"{lang}-{i}", {"language": lang, "source": a, "english": b}


class XQuAD(_LocalOrDownload):
    """XQuAD (Artetxe et al. 2020): 240 paragraphs / 1190 questions in 12 languages."""

    SOURCE = "xquad"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="XQuAD questions with context, answer text and character offset.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "language": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "context": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "answer_text": tfds.features.Text(),
                    "answer_start": np.int32,
                }
            ),
            homepage="https://github.com/google-deepmind/xquad",
            license="CC BY-SA 4.0",
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(self._sources(dl_manager))}

    def _generate_examples(self, paths):
        for name in sorted(paths):
            lang = name.split(".")[1]
            with open(paths[name], encoding="utf-8") as f:
                articles = json.load(f)["data"]
            for article in articles:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        answer = qa["answers"][0]
                        yield (
                            f"{lang}-{qa['id']}",
                            {
                                "id": qa["id"],
                                "language": lang,
                                "title": article["title"],
                                "context": paragraph["context"],
                                "question": qa["question"],
                                "answer_text": answer["text"],
                                "answer_start": answer["answer_start"],
                            },
                        )


class UnlabeledText(_LocalOrDownload):
    """Unlabeled English lines: Tiny Shakespeare (``shakespeare``), CLINC's Wikipedia sentences
    (``wiki``). The raw material of self-supervised (SMLMT) tasks."""

    SOURCE = "unlabeled"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Non-empty lines of unlabeled English text.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        shakespeare = source_files("tinyshakespeare", dl_manager, self._source_dir)
        wiki = source_files("clinc150", dl_manager, self._source_dir, ["all_wiki_sents.txt"])
        return {
            "shakespeare": self._generate_examples(shakespeare["input.txt"]),
            "wiki": self._generate_examples(wiki["all_wiki_sents.txt"]),
        }

    def _generate_examples(self, path):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield i, {"text": line.strip()}


# Bao et al. 2020: labels 0-19 meta-train, 20-24 meta-val, 25-40 meta-test.
HUFFPOST_CLASS_SPLIT = {
    "train": list(range(20)),
    "val": list(range(20, 25)),
    "test": list(range(25, 41)),
}

BUILDERS = {
    "clinc150": Clinc150,
    "huffpost": HuffPost,
    "fewrel": FewRel,
    "tatoeba": Tatoeba,
    "xquad": XQuAD,
    "unlabeled_text": UnlabeledText,
}


def data_source(name: str, split: str, *, source_dir: str | None = None):
    """Prepares (once) and returns the random-access data source of ``name``/``split``.

    ``name`` is one of :data:`BUILDERS` or any TFDS catalog dataset prepared as array_record
    (e.g. ``"clinc_oos"``, ``"ag_news_subset"``), read with ``tfds.data_source``.
    """
    if name in BUILDERS:
        builder = BUILDERS[name](source_dir=source_dir)
        builder.download_and_prepare()
        sources = builder.as_data_source()
        if split not in sources:
            raise ValueError(f"{name} has splits {sorted(sources)}, not {split!r}.")
        return sources[split]
    import tensorflow_datasets.text  # noqa: F401  (registers catalog text builders)

    if name not in tfds.list_builders(with_community_datasets=False):
        raise ValueError(
            f"unknown dataset {name!r}; metaflax builds {', '.join(sorted(BUILDERS))}, and TFDS "
            "catalog names (e.g. 'clinc_oos') are read with tfds.data_source."
        )
    return tfds.data_source(name, split=split, data_dir=os.path.join(cache_dir(), "tfds"))


def _read_all(name: str, split: str, source_dir: str | None) -> list[dict]:
    source = data_source(name, split, source_dir=source_dir)
    try:
        return source.__getitems__(list(range(len(source))))
    except TypeError:  # tfds.testing.mock_data's sources read one record at a time
        return [source[i] for i in range(len(source))]


@functools.cache
def records(name: str, split: str, *, source_dir: str | None = None) -> list[dict]:
    """Every record of ``name``/``split`` as a list, read in one batched call (iterating a data
    source record by record is about 10x slower); cached per process, do not modify.

    Prepared files of a metaflax builder that are damaged (a truncated cache) are deleted and
    prepared again from the sources, with a warning naming them: they are a cache."""
    try:
        return _read_all(name, split, source_dir)
    except RuntimeError as e:  # array_record: "Corrupted Riegeli/records file"
        if name not in BUILDERS:
            raise RuntimeError(
                f"the prepared files of TFDS dataset {name!r} under {cache_dir()}/tfds/{name} "
                f"are damaged ({str(e)[:200]}); delete that folder to prepare them again."
            ) from e
        prepared = BUILDERS[name](source_dir=source_dir).data_dir
        warnings.warn(
            f"the prepared files of {name} in {prepared} are damaged ({str(e)[:200]}); "
            "deleting and preparing them again (they are a cache).",
            stacklevel=2,
        )
        shutil.rmtree(prepared)
        return _read_all(name, split, source_dir)

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

import hashlib
import json
import os

import tensorflow_datasets as tfds

_CLINC = "https://raw.githubusercontent.com/clinc/oos-eval/828f809/data/"
_HUFFPOST = "https://raw.githubusercontent.com/ws-jiang/MetaPrompter_public/dea17d5/data/"

# dataset folder -> {file name: (upstream url, sha256)}
SOURCES = {
    "clinc150": {
        "data_full.json": (
            _CLINC + "data_full.json",
            "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
        ),
        "domains.json": (
            _CLINC + "domains.json",
            "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a",
        ),
    },
    "huffpost": {
        "huffpost.json": (
            _HUFFPOST + "huffpost.json",
            "2485569669dd7ec5bf1e2f7468568a1d019faeb9941205bc9fb7edae93c488d6",
        ),
    },
}


def cache_dir() -> str:
    return os.environ.get("METAFLAX_CACHE_DIR", os.path.expanduser("~/.cache/metaflax"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_files(dataset: str, dl_manager=None, source_dir: str | None = None) -> dict[str, str]:
    """Paths of ``dataset``'s verified source files, local or downloaded.

    Raises one ``FileNotFoundError`` / ``ValueError`` naming the file and how to provide it.
    """
    files = SOURCES[dataset]
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
        elif dl_manager is not None:
            path = os.fspath(dl_manager.download(url))
        else:
            raise FileNotFoundError(f"no source for {dataset}/{name}: pass source_dir.")
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

    def _sources(self, dl_manager) -> dict[str, str]:
        return source_files(self.SOURCE, dl_manager, self._source_dir)


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
        paths = self._sources(dl_manager)
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


# Bao et al. 2020: labels 0-19 meta-train, 20-24 meta-val, 25-40 meta-test.
HUFFPOST_CLASS_SPLIT = {
    "train": list(range(20)),
    "val": list(range(20, 25)),
    "test": list(range(25, 41)),
}

BUILDERS = {"clinc150": Clinc150, "huffpost": HuffPost}


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

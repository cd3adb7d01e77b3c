"""Writing a benchmark's results: ``<name>.json`` and, with a markdown renderer, ``<name>.md``.

Imports neither jax nor the workloads, so scripts that must set ``XLA_FLAGS`` or measure a
fresh process's memory before jax starts can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def write(out_dir: str, name: str, result: dict, markdown: Callable | None = None) -> None:
    """Writes ``result`` to ``out_dir/<name>.json`` and ``markdown(result)`` to ``<name>.md``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if markdown is not None:
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(markdown(result) + "\n")

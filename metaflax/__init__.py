"""metaflax: functional meta-learning in JAX/Flax.

>>> import metaflax as mf
>>> sorted(a for a in ("maml", "reptile", "meta_sgd", "lslr") if hasattr(mf, a))
['lslr', 'maml', 'meta_sgd', 'reptile']
"""

from metaflax import bert, heads, seq2seq, sharding
from metaflax.algorithms import (
    ALGORITHMS,
    MetaAlgorithm,
    MetaState,
    adapt_only,
    check_finite,
    imaml,
    init_learned_optimizer,
    learned_optimizer,
    lslr,
    make_algorithm,
    maml,
    meta_sgd,
    multi_step_loss_weights,
    multitask,
    path_filter,
    protonet,
    reptile,
    scale_by_learned_lr,
    scale_by_learned_optimizer,
    scale_by_per_step_lr,
)
from metaflax.core import (
    Episode,
    broadcast_to_tasks,
    check_episodes,
    make_adapt_fn,
    map_tasks,
    mixed_precision,
)
from metaflax.evaluation import mean_ci95
from metaflax.functional import functionalize

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "Episode",
    "MetaAlgorithm",
    "MetaState",
    "adapt_only",
    "bert",
    "broadcast_to_tasks",
    "check_episodes",
    "check_finite",
    "functionalize",
    "heads",
    "imaml",
    "init_learned_optimizer",
    "learned_optimizer",
    "lslr",
    "make_adapt_fn",
    "make_algorithm",
    "maml",
    "map_tasks",
    "mean_ci95",
    "meta_sgd",
    "mixed_precision",
    "multi_step_loss_weights",
    "multitask",
    "path_filter",
    "protonet",
    "reptile",
    "scale_by_learned_lr",
    "scale_by_learned_optimizer",
    "scale_by_per_step_lr",
    "seq2seq",
    "sharding",
]

"""A BERT-compatible Transformer encoder in flax nnx, and HF BERT weights in and out.

The encoder's parameters map one-to-one onto HF ``BertModel`` tensors, so pretrained BERT
checkpoints load into it (``from_pretrained``) and meta-trained encoders load back into
``transformers`` (``save_pretrained``). Attention is :func:`metaflax.models.dot_product_attention`,
plain batched matmuls + softmax with exact second derivatives on every backend, so second-order
MAML runs through it. Matmuls differentiate as plain 2-D / batched products
(:func:`metaflax.models.dense_dot_general`), the form XLA:CPU runs fastest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaflax.models import dense_dot_general, dot_product_attention

PyTree = Any

SUPPORTED = "BERT checkpoints (model_type 'bert': BertModel, BertForMaskedLM, BertForPreTraining, "
SUPPORTED += "BertForSequenceClassification and other Bert* heads)"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Encoder hyperparameters; the HF names, plus metaflax's training options.

    ``pre_ln`` switches to pre-LayerNorm blocks (for training from scratch; not exportable to
    ``BertModel``), ``compute_dtype="bfloat16"`` computes in bf16 with float32 parameters, and
    ``remat`` recomputes each layer in the backward pass.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pre_ln: bool = False
    compute_dtype: str = "float32"
    remat: bool = False
    # False where the checkpoint loaded had no pooler (e.g. BertForMaskedLM): the pooler is a
    # fresh initialisation, which save_pretrained warns about
    pretrained_pooler: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def tiny(cls, **overrides) -> BertConfig:
        """The 2-layer d=128 test model."""
        base = dict(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            max_position_embeddings=64,
        )
        return cls(**{**base, **overrides})

    _HF_FIELDS = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "initializer_range",
    )

    def to_hf(self):
        """The ``transformers.BertConfig`` of this encoder (post-LN only)."""
        import transformers

        if self.pre_ln:
            raise ValueError(
                "a pre_ln encoder has no BertModel equivalent (BERT is post-LN); train with "
                "pre_ln=False to export to transformers."
            )
        return transformers.BertConfig(
            **{f: getattr(self, f) for f in self._HF_FIELDS}, hidden_act="gelu"
        )

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> BertConfig:
        if getattr(hf_config, "model_type", None) != "bert":
            raise ValueError(
                f"unsupported architecture model_type={getattr(hf_config, 'model_type', None)!r}"
                f"; metaflax reads {SUPPORTED}."
            )
        if getattr(hf_config, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act={hf_config.hidden_act!r}; only 'gelu'.")
        return cls(**{f: getattr(hf_config, f) for f in cls._HF_FIELDS}, **overrides)


def _compute_dtype(cfg: BertConfig):
    """None (= the parameters' dtype) for float32, so float64 tests really run in float64."""
    return None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)


def _dense(cfg: BertConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(cfg.initializer_range)
    return nnx.Linear(
        din,
        dout,
        kernel_init=init,
        dtype=_compute_dtype(cfg),
        dot_general=dense_dot_general,
        rngs=rngs,
    )


def _norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=_compute_dtype(cfg), rngs=rngs
    )


class BertLayer(nnx.Module):
    """One encoder block: self-attention and a GELU MLP, post-LN (BERT) or pre-LN."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.query = _dense(cfg, h, h, rngs)
        self.key = _dense(cfg, h, h, rngs)
        self.value = _dense(cfg, h, h, rngs)
        self.attention_output = _dense(cfg, h, h, rngs)
        self.attention_norm = _norm(cfg, rngs)
        self.intermediate = _dense(cfg, h, i, rngs)
        self.output = _dense(cfg, i, h, rngs)
        self.output_norm = _norm(cfg, rngs)

    def attention(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, h = x.shape  # x: [batch, seq, hidden]; mask: [batch, seq] (True = attend)
        heads = self.cfg.num_attention_heads

        def split(y):  # [batch, seq, heads, head_dim]
            return y.reshape(b, t, heads, h // heads)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        context = dot_product_attention(q, k, v, mask[:, None, :]).reshape(b, t, h)
        return self.attention_output(context)

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.output(jax.nn.gelu(self.intermediate(x), approximate=False))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        if self.cfg.pre_ln:
            x = x + self.attention(self.attention_norm(x), mask)
            return x + self.mlp(self.output_norm(x))
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.mlp(x))


class BertEncoder(nnx.Module):
    """BERT: embeddings (words, positions, token types), encoder blocks and the pooler.

    Returns ``(sequence_output [batch, seq, hidden], pooled_output [batch, hidden])`` like HF
    ``BertModel``'s ``last_hidden_state`` and ``pooler_output``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> enc = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
    >>> seq, pooled = enc(jnp.ones((2, 16), jnp.int32))
    >>> seq.shape, pooled.shape
    ((2, 16, 128), (2, 128))
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size

        def table(n):
            return nnx.Param(cfg.initializer_range * jax.random.normal(rngs.params(), (n, h)))

        self.word_embeddings = table(cfg.vocab_size)
        self.position_embeddings = table(cfg.max_position_embeddings)
        self.token_type_embeddings = table(cfg.type_vocab_size)
        self.embedding_norm = _norm(cfg, rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = _norm(cfg, rngs) if cfg.pre_ln else None
        self.pooler = _dense(cfg, h, h, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        mask = _mask(input_ids, attention_mask)
        return _upper(self, self.lower(input_ids, mask, token_type_ids), mask)

    def lower(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        num_layers: int = 0,
    ) -> jax.Array:
        """The hidden states ``[batch, seq, hidden]`` after the embeddings and the first
        ``num_layers`` blocks (what :func:`freeze_trunk` computes once)."""
        b, t = input_ids.shape  # [batch, seq]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings="
                f"{self.cfg.max_position_embeddings}; truncate the inputs."
            )
        mask = _mask(input_ids, attention_mask)
        types = jnp.zeros((b, t), jnp.int32) if token_type_ids is None else token_type_ids
        x = (
            jnp.take(self.word_embeddings[...], input_ids, axis=0)
            + self.position_embeddings[None, :t]
            + jnp.take(self.token_type_embeddings[...], types, axis=0)
        )
        if _compute_dtype(self.cfg) is not None:
            x = x.astype(_compute_dtype(self.cfg))
        x = self.embedding_norm(x) if not self.cfg.pre_ln else x
        return _blocks(self.cfg, self.layers[:num_layers], x, mask)


def _mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    return attention_mask.astype(bool)


def _blocks(cfg: BertConfig, layers, x: jax.Array, mask: jax.Array) -> jax.Array:
    for layer in layers:
        if cfg.remat:
            x = jax.checkpoint(lambda y, layer=layer: layer(y, mask))(x)
        else:
            x = layer(x, mask)
    return x


def _upper(m, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``m``'s blocks (all of a :class:`BertEncoder`'s, or a :class:`_Top`'s), final norm and
    pooler on hidden states ``x``: ``(sequence_output, pooled_output)``."""
    x = _blocks(m.cfg, m.layers, x, mask)
    if m.final_norm is not None:
        x = m.final_norm(x)
    return x, jnp.tanh(m.pooler(x[:, 0]))


# ----------------------------------------------------------------------------------------------
# HF BertModel tensor names <-> metaflax parameter paths.


def _hf_names(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (metaflax param path, transpose?)."""
    names = {
        "embeddings.word_embeddings.weight": (("word_embeddings",), False),
        "embeddings.position_embeddings.weight": (("position_embeddings",), False),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings",), False),
        "embeddings.LayerNorm.weight": (("embedding_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embedding_norm", "bias"), False),
        "pooler.dense.weight": (("pooler", "kernel"), True),
        "pooler.dense.bias": (("pooler", "bias"), False),
    }
    parts = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for hf, ours in parts.items():
            names[pre + hf + ".weight"] = (("layers", i, ours, "kernel"), True)
            names[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
        for hf, ours in norms.items():
            names[pre + hf + ".weight"] = (("layers", i, ours, "scale"), False)
            names[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
    return names


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def params_from_hf(
    tensors: dict[str, np.ndarray], cfg: BertConfig, init_params: dict
) -> tuple[dict, list[str]]:
    """Fills ``init_params`` (the encoder's pure dict) from HF ``BertModel`` tensors.

    Accepts checkpoints saved from ``BertModel`` or from a model with heads (keys prefixed
    ``bert.``, extra head tensors ignored). Returns the params and the names of encoder tensors
    absent from the checkpoint (kept at their initial values, as transformers does).
    """
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    layers = {
        int(m.group(1))
        for k in tensors
        if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))
    }
    if layers and max(layers) >= cfg.num_hidden_layers:
        raise ValueError(
            f"the checkpoint has {max(layers) + 1} encoder layers but the config "
            f"num_hidden_layers={cfg.num_hidden_layers}; config.json does not match "
            "model.safetensors (layers would be dropped)."
        )
    params = jax.tree.map(np.asarray, init_params)
    missing = []
    for name, (path, transpose) in _hf_names(cfg).items():
        if prefix + name not in tensors:
            missing.append(name)
            continue
        value = np.asarray(tensors[prefix + name], dtype=np.float32)
        value = value.T if transpose else value
        expected = _get(params, path).shape
        if value.shape != expected:
            hf_shape = tuple(np.shape(tensors[prefix + name]))
            implied = expected[::-1] if transpose else expected
            raise ValueError(
                f"checkpoint tensor {prefix + name} has shape {hf_shape}, but the config implies "
                f"{implied}; config.json does not match model.safetensors."
            )
        _set(params, path, value)
    required = [m for m in missing if not m.startswith("pooler.")]
    if required:
        raise ValueError(
            f"the checkpoint lacks {len(required)} encoder tensors, e.g. {required[:3]}; it is "
            f"not a BERT encoder checkpoint ({SUPPORTED})."
        )
    return jax.tree.map(jnp.asarray, params), missing


def params_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    """The ``BertModel`` state dict (numpy, HF names and layouts) of encoder params."""
    out = {}
    for name, (path, transpose) in _hf_names(cfg).items():
        value = np.asarray(_get(params, path), dtype=np.float32)
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


class Pretrained(NamedTuple):
    """What :func:`from_pretrained` loads: the encoder module, its config and tokenizer."""

    encoder: BertEncoder
    config: BertConfig
    tokenizer: Any  # a transformers tokenizer, or None when the directory has none


def _resolve(path: str) -> str:
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not os.path.exists(path):
        warnings.warn(
            f"{path!r} is not a local directory: fetching it from the Hugging Face Hub (pass "
            "an existing directory to load a local model).",
            stacklevel=3,
        )
        try:
            import huggingface_hub

            return huggingface_hub.snapshot_download(
                path,
                allow_patterns=["config.json", "model.safetensors", "*.txt", "tokenizer*"],
            )
        except Exception as e:  # no internet, unknown repo, ...
            raise FileNotFoundError(
                f"{path!r} is not a local directory and could not be fetched from the HF Hub "
                f"({type(e).__name__}: {e}). Pass a local directory with config.json and "
                "model.safetensors."
            ) from None
    raise FileNotFoundError(f"{path!r} is not a directory with config.json and model.safetensors.")


def from_pretrained(path: str, *, seed: int = 0, **overrides) -> Pretrained:
    """Loads a HF BERT directory (or Hub name, where there is internet) into :class:`BertEncoder`.

    Reads ``config.json`` with ``transformers.BertConfig`` and ``model.safetensors`` with
    safetensors' numpy API; a tokenizer saved beside them is loaded with ``AutoTokenizer`` and
    checked against the vocabulary size. ``overrides`` set metaflax options (``compute_dtype``,
    ``remat``).
    """
    import transformers
    from safetensors.numpy import load_file

    path = _resolve(path)
    for f in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, f)):
            hint = " (convert pytorch_model.bin with transformers' save_pretrained)" * (
                f == "model.safetensors"
            )
            raise FileNotFoundError(f"{os.path.join(path, f)} is missing{hint}.")
    with open(os.path.join(path, "config.json")) as fh:
        model_type = json.load(fh).get("model_type")
    if model_type != "bert":
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; metaflax reads {SUPPORTED}."
        )
    cfg = BertConfig.from_hf(transformers.BertConfig.from_pretrained(path), **overrides)
    encoder = BertEncoder(cfg, rngs=nnx.Rngs(seed))
    init = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    try:
        tensors = load_file(os.path.join(path, "model.safetensors"))
    except Exception as e:
        raise ValueError(f"{os.path.join(path, 'model.safetensors')} is unreadable: {e}") from None
    params, missing = params_from_hf(tensors, cfg, init)
    if missing:
        msg = f"{path}: no {', '.join(missing)} in the checkpoint; newly initialised."
        warnings.warn(msg, stacklevel=2)
        cfg = dataclasses.replace(cfg, pretrained_pooler=False)  # only the pooler may be missing
    nnx.update(encoder, nnx.State(params))
    tokenizer = None
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        check_tokenizer(tokenizer, cfg)
    return Pretrained(encoder, cfg, tokenizer)


def check_tokenizer(tokenizer, cfg: BertConfig) -> None:
    """Raises if the tokenizer can produce ids outside the encoder's embedding table."""
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size is "
            f"{cfg.vocab_size}: ids >= {cfg.vocab_size} have no embedding. Use the tokenizer "
            "saved with these weights, or a config with a matching vocab_size."
        )


def save_pretrained(path: str, params, cfg: BertConfig, tokenizer=None) -> None:
    """Writes ``config.json`` + ``model.safetensors`` (+ the tokenizer) for transformers.

    ``params``: the encoder's parameters (a pure dict, as trained) or a :class:`BertEncoder`
    (as :func:`from_pretrained` returns it). ``transformers.BertModel.from_pretrained(path)``
    then loads the encoder unchanged.
    """
    from safetensors.numpy import save_file

    if isinstance(params, BertEncoder):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    elif not isinstance(params, dict):
        raise TypeError(
            f"params must be the encoder's parameter dict or a BertEncoder, got "
            f"{type(params).__name__} (for from_pretrained's result pass .encoder)."
        )
    if not cfg.pretrained_pooler:
        warnings.warn(
            "the checkpoint this encoder was loaded from had no pooler: the exported pooler is "
            "a fresh initialisation, unless it was trained since (pool='cls').",
            stacklevel=2,
        )

    hf_config = cfg.to_hf()
    os.makedirs(path, exist_ok=True)
    hf_config.architectures = ["BertModel"]
    hf_config.save_pretrained(path)
    save_file(
        params_to_hf(params, cfg),
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
        tokenizer.save_pretrained(path)


def top_layers_filter(cfg: BertConfig, k: int, head: str = "head") -> Callable[[PyTree], PyTree]:
    """``adapt_mask`` adapting the top ``k`` encoder layers, the pooler and the head.

    Params are expected as ``{"encoder": <BertEncoder params>, head: ...}``. ``k=0`` is ANIL.
    """
    if not 0 <= k <= cfg.num_hidden_layers:
        raise ValueError(f"k={k} must be between 0 and num_hidden_layers={cfg.num_hidden_layers}.")
    first = cfg.num_hidden_layers - k

    def keep(path) -> bool:
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        if keys[0] == head:
            return True
        if keys[:2] == ["encoder", "layers"]:
            return keys[2] >= first
        return keys[:2] == ["encoder", "pooler"] and k > 0

    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: keep(p), params)


class _Top(nnx.Module):
    """The blocks from ``start`` on, the final norm and the pooler of ``encoder`` (shared)."""

    def __init__(self, encoder: BertEncoder, start: int):
        self.cfg = encoder.cfg
        self.layers = nnx.List(list(encoder.layers)[start:])
        self.final_norm = encoder.final_norm
        self.pooler = encoder.pooler

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _upper(self, x, attention_mask.astype(bool))


class FrozenTrunk(NamedTuple):
    """An encoder cut in two: a frozen trunk (embeddings and the lower blocks) whose outputs are
    computed once per text, and the trained top (:func:`freeze_trunk`).

    Attributes:
      trunk_fn: ``trunk_fn(input_ids, attention_mask) -> hidden [batch, seq, hidden]``, jitted,
        the frozen parameters inside (no gradient flows into them).
      top_fn: ``top_fn(top_params, hidden, attention_mask) -> (sequence_output, pooled_output)``:
        on the trunk's output, what the whole encoder returns on the texts.
      top_params: the top's parameters, ``{"layers": {0: <block start>, ...}, "pooler": ...}``
        (no ``"layers"`` when no block is trained).
      merge: ``merge(top_params) -> params`` of the whole :class:`BertEncoder` (for export).
      fingerprint: a digest of the frozen parameters and the cut (part of a cache key).
    """

    trunk_fn: Callable[[jax.Array, jax.Array], jax.Array]
    top_fn: Callable[..., tuple[jax.Array, jax.Array]]
    top_params: dict
    merge: Callable[[dict], dict]
    fingerprint: str


def freeze_trunk(encoder: BertEncoder, num_trained: int) -> FrozenTrunk:
    """Freezes all but the top ``num_trained`` blocks (and the pooler) of ``encoder``.

    ``top_fn(top_params, trunk_fn(ids, mask), mask)`` equals ``encoder(ids, mask)`` up to float
    rounding, and costs only the top blocks, so a meta-learner that trains the top alone can run
    on trunk outputs computed once per text (:func:`trunk_features`).

    >>> enc = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
    >>> cut = freeze_trunk(enc, 1)
    >>> ids = jnp.ones((2, 16), jnp.int32)
    >>> mask = jnp.ones((2, 16), bool)
    >>> seq, pooled = cut.top_fn(cut.top_params, cut.trunk_fn(ids, mask), mask)
    >>> bool(jnp.allclose(pooled, enc(ids, mask)[1], atol=1e-5)), sorted(cut.top_params["layers"])
    (True, [0])
    """
    import hashlib

    from metaflax.functional import functionalize

    total = encoder.cfg.num_hidden_layers
    if not 0 <= num_trained <= total:
        raise ValueError(
            f"num_trained={num_trained} must be between 0 and num_hidden_layers={total}."
        )
    start = total - num_trained
    lower_fn, params = functionalize(encoder, "lower")
    lower = jax.jit(lower_fn, static_argnums=4)
    top_fn, top_params = functionalize(_Top(encoder, start))

    def trunk_fn(input_ids, attention_mask):
        return lower(params, input_ids, attention_mask, None, start)

    def merge(top: dict) -> dict:
        layers = {**params["layers"], **{start + i: v for i, v in top.get("layers", {}).items()}}
        return {**params, **top, "layers": layers}

    digest = hashlib.sha256(f"{encoder.cfg}|{start}".encode())
    frozen = {k: v for k, v in params.items() if k not in ("layers", "pooler", "final_norm")}
    frozen["layers"] = {i: params["layers"][i] for i in range(start)}
    for leaf in jax.tree.leaves(frozen):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return FrozenTrunk(trunk_fn, top_fn, top_params, merge, digest.hexdigest()[:16])


def trunk_features(
    trunk: FrozenTrunk,
    tokens: np.ndarray,
    mask: np.ndarray,
    *,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> np.ndarray:
    """``trunk.trunk_fn`` on every row of ``tokens`` / ``mask`` (``[n, seq]``), ``batch_size``
    rows at a time: ``[n, seq, hidden]`` float32 on the host, with a progress bar.

    With ``cache_dir`` the result is also stored there as ``trunk-<key>.npy``, the key a digest
    of the frozen parameters, the cut and the token ids and mask (so another model, tokenizer or
    dataset never reads it), and read back on the next call instead of computed.
    """
    import hashlib

    from tqdm import tqdm

    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(
            f"tokens {tokens.shape} and mask {mask.shape} must be the same [n, seq] shape."
        )
    if not len(tokens):
        raise ValueError("trunk_features got no rows: nothing to encode.")
    path = None
    if cache_dir:
        digest = hashlib.sha256(trunk.fingerprint.encode())
        for a in (tokens.astype(np.int64), mask.astype(bool)):
            digest.update(str(a.shape).encode() + a.tobytes())
        path = os.path.join(cache_dir, f"trunk-{digest.hexdigest()[:24]}.npy")
        if os.path.isfile(path):
            try:
                out = np.load(path, mmap_mode="r")
                if out.shape[:2] == tokens.shape:
                    return out
            except (OSError, ValueError):
                pass  # a torn or corrupt file: computed again and rewritten below
    pad = -len(tokens) % batch_size if len(tokens) > batch_size else 0
    ids = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
    valid = np.concatenate([mask, np.ones((pad, mask.shape[1]), mask.dtype)])
    size = min(batch_size, len(ids))
    parts = []
    for i in tqdm(range(0, len(ids), size), desc="frozen trunk", unit="batch", leave=False):
        parts.append(np.asarray(trunk.trunk_fn(ids[i : i + size], valid[i : i + size])))
    out = np.concatenate(parts)[: len(tokens)].astype(np.float32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, path)
    return out

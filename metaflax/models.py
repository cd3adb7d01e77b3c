"""Reference models as flax nnx modules: the MAML paper's MLP and Conv4, a small Transformer.

Convert them once with :func:`metaflax.functionalize`; the kernel never sees modules.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


class MLP(nnx.Module):
    """A ReLU multi-layer perceptron, e.g. the sinusoid net ``MLP([1, 40, 40, 1])``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> MLP([1, 40, 40, 1], rngs=nnx.Rngs(0))(jnp.ones((10, 1))).shape
    (10, 1)
    """

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got sizes={sizes}.")
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 ('VALID': odd edges are dropped), as elementwise maxima of
    the four strided sub-grids.

    Equal to ``nnx.max_pool(x, (2, 2), (2, 2))``, but its gradient is a select instead of XLA's
    select-and-scatter, which is much faster to differentiate twice on CPU. Not a reshape + max
    reduction: that gradient compares the input with the reduced output, and in a compiled,
    vmapped MAML step of two or more inner steps XLA:CPU computed the two with different
    roundings, so the meta-gradient came out silently wrong (22% off in float64; the pairwise
    form agrees with a sequential ``task_map`` to 1e-15, ``tests/test_models.py``).
    """
    _, h, w, _ = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    top = jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    return jnp.maximum(top, jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3 'SAME' convolution (NHWC, HWIO kernel) as nine shifted slices and one matmul.

    Numerically a ``lax.conv_general_dilated``, but built from slices and a dot: on XLA:CPU the
    meta-gradient of a vmapped or scanned Conv4 MAML step is ~16x faster this way (per-task
    weights make XLA emit grouped or in-loop convolutions, whose backward passes are slow), and
    every piece has a cheap second derivative. See benchmarks/README.md.
    """
    _, h, w, c = x.shape  # x: [batch, h, w, in]; kernel: [3, 3, in, out]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    return cols @ kernel.reshape(9 * c, -1) + bias.reshape(1, 1, 1, -1)


class BatchStatNorm(nnx.Module):
    """Per-channel normalisation with the current batch's statistics and a learned affine.

    The MAML paper's batch norm: statistics always come from the batch at hand (transductive),
    so there is no running state to carry through inner loops.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.scale.reshape(var.shape) + self.bias.reshape(var.shape)


class Conv4(nnx.Module):
    """The 4-block conv net of the MAML paper: [conv3x3(64), batch norm, ReLU, max-pool] x 4.

    Parameters are those of ``nnx.Conv`` (HWIO kernels); the forward pass uses
    :func:`conv3x3` and :func:`max_pool_2x2`, the formulations that differentiate fastest.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> Conv4(num_classes=5, rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28, 1))).shape
    (2, 5)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 1,
        channels: int = 64,
        image_size: int = 28,
        rngs: nnx.Rngs,
    ):
        self.convs = nnx.List()
        self.norms = nnx.List()
        size = image_size
        for i in range(4):
            self.convs.append(
                nnx.Conv(in_channels if i == 0 else channels, channels, (3, 3), rngs=rngs)
            )
            self.norms.append(BatchStatNorm(channels))
            size //= 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for 4 poolings (need >= 16).")
        self.head = nnx.Linear(size * size * channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, h, w, c]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv3x3(x, conv.kernel[...], conv.bias[...])
            x = max_pool_2x2(jax.nn.relu(norm(x)))
        return self.head(x.reshape(x.shape[0], -1))


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    # The weight gradient as one 2-D matmul over all leading axes; both products go through
    # _matmul again, so every derivative order keeps this form.
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return _matmul(g, w.T), _matmul(x2.T, g2)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def batched_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x @ y`` over leading batch axes (attention), derivatives again as ``batched_matmul``."""
    return x @ y


def _batched_matmul_bwd(res, g):
    x, y = res
    return batched_matmul(g, y.swapaxes(-1, -2)), batched_matmul(x.swapaxes(-1, -2), g)


def _batched_matmul_fwd(x, y):
    return batched_matmul(x, y), (x, y)


batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of every head: two :func:`batched_matmul` products and a softmax.

    The attention of :class:`EncoderBlock` and :class:`metaflax.bert.BertLayer`. Its derivatives
    of every order are exact (fused attention kernels often lack double-backward), so
    second-order MAML runs through it; the softmax runs in at least float32, also under bfloat16.

    Args:
      q: queries ``[batch, q_len, heads, head_dim]``.
      k: keys ``[batch, k_len, heads, head_dim]``.
      v: values ``[batch, k_len, heads, head_dim]``.
      mask: ``[batch, q_len, k_len]`` or broadcastable to it (``[batch, 1, k_len]`` for key
        padding); True = attend.

    Returns:
      ``[batch, q_len, heads, head_dim]``, in the dtype of ``v``.

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((2, 5, 4, 8))  # [batch, seq, heads, head_dim]
    >>> dot_product_attention(q, k, v, jnp.ones((2, 1, 5), bool)).shape
    (2, 5, 4, 8)
    """
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [batch, heads, seq, head_dim]
    scores = batched_matmul(q, k.swapaxes(-1, -2))
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = scores / np.sqrt(q.shape[-1]).astype(scores.dtype)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return batched_matmul(probs, v).transpose(0, 2, 1, 3)


def dense_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
):
    """``lax.dot_general`` for ``nnx.Linear(dot_general=...)``: the same numbers, with
    derivatives written as plain 2-D matmuls.

    Differentiated by JAX's own rules, ``x @ W`` with ``x: [batch, seq, d]`` (and a task axis
    under ``vmap``) gives weight gradients contracting several axes at once, and XLA:CPU lays
    their operands out again (transposing copies) before each such dot, at every derivative
    order of MAML. Here they are flattened to ``[batch * seq, d]`` and transposed explicitly (and
    the attention's batched products likewise), which XLA:CPU runs without those copies
    (measurements: ``benchmarks/README.md``, PyTorch peers). Other contractions
    fall through to ``lax.dot_general``. Reverse mode only (``jax.jvp`` of it is not defined),
    which is all metaflax uses.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
    defaults = precision is None and preferred_element_type is None and out_sharding is None
    if plain and rhs.ndim == 2 and defaults:
        return _matmul(lhs, rhs)
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


class EncoderBlock(nnx.Module):
    """A pre-LN Transformer block: :func:`dot_product_attention` (exact double-backward), dense
    layers through :func:`dense_dot_general`."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        dense = functools.partial(nnx.Linear, dot_general=dense_dot_general, rngs=rngs)
        self.qkv = dense(dim, 3 * dim)
        self.out = dense(dim, dim)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = dense(dim, mlp_dim)
        self.mlp_out = dense(mlp_dim, dim)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape  # x: [batch, seq, dim]; mask: [batch, seq]
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.num_heads, -1), 3, 2)
        attn = dot_product_attention(q, k, v, mask[:, None, :])  # [batch, seq, heads, head_dim]
        x = x + self.out(attn.reshape(b, t, d))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class TextClassifier(nnx.Module):
    """A small pre-LN Transformer encoder, masked mean-pooling and a linear head.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = TextClassifier(vocab_size=100, num_classes=5, max_len=16, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((3, 16), jnp.int32), jnp.ones((3, 16), bool)).shape
    (3, 5)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        max_len: int,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 512,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
        self.blocks = nnx.List(
            [EncoderBlock(dim, num_heads, mlp_dim, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, dot_general=dense_dot_general, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        # tokens, mask: [batch, seq]
        # A plain gather in the parameters' dtype (nnx.Embed's call casts to float32).
        x = jnp.take(self.embed.embedding[...], tokens, axis=0) + self.pos[None, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        m = mask[..., None].astype(x.dtype)
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return self.head(pooled)

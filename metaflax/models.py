"""Reference models as flax nnx modules: the MAML paper's MLP and Conv4, a small Transformer.

Convert them once with :func:`metaflax.functionalize`; the kernel never sees modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


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


class EncoderBlock(nnx.Module):
    """A pre-LN Transformer block; attention written as plain einsums (exact double-backward)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape  # x: [batch, seq, dim]; mask: [batch, seq]
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.num_heads, -1), 3, 2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # softmax in >= float32, also under bf16
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        logits = logits / jnp.sqrt(q.shape[-1]).astype(logits.dtype)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
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
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

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

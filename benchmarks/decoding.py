"""Greedy decoding: cached keys/values (``seq2seq.greedy_decode``) vs re-running the whole model.

    python -m benchmarks.decoding          # writes benchmarks/results/decoding.json

The model is the Tatoeba config's ``Seq2Seq`` (d=64, 2 layers, 2 heads, MLP 128, 50 target
positions) with random weights and a 1,000-token vocabulary, decoding 25 episodes x 10 sources
of 48 tokens, vmapped over 25 copies of the params (as few-shot evaluation decodes with each
episode's adapted params). The baseline, :func:`full_recompute_fns`, is how decoding worked
before the cache: the same greedy loop, but every position runs encoder and decoder over the
source and the whole target prefix. Both are jitted and timed in alternating rounds after a
compile round; they must produce the same tokens. Decoding always runs all positions, so random
weights cost the same as trained ones.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metaflax as mf
from benchmarks import report
from metaflax import seq2seq

BOS, EOS = 1, 2


def full_recompute_fns(apply_fn):
    """``(start_fn, step_fn)`` for :func:`seq2seq.greedy_decode` without a cache: the state is
    the source and the tokens so far, and every position runs the full forward on them."""

    def start_fn(params, src, src_mask, max_len):
        return src, src_mask, jnp.zeros((src.shape[0], max_len), jnp.int32)

    def step_fn(params, state, token, i):
        src, src_mask, tokens = state
        tokens = tokens.at[:, i].set(token)
        mask = jnp.ones(tokens.shape, bool)  # the causal mask hides the positions after i
        return apply_fn(params, src, src_mask, tokens, mask)[:, i], (src, src_mask, tokens)

    return start_fn, step_fn


def setup(vocab=1000, dim=64, layers=2, heads=2, mlp=128, tgt_len=50, seed=0):
    """``(decoders, params)``: both decoders as ``fn(params, src, src_mask) -> tokens``."""
    model = seq2seq.Seq2Seq(
        vocab, max_len=tgt_len, dim=dim, num_layers=layers, num_heads=heads, mlp_dim=mlp,
        rngs=nnx.Rngs(seed),
    )  # fmt: skip
    apply_fn, params = mf.functionalize(model)
    start_fn, _ = mf.functionalize(model, "start_decoding")
    step_fn, _ = mf.functionalize(model, "decode_step")
    recompute = full_recompute_fns(apply_fn)
    kw = dict(bos_id=BOS, eos_id=EOS, max_len=tgt_len)
    decoders = {
        "cached": lambda p, s, m: seq2seq.greedy_decode(start_fn, step_fn, p, s, m, **kw),
        "full_recompute": lambda p, s, m: seq2seq.greedy_decode(*recompute, p, s, m, **kw),
    }
    return decoders, params


def sources(key, shape, vocab, src_len):
    """Random ``[*shape, src_len]`` sources of 4..src_len tokens, zero-padded, and their mask."""
    k_tok, k_len = jax.random.split(key)
    src = jax.random.randint(k_tok, (*shape, src_len), 3, vocab)
    lengths = jax.random.randint(k_len, (*shape, 1), 4, src_len + 1)
    mask = jnp.arange(src_len).reshape((1,) * len(shape) + (src_len,)) < lengths
    return jnp.where(mask, src, 0), mask


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=25)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    vocab, src_len, tgt_len = 1000, 48, 50
    decoders, params = setup(vocab=vocab, tgt_len=tgt_len)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (args.episodes, *x.shape)), params)
    src, mask = sources(jax.random.key(1), (args.episodes, args.queries), vocab, src_len)
    fns = {name: jax.jit(jax.vmap(fn)) for name, fn in decoders.items()}
    tokens = {name: np.asarray(fn(stacked, src, mask)) for name, fn in fns.items()}  # compile
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(stacked, src, mask))
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "backend": jax.default_backend(),
        "setup": f"{args.episodes} episodes x {args.queries} sources, {tgt_len} positions",
        "median_ms": ms,
        "speedup": ms["full_recompute"] / ms["cached"],
        "same_tokens": bool(np.array_equal(tokens["cached"], tokens["full_recompute"])),
    }
    print(
        f"cached {ms['cached']:.0f} ms, full recompute {ms['full_recompute']:.0f} ms: "
        f"{result['speedup']:.1f}x; same tokens: {result['same_tokens']}"
    )
    report.write(args.out, "decoding", result)


if __name__ == "__main__":
    main()

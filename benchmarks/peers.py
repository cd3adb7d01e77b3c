"""PyTorch peers: metaflax's meta-step vs torch.func and higher, same CPU, same run.

    python -m benchmarks.peers                                   # all workloads, 1 inner step
    python -m benchmarks.peers --workloads sinusoid --inner-steps 1,5 --seconds 2 --rounds 2
    python -m benchmarks.peers --workloads conv4 --tasks 4 --torch-threads 1   # a busy machine

Each workload of ``benchmarks.workloads`` is rewritten below as a PyTorch module with the same
architecture, loaded with the JAX workload's parameter values and fed its episodes, so both sides
compute the same numbers (:func:`parity`, checked in ``tests/test_benchmarks.py``). The peers are
the usual ways to write second-order MAML in PyTorch, with ``torch.optim.Adam`` outside:

- ``torch.func loop``: ``functional_call`` + ``torch.func.grad`` for the inner loop, a Python
  loop over tasks, ``loss.backward()`` per task (the functorch MAML example without ``vmap``);
- ``torch.func vmap``: the same with ``torch.func.vmap`` over the tasks, with the layer and batch
  norms written out (``torch.func.vmap`` differentiates the fused ones wrongly; see
  :class:`LayerNorm`);
- ``higher``: ``higher.innerloop_ctx(copy_initial_weights=False, track_higher_grads=True)`` per
  task (the optional ``bench`` extra: ``pip install -e '.[bench]'``).

The torch.func peers also run FOMAML and Reptile (``--algorithms maml,fomaml,reptile``).
Everything runs in one process: metaflax's jitted ``alg.step`` and each peer in alternating
rounds after a warm-up round (compilation, allocator warm-up) that is not counted. torch gets one
intra-op thread per core (``torch.set_num_threads``) unless ``--torch-threads`` says otherwise:
on a machine busy with other work, multi-threaded torch ops stall (each waits for a descheduled
thread) far more than XLA's, so use ``--torch-threads 1`` there. Results go to
``benchmarks/results/peers.{json,md}``, with the machine's load average.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import metaflax as mf
from benchmarks import report
from benchmarks.reference import _rate
from benchmarks.workloads import (
    WORKLOADS,
    Workload,
    calls_per_second,
    cost_flops,
    make_algorithm,
)
from metaflax.core import check_episodes

# ----------------------------------------------------------------------------------------------
# The workloads' models in PyTorch: same layers, sizes, initial values and numerics.


class TorchMLP(nn.Module):
    """``metaflax.models.MLP``: Linear layers with ReLU in between."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x):
        *hidden, last = self.layers  # no slicing: higher's patched ModuleList cannot be sliced
        for layer in hidden:
            x = F.relu(layer(x))
        return last(x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``, or the same normalisation written out when ``native`` is False.

    ``torch.func.vmap`` gets second-order gradients through ``F.layer_norm`` and
    ``F.batch_norm`` wrong (~1e-5 to 1e-1 relative; the batched backward of the fused kernels
    treats the saved mean and 1/std as constants, cf. pytorch/functorch#534): the vmap peer
    switches to the written-out versions, which are exact.
    """

    native = True

    def forward(self, x):
        if self.native:
            return super().forward(x)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class BatchStatNorm2d(nn.BatchNorm2d):
    """``metaflax.models.BatchStatNorm`` in NCHW: always the batch's biased statistics (eps
    1e-5), no running state; ``native=False`` writes it out (see :class:`LayerNorm`)."""

    native = True

    def __init__(self, channels):
        super().__init__(channels, track_running_stats=False)

    def forward(self, x):  # x: [batch, c, h, w]
        if self.native:
            return super().forward(x)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def _written_out_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, LayerNorm | BatchStatNorm2d):
            m.native = False
    return model


class TorchConv4(nn.Module):
    """``metaflax.models.Conv4`` in NCHW: [conv3x3 'same', batch-statistics norm, ReLU, 2x2
    max-pool] x 4 and a linear head, with torch's own convolution and pooling."""

    def __init__(self, num_classes, *, in_channels=1, channels=64, image_size=28):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(4)
        )
        self.norms = nn.ModuleList(BatchStatNorm2d(channels) for _ in range(4))
        self.head = nn.Linear((image_size // 16) ** 2 * channels, num_classes)

    def forward(self, x):  # x: [batch, c, h, w]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)
        return self.head(x.permute(0, 2, 3, 1).flatten(1))  # flattened in NHWC order, like JAX


class TorchEncoderBlock(nn.Module):
    """``metaflax.models.EncoderBlock``: pre-LN (flax's eps 1e-6), masked softmax attention,
    tanh-approximated GELU (``jax.nn.gelu``'s default).

    Attention is written out: ``F.scaled_dot_product_attention`` picks a CPU flash kernel whose
    backward pass has no derivative ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so it cannot
    be used for second-order MAML.
    """

    def __init__(self, dim, num_heads, mlp_dim):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = LayerNorm(dim, eps=1e-6)
        self.mlp_in = nn.Linear(dim, mlp_dim)
        self.mlp_out = nn.Linear(mlp_dim, dim)

    def forward(self, x, mask):  # x: [batch, seq, dim]; mask: [batch, seq]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3 * self.num_heads, -1).chunk(3, dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        attn = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
        x = x + self.out(attn.reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x)), approximate="tanh"))


class TorchTextClassifier(nn.Module):
    """``metaflax.models.TextClassifier``: token + learned position embeddings, pre-LN blocks, a
    final LayerNorm, masked mean-pooling and a linear head."""

    def __init__(self, vocab_size, num_classes, *, max_len, dim, num_layers, num_heads, mlp_dim):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(
            TorchEncoderBlock(dim, num_heads, mlp_dim) for _ in range(num_layers)
        )
        self.ln = LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens, mask):  # tokens, mask: [batch, seq]
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        m = mask[..., None].to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1.0))


# ----------------------------------------------------------------------------------------------
# JAX workload <-> torch: parameter names and layouts, episodes.

_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_name(path) -> tuple[str, bool]:
    """``("layers.0.weight", is_kernel)`` for the flax param path ``['layers'][0]['kernel']``."""
    keys = [str(k.key) for k in path]
    return ".".join([*keys[:-1], _RENAME.get(keys[-1], keys[-1])]), keys[-1] == "kernel"


def to_torch(params) -> dict[str, torch.Tensor]:
    """flax params -> a torch ``state_dict``: Linear kernels [in, out] -> weight [out, in], conv
    kernels HWIO -> OIHW; dtypes are kept."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name, is_kernel = _torch_name(path)
        x = np.array(x)  # a writable copy
        if is_kernel:
            x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)
        out[name] = torch.from_numpy(np.ascontiguousarray(x))
    return out


def from_torch(tensors: dict[str, torch.Tensor], like) -> Any:
    """The inverse of :func:`to_torch`, shaped like the flax params ``like``."""

    def leaf(path, _):
        name, is_kernel = _torch_name(path)
        x = tensors[name].detach().numpy()
        if is_kernel:
            x = x.T if x.ndim == 2 else x.transpose(2, 3, 1, 0)
        return jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(leaf, like)


class TorchWorkload(NamedTuple):
    name: str
    model: nn.Module  # holds the JAX workload's parameter values
    criterion: Callable  # criterion(outputs, targets) -> scalar loss
    inputs: tuple[str, ...]  # batch keys passed to the model, in order
    target: str
    episodes: mf.Episode  # dicts of torch tensors, [tasks, ...]
    inner_lr: float
    outer_lr: float


def _episodes_to_torch(episodes: mf.Episode, channels_first: bool) -> mf.Episode:
    def convert(key, x):
        x = torch.from_numpy(np.array(x))
        if not (x.is_floating_point() or x.dtype == torch.bool):
            return x.long()  # labels and token ids
        if channels_first and key == "x":
            return x.permute(0, 1, 4, 2, 3).contiguous()  # [tasks, n, h, w, c] -> [.., c, h, w]
        return x

    return mf.Episode(*({k: convert(k, v) for k, v in half.items()} for half in episodes))


def torch_workload(w: Workload) -> TorchWorkload:
    """The PyTorch twin of a ``benchmarks.workloads`` workload (same params, same episodes)."""
    p = w.params
    if w.name == "sinusoid":
        layers = [p["layers"][i]["kernel"] for i in range(len(p["layers"]))]
        model = TorchMLP([layers[0].shape[0], *(k.shape[1] for k in layers)])
        criterion, inputs, target = F.mse_loss, ("x",), "y"
    elif w.name == "conv4":
        kernel = p["convs"][0]["kernel"]  # [3, 3, in, channels]
        model = TorchConv4(
            p["head"]["kernel"].shape[1],
            in_channels=kernel.shape[2],
            channels=kernel.shape[3],
            image_size=w.episodes.support["x"].shape[2],
        )
        criterion, inputs, target = F.cross_entropy, ("x",), "label"
    elif w.name == "encoder":
        vocab_size, dim = p["embed"]["embedding"].shape
        model = TorchTextClassifier(
            vocab_size,
            p["head"]["kernel"].shape[1],
            max_len=p["pos"].shape[0],
            dim=dim,
            num_layers=len(p["blocks"]),
            num_heads=4,  # workloads.encoder uses TextClassifier's default
            mlp_dim=p["blocks"][0]["mlp_in"]["kernel"].shape[1],
        )
        criterion, inputs, target = F.cross_entropy, ("tokens", "mask"), "label"
    else:
        raise ValueError(f"no PyTorch twin for workload {w.name!r}; valid: {', '.join(WORKLOADS)}")
    state = to_torch(p)
    model = model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=True)
    episodes = _episodes_to_torch(w.episodes, channels_first=w.name == "conv4")
    return TorchWorkload(w.name, model, criterion, inputs, target, episodes, w.inner_lr, w.outer_lr)


# ----------------------------------------------------------------------------------------------
# The peers' meta-steps.


class Peer(NamedTuple):
    """A PyTorch meta-step in the calling convention of ``benchmarks.reference._rate``."""

    init: Callable[[], tuple]  # () -> carry: (model, optimizers...) with the workload's params
    step: Callable[..., tuple]  # step(*carry, episodes, key) -> (*carry, loss)
    episodes: Any  # what step takes: the stacked meta-batch, or a list of per-task episodes


PEERS = ("torch.func loop", "torch.func vmap", "higher")
PEER_KINDS = {"torch.func loop": ("maml", "fomaml", "reptile"), "higher": ("maml",)}
PEER_KINDS["torch.func vmap"] = PEER_KINDS["torch.func loop"]


def _loss(tw: TorchWorkload, model: Callable, batch: dict) -> torch.Tensor:
    return tw.criterion(model(*(batch[k] for k in tw.inputs)), batch[tw.target])


def _unstack(episodes: mf.Episode) -> list[mf.Episode]:
    n = next(iter(episodes.support.values())).shape[0]
    return [mf.Episode(*({k: v[i] for k, v in h.items()} for h in episodes)) for i in range(n)]


def _func_peer(tw: TorchWorkload, kind: str, num_inner_steps: int, vectorize: bool) -> Peer:
    """MAML / FOMAML / Reptile with ``torch.func``: a loop over tasks, or ``vmap``."""

    def init():
        model = copy.deepcopy(tw.model)
        if vectorize:
            model = _written_out_norms(model)
        return model, torch.optim.Adam(model.parameters(), lr=tw.outer_lr)

    def task(model, params, support, query):
        """(query loss, adapted params) of one task; differentiable w.r.t. ``params``."""

        def support_loss(p):
            return _loss(tw, lambda *xs: functional_call(model, p, xs), support)

        for _ in range(num_inner_steps):
            grads = grad(support_loss)(params)
            if kind != "maml":
                grads = {n: g.detach() for n, g in grads.items()}
            params = {n: p - tw.inner_lr * grads[n] for n, p in params.items()}
        return _loss(tw, lambda *xs: functional_call(model, params, xs), query), params

    def step(model, opt, episodes, key):
        del key
        params = dict(model.named_parameters())
        opt.zero_grad(set_to_none=True)
        if kind == "reptile":
            with torch.no_grad():  # the pseudo-gradient params - mean(adapted) needs no graph
                if vectorize:
                    fn = vmap(lambda s, q: task(model, params, s, q), randomness="error")
                    losses, adapted = fn(episodes.support, episodes.query)
                    loss, adapted = losses.mean(), {n: a.mean(0) for n, a in adapted.items()}
                else:
                    outs = [task(model, params, *ep) for ep in episodes]
                    loss = sum(o[0] for o in outs) / len(outs)
                    adapted = {n: sum(o[1][n] for o in outs) / len(outs) for n in params}
                for n, p in params.items():
                    p.grad = p - adapted[n]
        elif vectorize:
            fn = vmap(lambda s, q: task(model, params, s, q)[0], randomness="error")
            loss = fn(episodes.support, episodes.query).mean()
            loss.backward()
            loss = loss.detach()
        else:
            loss = 0.0
            for ep in episodes:  # one backward per task frees each task's graph early
                task_loss = task(model, params, *ep)[0] / len(episodes)
                task_loss.backward()
                loss += task_loss.detach()
        opt.step()
        return model, opt, loss

    return Peer(init, step, tw.episodes if vectorize else _unstack(tw.episodes))


def _higher_peer(tw: TorchWorkload, kind: str, num_inner_steps: int) -> Peer:
    """Second-order MAML with ``higher``, as in its MAML example: one innerloop_ctx per task."""
    import higher

    def init():
        model = copy.deepcopy(tw.model)
        outer = torch.optim.Adam(model.parameters(), lr=tw.outer_lr)
        return model, outer, torch.optim.SGD(model.parameters(), lr=tw.inner_lr)

    def step(model, outer, inner, episodes, key):
        del key
        outer.zero_grad(set_to_none=True)
        loss = 0.0
        for support, query in episodes:
            with higher.innerloop_ctx(
                model, inner, copy_initial_weights=False, track_higher_grads=True
            ) as (fmodel, diffopt):
                for _ in range(num_inner_steps):
                    diffopt.step(_loss(tw, fmodel, support))
                task_loss = _loss(tw, fmodel, query) / len(episodes)
                task_loss.backward()
            loss += task_loss.detach()
        outer.step()
        return model, outer, inner, loss

    return Peer(init, step, _unstack(tw.episodes))


def make_peer(name: str, kind: str, tw: TorchWorkload, num_inner_steps: int) -> Peer:
    """The meta-step of peer ``name`` (one of ``PEERS``) for algorithm ``kind``."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}.")
    if kind not in PEER_KINDS[name]:
        raise ValueError(f"peer {name!r} implements {', '.join(PEER_KINDS[name])}, not {kind!r}.")
    if name == "higher":
        return _higher_peer(tw, kind, num_inner_steps)
    return _func_peer(tw, kind, num_inner_steps, vectorize=name == "torch.func vmap")


def available_peers() -> tuple[str, ...]:
    """``PEERS`` without ``higher`` when it is not installed."""
    try:
        import higher  # noqa: F401
    except ImportError:
        return tuple(p for p in PEERS if p != "higher")
    return PEERS


# ----------------------------------------------------------------------------------------------
# Parity: a peer's first meta-step equals metaflax's.


class MetaStep(NamedTuple):
    grads: Any  # the meta-gradient (Reptile: the pseudo-gradient), flax layout
    params: Any  # the meta-parameters after one outer Adam step
    loss: float  # the mean query loss after adaptation


def first_tasks(w: Workload, num_tasks: int) -> Workload:
    """The workload with its meta-batch cut to the first ``num_tasks`` tasks."""
    return w._replace(episodes=jax.tree.map(lambda x: x[:num_tasks], w.episodes))


def as_dtype(w: Workload, dtype) -> Workload:
    """The workload with floating-point params and episodes cast to ``dtype`` (float64 needs
    ``jax.enable_x64``)."""

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return w._replace(params=jax.tree.map(cast, w.params), episodes=jax.tree.map(cast, w.episodes))


def metaflax_meta_step(w: Workload, kind: str, num_inner_steps: int, **kw) -> MetaStep:
    """metaflax's first meta-step on ``w`` (``alg.step`` = ``meta_grad`` + ``outer_update``)."""
    alg = make_algorithm(kind, w, num_inner_steps, **kw)
    state = alg.init(w.params)
    grads, metrics = jax.jit(alg.meta_grad)(state.meta_params, w.episodes, jax.random.key(0))
    state, _ = jax.jit(alg.outer_update)(state, grads, metrics)
    return MetaStep(grads, state.meta_params, float(metrics["loss"]))


def peer_meta_step(w: Workload, peer: str, kind: str, num_inner_steps: int) -> MetaStep:
    """A peer's first meta-step on the PyTorch twin of ``w``, in flax layout."""
    p = make_peer(peer, kind, torch_workload(w), num_inner_steps)
    out = p.step(*p.init(), p.episodes, None)
    model = out[0]
    grads = from_torch({n: t.grad for n, t in model.named_parameters()}, like=w.params)
    params = from_torch(dict(model.named_parameters()), like=w.params)
    return MetaStep(grads, params, float(out[-1]))


def _rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves together (leafwise ratios are meaningless for leaves
    whose exact value is zero, like the gradient of a conv bias followed by a batch norm)."""
    sq = lambda t: sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(t))  # noqa: E731
    return math.sqrt(sq(jax.tree.map(jnp.subtract, a, b)) / sq(b))


def parity(
    w: Workload,
    peer: str,
    kind: str = "maml",
    num_inner_steps: int = 2,
    reference: MetaStep | None = None,
    **kw,
) -> dict[str, float]:
    """Relative differences between a peer's first meta-step and metaflax's on ``w``.

    Returns ``{"grads", "updates", "loss"}``: the relative L2 error of the meta-gradient and of
    the outer update (params after - before), and the relative error of the loss.
    ``reference`` is ``metaflax_meta_step(w, kind, num_inner_steps, **kw)`` if already computed;
    ``kw`` goes to ``mf.maml`` (e.g. ``task_map="scan"``). Adam's first update is about
    ``lr * sign(grad)``, so ``updates`` is only meaningful in float64.

    >>> from benchmarks import workloads
    >>> err = parity(first_tasks(workloads.sinusoid(), 2), "torch.func loop")
    >>> err["grads"] < 1e-5
    True
    """
    ref = reference or metaflax_meta_step(w, kind, num_inner_steps, **kw)
    got = peer_meta_step(w, peer, kind, num_inner_steps)
    return {
        "grads": _rel_err(got.grads, ref.grads),
        "updates": _rel_err(
            jax.tree.map(jnp.subtract, got.params, w.params),
            jax.tree.map(jnp.subtract, ref.params, w.params),
        ),
        "loss": abs(got.loss - ref.loss) / abs(ref.loss),
    }


# ----------------------------------------------------------------------------------------------
# Timing.


def compare(
    w: Workload, kind: str, num_inner_steps: int, peers, seconds: float, rounds: int
) -> dict:
    """Tasks/s of metaflax's jitted step and each peer's, in alternating rounds (the first round
    compiles and warms up and is not counted)."""
    alg = make_algorithm(kind, w, num_inner_steps)
    mf_step = jax.jit(alg.step, donate_argnums=0)
    key = jax.random.key(0)
    # XLA's count for the step as written (every op; the peers compute the same numbers)
    flops = cost_flops(mf_step.lower(alg.init(w.params), w.episodes, key).cost_analysis())
    tw = torch_workload(w)
    made = {name: make_peer(name, kind, tw, num_inner_steps) for name in peers}
    totals = {name: [0, 0.0] for name in ("metaflax", *made)}
    for r in range(rounds + 1):
        runs = {"metaflax": (mf_step, (alg.init(w.params),), w.episodes)}
        runs.update({name: (p.step, p.init(), p.episodes) for name, p in made.items()})
        for name, (step, carry, episodes) in runs.items():
            n, sec = _rate(step, carry, episodes, key, seconds / rounds if r else 0.0)
            if r:
                totals[name] = [totals[name][0] + n, totals[name][1] + sec]
    tasks = check_episodes(w.episodes)
    rates = {name: tasks * n / sec for name, (n, sec) in totals.items()}
    mf_rate = rates.pop("metaflax")
    best = max(rates, key=rates.get)
    return {
        "metaflax_tasks_per_s": mf_rate,
        "peers_tasks_per_s": rates,
        "best_peer": best,
        "ratio": mf_rate / rates[best],  # metaflax tasks/s / best peer's tasks/s
        "flops_per_task": flops / tasks,
    }


# Matmuls timed alone in both frameworks: (einsum, lhs shape, rhs shape). The encoder's are the
# MLP's input projection over a meta-batch (per-task weights) and its weight gradient.
GEMMS = {
    "1024 x 1024 square": ("ij,jk->ik", (1024, 1024), (1024, 1024)),
    "encoder x W [8,800,128] x [8,128,512]": ("tnd,tdf->tnf", (8, 800, 128), (8, 128, 512)),
    "encoder dW = x^T dy [8,800,128] x [8,800,512]": ("tnd,tnf->tdf", (8, 800, 128), (8, 800, 512)),
}


def gemm_gflops(seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """fp32 GFLOP/s of each of ``GEMMS`` in jax (XLA:CPU) and in torch on this machine, with the
    current thread settings: the ceiling a compute-bound meta-step's GFLOP/s is read against."""
    rng = np.random.default_rng(0)
    out = {}
    for case, (eq, lhs, rhs) in GEMMS.items():
        a, b = (rng.standard_normal(s, np.float32) for s in (lhs, rhs))
        sizes = dict(zip(eq.split("->")[0].replace(",", ""), (*lhs, *rhs), strict=True))
        flops = 2 * math.prod(sizes.values())
        f = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        runs = {
            "jax": lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready(),
            "torch": lambda eq=eq, ta=ta, tb=tb: torch.einsum(eq, ta, tb),
        }
        out[case] = {name: flops * calls_per_second(r, seconds) / 1e9 for name, r in runs.items()}
    return out


def markdown(result: dict) -> str:
    """The table of benchmarks/README.md, from a peers.json result."""
    m = result["meta"]
    lines = [
        f"{m['date']}, {m['machine']}, {m['cores']} cores, jax {m['jax']}, torch {m['torch']} "
        f"({m['torch_threads']} intra-op threads), higher {m['higher']}, 1-min load average "
        f"{m['load_average'][0]:.1f} -> {m['load_average'][1]:.1f}: `{m['command']}`.",
        "",
        "fp32 matmuls alone, GFLOP/s (jax / torch): "
        + "; ".join(f"{k} {v['jax']:,.0f} / {v['torch']:,.0f}" for k, v in m["gemm"].items())
        + ". GFLOP/s below = tasks/s x XLA's FLOP count per task (the same math on both sides).",
        "",
        "| workload | algorithm | inner steps | tasks | metaflax tasks/s | "
        + " | ".join(f"{p} tasks/s" for p in m["peers"])
        + " | metaflax / best peer | GFLOP/s metaflax / best peer |",
        "|---|---|---|---|---|" + "---|" * len(m["peers"]) + "---|---|",
    ]
    for r in result["rows"]:
        per_task = r["flops_per_task"] / 1e9
        cells = [
            f"{r['peers_tasks_per_s'][p]:,.1f}" if p in r["peers_tasks_per_s"] else "n/a"
            for p in m["peers"]
        ]
        lines.append(
            f"| {r['workload']} | {r['algorithm']} | {r['inner_steps']} | {r['tasks']} | "
            f"{r['metaflax_tasks_per_s']:,.1f} | {' | '.join(cells)} | "
            f"{r['ratio']:.2f} ({r['best_peer']}) | {r['metaflax_tasks_per_s'] * per_task:,.1f} / "
            f"{r['peers_tasks_per_s'][r['best_peer']] * per_task:,.1f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="sinusoid,conv4,encoder")
    p.add_argument("--algorithms", default="maml", help="maml, fomaml, reptile (torch.func only)")
    p.add_argument("--peers", default=",".join(available_peers()))
    p.add_argument("--inner-steps", default="1")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, help="only the first TASKS tasks of each meta-batch")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count(),
        help="torch intra-op threads (default: one per core, like XLA:CPU); use 1 on a busy "
        "machine, where every multi-threaded torch op waits for a descheduled thread",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    peers = args.peers.split(",")
    for name in peers:
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")
    torch.set_num_threads(args.torch_threads)
    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    rows, load_before = [], os.getloadavg()[0]
    gemm = gemm_gflops()
    for case, rates in gemm.items():
        print(f"fp32 {case}: jax {rates['jax']:,.0f}, torch {rates['torch']:,.0f} GFLOP/s")
    for wl in args.workloads.split(","):
        if wl not in WORKLOADS:
            raise SystemExit(f"unknown workload {wl!r}; valid: {', '.join(WORKLOADS)}")
        w = WORKLOADS[wl]()
        if args.tasks:
            w = first_tasks(w, args.tasks)
        for kind in args.algorithms.split(","):
            these = [name for name in peers if kind in PEER_KINDS[name]]
            for k in map(int, args.inner_steps.split(",")):
                r = {"workload": wl, "algorithm": kind, "inner_steps": k}
                r["tasks"] = check_episodes(w.episodes)
                r.update(compare(w, kind, k, these, args.seconds, args.rounds))
                rows.append(r)
                peer_rates = ", ".join(f"{n} {v:,.1f}" for n, v in r["peers_tasks_per_s"].items())
                print(
                    f"{wl:9s} {kind:8s} k={k}: metaflax {r['metaflax_tasks_per_s']:,.1f} tasks/s;"
                    f" {peer_rates}; metaflax / best peer {r['ratio']:.2f};"
                    f" {r['flops_per_task'] / 1e9:.3g} GFLOP per task",
                    flush=True,
                )
    try:
        higher_version = metadata.version("higher")
    except metadata.PackageNotFoundError:
        higher_version = "not installed"
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "higher": higher_version,
        "command": " ".join(["python -m benchmarks.peers", *sys.argv[1:]]),
        # Other work on the machine slows both sides, multi-threaded torch ops most.
        "load_average": [load_before, os.getloadavg()[0]],
        "peers": peers,
        "gemm": gemm,
        "seconds": args.seconds,
        "rounds": args.rounds,
    }
    result = {"meta": meta, "rows": rows}
    report.write(args.out, "peers", result, markdown)
    print(f"wrote {args.out}/peers.json and peers.md")


if __name__ == "__main__":
    main()

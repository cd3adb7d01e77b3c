"""iMAML's meta-gradient against the number of conjugate-gradient iterations.

    python -m benchmarks.imaml_cg          # seconds on a CPU; writes results/imaml_cg.{json,md}

On sinusoid tasks (a tanh MLP of two ``--hidden``-unit layers, float64: smooth, so the inner
loop can converge, where a ReLU net's gradient descent cycles across its kinks) with the
proximal inner loop run to convergence, ``mf.imaml``'s meta-gradient with ``k`` CG iterations
is compared with the exact implicit gradient: ``lam (A + lam I)^-1 g`` per task from the
explicit Hessian ``A`` of the support loss at the solution (``jax.hessian``,
``numpy.linalg.solve``), averaged over the tasks.
Reported: the relative error per ``k``, the inner loop's remaining gradient norm, and the
Hessians' extreme eigenvalues (CG needs ``I + H / lam`` positive definite; its speed depends on
the condition number).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import metaflax as mf
from benchmarks import report
from benchmarks.workloads import run_info
from metaflax.tasks import mse_loss_fn, sample_sinusoid


def tanh_mlp(key: jax.Array, sizes: list[int]):
    """``(apply_fn, params)`` of a tanh MLP (float64, LeCun-normal weights)."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (a, b), jnp.float64) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def apply_fn(params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"][None])
        return x @ params[-1]["w"] + params[-1]["b"][None]

    return apply_fn, params


def measure(hidden: int, tasks: int, lam: float, cg_steps: list[int]) -> dict:
    apply_fn, params = tanh_mlp(jax.random.key(0), [1, hidden, hidden, 1])
    episodes, _ = sample_sinusoid(jax.random.key(1), tasks, 10, 10)
    episodes = jax.tree.map(lambda x: x.astype(jnp.float64), episodes)
    loss_fn = mse_loss_fn(apply_fn)
    kw = dict(inner_tx=optax.sgd(0.005), outer_tx=optax.sgd(1.0), num_inner_steps=4000, lam=lam)
    key = jax.random.key(0)

    # The exact implicit gradient, task by task, from the explicit Hessian at the solution.
    alg = mf.imaml(loss_fn, cg_steps=1, **kw)
    flat, unravel = ravel_pytree(params)
    exact, residuals, eigs = [], [], []
    for i, task_key in enumerate(mf.algorithms.task_keys(key, tasks)):
        inner_key, query_key = jax.random.split(task_key)
        task = jax.tree.map(lambda x: x[i], episodes)  # noqa: B023
        phi, _ = jax.jit(alg.adapt)(params, task.support, inner_key)
        x = ravel_pytree(phi)[0]
        support_loss = lambda v: loss_fn(unravel(v), task.support, None)[0]  # noqa: B023, E731
        hessian = np.asarray(jax.hessian(support_loss)(x))
        g = np.asarray(jax.grad(lambda v: loss_fn(unravel(v), task.query, query_key)[0])(x))  # noqa: B023
        exact.append(lam * np.linalg.solve(hessian + lam * np.eye(len(x)), g))
        residuals.append(float(jnp.linalg.norm(jax.grad(support_loss)(x) + lam * (x - flat))))
        eigs.append(np.linalg.eigvalsh(hessian)[[0, -1]])
    exact = np.mean(exact, 0)
    rows = []
    for k in cg_steps:
        grads, _ = jax.jit(mf.imaml(loss_fn, cg_steps=k, **kw).meta_grad)(params, episodes, key)
        error = np.linalg.norm(ravel_pytree(grads)[0] - exact) / np.linalg.norm(exact)
        rows.append({"cg_steps": k, "relative_error": float(error)})
    eigs = np.array(eigs)
    return {
        "hidden": hidden,
        "parameters": int(flat.size),
        "tasks": tasks,
        "lam": lam,
        "inner_steps": kw["num_inner_steps"],
        "max_inner_gradient_norm": max(residuals),
        "hessian_min_eigenvalue": float(eigs[:, 0].min()),
        "hessian_max_eigenvalue": float(eigs[:, 1].max()),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['date']}, {result['machine']}, jax {result['jax']}; sinusoid tanh MLP 1-"
        f"{result['hidden']}-{result['hidden']}-1 ({result['parameters']} parameters), "
        f"{result['tasks']} tasks, lam={result['lam']}, {result['inner_steps']} inner SGD steps "
        f"(largest remaining proximal gradient norm {result['max_inner_gradient_norm']:.1e}); "
        f"support-loss Hessian eigenvalues in [{result['hessian_min_eigenvalue']:.3g}, "
        f"{result['hessian_max_eigenvalue']:.3g}].",
        "",
        "| CG iterations | " + " | ".join(str(r["cg_steps"]) for r in result["rows"]) + " |",
        "|---|" + "---|" * len(result["rows"]),
        "| relative error | "
        + " | ".join(f"{r['relative_error']:.1e}" for r in result["rows"])
        + " |",
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=40)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--cg-steps", default="1,2,3,5,10,20,40")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    with jax.enable_x64(True):
        result = measure(
            args.hidden, args.tasks, args.lam, [int(k) for k in args.cg_steps.split(",")]
        )
    result = {**run_info(), **result}
    report.write(args.out, "imaml_cg", result, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()

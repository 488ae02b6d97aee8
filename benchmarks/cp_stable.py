"""Degenerate CP-ALS against norm-constrained (stable) CP-ALS.

For each kernel, rank and number of ALS sweeps, the relative error and the
degeneracy (`jaxfactor.cp_degeneracy`: the largest rank-1 term's norm over
the kernel's) of plain ALS (`decompose(..., "cp")`) and of stable ALS
(`decompose(..., "cp", norm_bound=b)`), in float64. Kernels:

* `W` (3x3x3, a 1-D conv kernel): `a o a o b + a o b o a + b o a o a` for
  orthonormal `a, b`, the classic tensor of rank 3 whose best rank-2
  approximation does not exist (De Silva and Lim 2008): ALS's rank-2 terms
  grow without bound as its error creeps to zero.
* `digits/conv*`: the 3x3 kernels of the small CNN of `decompose.py`,
  trained briefly on scikit-learn's digits.

Usage: `python benchmarks/cp_stable.py` (writes results/cp_stable.md);
`--quick` runs the `W` rows only, with fewer sweeps.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxfactor

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# (kernel, rank, sweeps) for the full run, W's and the trained kernels'.
W_CASES = [("W", 2, 100), ("W", 2, 1000), ("W", 2, 10000)]
DIGITS_CASES = [
  ("digits/conv2 (3x3x32x64)", 32, 100),
  ("digits/conv2 (3x3x32x64)", 32, 1000),
  ("digits/conv3 (3x3x64x64)", 32, 1000),
]


def degenerate_kernel() -> np.ndarray:
  """`a o a o b + a o b o a + b o a o a`, `a, b` orthonormal in R^3."""
  a, b = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 2)))[0].T
  terms = [(a, a, b), (a, b, a), (b, a, a)]
  return sum(np.einsum("i,j,k->ijk", *t) for t in terms)


def measure(kernel, rank, iterations, norm_bound):
  """(relative error, degeneracy, root-sum-square of the terms' norms over
  the kernel's) of one decomposition."""
  kernel = jnp.asarray(kernel, jnp.float64)
  decompose = jax.jit(
    jaxfactor.decompose,
    static_argnames=("format", "rank", "iterations", "norm_bound"),
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a long decomposition, on purpose
    cp = decompose(
      kernel, "cp", rank=rank, iterations=iterations, norm_bound=norm_bound
    )
  columns = [cp.in_proj, *cp.spatial, cp.out_proj.T]
  norms = np.prod([np.linalg.norm(np.asarray(c), axis=0) for c in columns], 0)
  total = np.linalg.norm(norms) / np.linalg.norm(np.asarray(kernel))
  return (
    float(jaxfactor.relative_error(cp, kernel)),
    float(jaxfactor.cp_degeneracy(cp, kernel)),
    float(total),
  )


def run(args):
  """The table's rows, and its header."""
  kernels = {"W": degenerate_kernel()}
  cases = [("W", 2, 300)] if args.quick else list(W_CASES)
  if not args.quick:
    import decompose as decompose_benchmark

    trained, _ = decompose_benchmark.trained_kernels(args.epochs)
    kernels.update(trained)
    cases += DIGITS_CASES

  header = ["kernel", "rank", "sweeps", "plain error", "plain degeneracy"]
  for b in args.norm_bound:
    header += [f"error, b={b:g}", f"degeneracy, b={b:g}"]
  rows = []
  for name, rank, iterations in cases:
    kernel = kernels[name]
    error, degeneracy, total = measure(kernel, rank, iterations, None)
    row = [name, str(rank), str(iterations), f"{error:.4f}"]
    row.append(f"{degeneracy:.2f} (rss {total:.2f})")
    for b in args.norm_bound:
      error, degeneracy, total = measure(kernel, rank, iterations, b)
      row += [f"{error:.4f}", f"{degeneracy:.2f} (rss {total:.2f})"]
    rows.append(row)
    print(" | ".join(row), flush=True)
  return rows, header


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="W only, few sweeps")
  parser.add_argument(
    "--norm-bound",
    type=float,
    nargs="+",
    default=[1.0, 2.0],
    help="the stable runs' norm_bound values (default: 1 2)",
  )
  parser.add_argument("--epochs", type=int, default=3, help="digits training")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()
  with jax.enable_x64(True):
    rows, header = run(args)

  command = "python benchmarks/cp_stable.py" + (
    " --quick" if args.quick else ""
  )
  lines = [
    "# Plain and stable (norm-constrained) CP-ALS",
    "",
    f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, jax"
    f" {jax.__version__}, float64. Command: `{command}`.",
    "",
    "Relative error `||CP - K|| / ||K||` and degeneracy"
    " `jaxfactor.cp_degeneracy` (the largest rank-1 term's norm over"
    " `||K||`; in brackets, the root-sum-square of the terms' norms over"
    " `||K||`, which `norm_bound=b` keeps at most `b`). Default starts"
    " (`restarts=3`).",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(row) + " |" for row in rows),
    "",
  ]
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / ("cp_stable_quick.md" if args.quick else "cp_stable.md")
  path.write_text("\n".join(lines))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

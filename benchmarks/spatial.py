"""Dense spatial stages: XLA's convolution against the tap matmul.

On CPU, `jaxfactor.conv` runs a dense k x k (or k x 1) stage either as
`lax.conv_general_dilated` ("conv") or as one matmul from the input to every
tap's output followed by a shift-add of those outputs, in a loop over batch
chunks ("tap_matmul"), by the rule in `jaxfactor._tap_matmul.applies`. This
script times both lowerings of single stages (batch 32, float32, "SAME",
stride 1; each forced with the private hook
`jaxfactor._lowering.forced(tap_matmul=...)`) and shows which one the rule
picks, so the rule can be checked against the machine: the stages of the
benchmark's formats (LowRank's k x k conv to F/4, Tucker's core,
SpatiallySeparable's k x 1 and 1 x k convs) and the cases the rule was drawn
from.

Forward (`fwd`) and forward+backward (`fwd+bwd`: the output and the VJP of a
random cotangent w.r.t. input and kernel; the tap matmul's derivatives are
the convolution's). jit, 2 warm-ups, `--rounds` rounds, each running every
program once in a random order (`conv._interleaved`); medians, ms.

Run: `python benchmarks/spatial.py` (~4 min on a 2-core machine). Writes
`benchmarks/results/spatial.md` (`--out` for another folder). CPU only.
"""

import argparse
import functools
import pathlib
import platform
import statistics

import conv  # this folder's benchmark: its interleaved timing loop
import jax
import jax.numpy as jnp
import numpy as np

import jaxfactor
from jaxfactor import _geometry
from jaxfactor import _stages
from jaxfactor import _tap_matmul

# (what it is, H = W, C, F, window)
STAGES = (
  ("LowRank mb56: 3x3 to F/4", 56, 128, 32, (3, 3)),
  ("LowRank mb28: 3x3 to F/4", 28, 256, 64, (3, 3)),
  ("LowRank mb14: 3x3 to F/4", 14, 512, 128, (3, 3)),
  ("Tucker mb56 core", 56, 32, 32, (3, 3)),
  ("Tucker mb28 core", 28, 64, 64, (3, 3)),
  ("SpatiallySeparable mb56: 3x1 to F/2", 56, 128, 64, (3, 1)),
  ("SpatiallySeparable mb56: 1x3 from F/2", 56, 64, 128, (1, 3)),
  ("SpatiallySeparable mb28: 3x1 to F/2", 28, 256, 128, (3, 1)),
  ("SpatiallySeparable mb28: 1x3 from F/2", 28, 128, 256, (1, 3)),
  ("dense mb56", 56, 128, 128, (3, 3)),
  ("dense, 28x28", 28, 128, 128, (3, 3)),
  ("narrow, 56x56", 56, 64, 16, (3, 3)),
  ("narrow, 56x56", 56, 128, 64, (3, 3)),
  ("narrow, 28x28", 28, 128, 32, (3, 3)),
  ("narrow, 112x112", 112, 64, 8, (3, 3)),
)


def time_stage(size, c, f, window, batch, rounds):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, c)), jnp.float32)
  kernel = jnp.asarray(
    rng.standard_normal((*window, c, f)) / (3 * c) ** 0.5, jnp.float32
  )
  cot = jnp.asarray(rng.standard_normal((batch, size, size, f)), jnp.float32)
  fns = {
    "fwd": lambda x, k, t: jaxfactor.conv(x, k),
    "fwd+bwd": functools.partial(conv._forward_backward, jaxfactor.conv),
  }
  calls = {}
  for lowering in ("conv", "tap_matmul"):
    compiled = conv.compile_for(
      fns, (x, kernel, cot), dict(tap_matmul=lowering == "tap_matmul")
    )
    for p, fn in compiled.items():
      calls[lowering, p] = lambda fn=fn: jax.block_until_ready(
        fn(x, kernel, cot)
      )
  times = conv._interleaved(calls, rounds)
  geometry = _geometry.resolve(
    "spatial", (size, size), window, strides=1, padding="SAME", dilation=1
  )
  auto = _tap_matmul.applies(
    _stages.SpatialConv(kernel, (0, 1)), x.shape, geometry
  )
  return {key: 1e3 * statistics.median(t) for key, t in times.items()}, auto


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a smoke run: two stages at 1/7 of their size, batch 1, one round",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  if jax.default_backend() != "cpu":
    parser.error(
      "compares the CPU's lowerings of dense stages: needs the"
      " CPU backend (e.g. JAX_PLATFORMS=cpu)"
    )
  stages = STAGES
  if args.quick:
    stages = [
      (name, size // 7, c, f, window) for name, size, c, f, window in STAGES[:2]
    ]
    args.batch, args.rounds = 1, 1
  lines = [
    f"{platform.machine()}, jax {jax.__version__},"
    f" {jax.default_backend()}, batch {args.batch}, float32, SAME,"
    f" stride 1, {args.rounds} rounds in random order, ms median",
    "",
    "| stage | HxW | C -> F | window | fwd conv | fwd tap_matmul |"
    ' fwd+bwd conv | fwd+bwd tap_matmul | "auto" on CPU |',
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, size, c, f, window in stages:
    ms, auto = time_stage(size, c, f, window, args.batch, args.rounds)
    fwd_ratio = ms["conv", "fwd"] / ms["tap_matmul", "fwd"]
    fb_ratio = ms["conv", "fwd+bwd"] / ms["tap_matmul", "fwd+bwd"]
    lines.append(
      f"| {name} | {size}x{size} | {c} -> {f} |"
      f" {'x'.join(map(str, window))} | {ms['conv', 'fwd']:.1f} |"
      f" {ms['tap_matmul', 'fwd']:.1f} ({fwd_ratio:.2f}x) |"
      f" {ms['conv', 'fwd+bwd']:.1f} |"
      f" {ms['tap_matmul', 'fwd+bwd']:.1f} ({fb_ratio:.2f}x) |"
      f" {'tap_matmul' if auto else 'conv'} |"
    )
    print(lines[-1], flush=True)
  lines += [
    "",
    "(Nx) after a tap_matmul time: the conv's time over it, > 1"
    " where the tap matmul is faster.",
  ]
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "spatial.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

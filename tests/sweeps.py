"""Pairwise (all-pairs) sweeps: every pair of option values in a few cases.

A full grid over k options grows as the product of their sizes; most bugs
need only two options to line up, and a pairwise sweep meets every pair of
values at least once in far fewer cases (Kuhn et al., 2004, "Software fault
interactions and implications for software testing").
"""

import itertools


def pairwise(options, valid=None):
  """A small list of cases (dicts) covering every valid pair of values.

  Args:
    options: `{name: values}`, at least two names.
    valid: optional `valid(case) -> bool`; invalid cases are never returned,
      and a pair that no valid case contains is not required.

  Returns:
    Cases in a deterministic order, chosen greedily from the full grid: each
    next case is the first one that covers the most pairs not yet covered.
  """
  names = list(options)
  grid = [
    dict(zip(names, values)) for values in itertools.product(*options.values())
  ]
  if valid is not None:
    grid = [case for case in grid if valid(case)]

  def pairs(case):
    return {
      ((a, repr(case[a])), (b, repr(case[b])))
      for a, b in itertools.combinations(names, 2)
    }

  uncovered = set().union(*(pairs(case) for case in grid))
  cases = []
  while uncovered:
    best = max(grid, key=lambda case: len(pairs(case) & uncovered))
    cases.append(best)
    uncovered -= pairs(best)
  return cases


def ids(cases):
  """Readable pytest ids for `pairwise` cases."""
  return ["-".join(f"{k}={v}" for k, v in case.items()) for case in cases]

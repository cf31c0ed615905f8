"""Exact linear sum assignment in JAX (jittable, vmappable), shared by the criterion and tracker.

A shortest-augmenting-path solver in the Jonker-Volgenant style, written for XLA: every row starts
at its cheapest column (row reduction) and the first claimant of each column keeps it; only the rows
left free are then added one at a time by a Dijkstra search over columns on reduced costs, with the
dual update that keeps the partial assignment optimal. When the row argmins are already distinct
(consecutive frames in the tracker, well-separated predictions in the matcher) no search runs at
all; otherwise the work grows with the number of collisions, not O(n^3) for every matrix.

Under `vmap` the loop runs until the slowest matrix of the batch is done (finished ones idle
through masked iterations); for the batches of training and tracking that is still faster than
mapping one matrix at a time (see benchmarks/matching.py).
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp


def _finite_costs(cost: jax.Array) -> jax.Array:
  """Replaces non-finite entries (nan, +-inf) by a finite value larger than any full finite
  assignment.

  The replacement is max + (max - min + 1) * n over the finite entries, so an assignment that uses
  one such entry always costs more than any assignment using only finite entries, while staying
  small enough to keep float32 potentials accurate (a huge constant such as 1e10 would swamp
  them).
  """
  finite = jnp.isfinite(cost)
  hi = jnp.max(jnp.where(finite, cost, -jnp.inf))
  lo = jnp.min(jnp.where(finite, cost, jnp.inf))
  hi = jnp.where(jnp.isfinite(hi), hi, 0.0)  # all entries non-finite
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
  big = hi + (hi - lo + 1.0) * min(cost.shape)
  return jnp.where(finite, cost, big)


class _Solver(NamedTuple):
  v: jax.Array          # [m] column duals (row duals are implicit: u[i] = min_j cost[i, j] - v[j])
  col4row: jax.Array    # [n] int32, -1 while the row is free
  row4col: jax.Array    # [m] int32, -1 while the column is free
  dist: jax.Array       # [m] shortest alternating path from `start` to each column (shifted)
  pred: jax.Array       # [m] int32 row before each column on that path
  scanned: jax.Array    # [m] bool columns whose distance is final
  relax_row: jax.Array  # [] int32 search: the row whose edges the next iteration relaxes
  relax_base: jax.Array  # [] f32 its distance offset
  j: jax.Array          # [] int32 flip: the next column to flip
  start: jax.Array      # [] int32 the free row being added
  k: jax.Array          # [] int32 position of `start` in the list of initially free rows
  flipping: jax.Array   # [] bool phase: flipping a path (else searching)


def _nearest(dist: jax.Array, assigned: jax.Array) -> jax.Array:
  """Index of the smallest dist [m], preferring an unassigned column among equals (then the lowest).

  Exact ties are common (constant rows, e.g. padded target slots in the matcher); taking a free
  column there ends the search at once instead of scanning every tied column first.
  """
  def smaller(a, b):
    (da, aa, ia), (db, ab, ib) = a, b
    a_first = (da < db) | ((da == db) & ((aa < ab) | ((aa == ab) & (ia < ib))))
    return (jnp.where(a_first, da, db), jnp.where(a_first, aa, ab), jnp.where(a_first, ia, ib))

  operands = (dist, assigned.astype(jnp.int32), jnp.arange(dist.shape[0], dtype=jnp.int32))
  init = (jnp.array(jnp.inf, dist.dtype), jnp.int32(2), jnp.int32(dist.shape[0]))
  return lax.reduce(operands, init, smaller, (0,))[2]


def _wide_col4row(cost: jax.Array) -> jax.Array:
  """Optimal column of each row of a wide cost [n, m], n <= m (distinct columns). Returns int32 [n].

  Invariant (LP duals of the rectangular problem, row duals implicit): every assigned row sits at
  the minimum of cost[i] - v, v <= 0, and v == 0 on unassigned columns; so the complete assignment
  reached at the end is optimal.

  One iteration of the single while loop is one Dijkstra step or one column of a path flip; under
  `vmap` every matrix advances at its own pace and the batch costs max(steps), not a sum of maxima.
  """
  n, m = cost.shape
  rows = jnp.arange(n, dtype=jnp.int32)
  argmin = jnp.argmin(cost, axis=1).astype(jnp.int32)
  # Each column goes to the first row whose argmin it is; the other claimants stay free.
  owner = jnp.full(m, n, jnp.int32).at[argmin].min(rows)
  col4row = jnp.where(owner[argmin] == rows, argmin, -1)
  row4col = jnp.where(owner < n, owner, -1)
  # Augmentation never frees a row, so the free rows are known now (ascending; stable sort).
  free_rows = jnp.argsort(col4row >= 0, stable=True).astype(jnp.int32)
  num_free = jnp.sum(col4row < 0)

  def fresh(start):  # search state before the first relaxation from `start`
    return (jnp.full(m, jnp.inf, cost.dtype), jnp.zeros(m, jnp.int32), jnp.zeros(m, bool), start,
            jnp.zeros((), cost.dtype))

  zero = jnp.zeros((), jnp.int32)
  dist, pred, scanned, relax_row, relax_base = fresh(free_rows[0])
  state = _Solver(jnp.zeros(m, cost.dtype), col4row, row4col, dist, pred, scanned, relax_row,
                  relax_base, zero, free_rows[0], zero, jnp.zeros((), bool))

  def step(s: _Solver) -> _Solver:
    # Search: relax the edges of relax_row, then take the nearest unscanned column j.
    via = s.relax_base + cost[s.relax_row] - s.v
    better = (via < s.dist) & ~s.scanned
    dist = jnp.where(better, via, s.dist)
    pred = jnp.where(better, s.relax_row, s.pred)
    j = _nearest(jnp.where(s.scanned, jnp.inf, dist), s.row4col >= 0)
    owner = s.row4col[j]
    found = owner < 0
    # j assigned: scan it and relax its row next (u[owner] = cost[owner, j] - v[j], tight).
    scanned = s.scanned.at[j].set(True)
    next_base = dist[j] - cost[jnp.maximum(owner, 0), j] + s.v[j]
    # j free (the sink): dual update on the scanned columns, then flip the path back from j.
    v_sink = s.v - jnp.where(s.scanned, dist[j] - dist, 0.0)

    # Flip: column fj takes the row it was reached from; that row's old column is next.
    fj = s.j
    fr = s.pred[fj]
    done_flip = fr == s.start
    k_next = s.k + 1
    n_dist, n_pred, n_scanned, n_row, n_base = fresh(free_rows[jnp.minimum(k_next, n - 1)])

    f = s.flipping
    sel = lambda a, b: jnp.where(f, a, b)  # noqa: E731  (flip branch, search branch)
    return _Solver(
        v=sel(s.v, jnp.where(found, v_sink, s.v)),
        col4row=sel(s.col4row.at[fr].set(fj), s.col4row),
        row4col=sel(s.row4col.at[fj].set(fr), s.row4col),
        dist=sel(jnp.where(done_flip, n_dist, s.dist), dist),
        pred=sel(jnp.where(done_flip, n_pred, s.pred), pred),
        scanned=sel(jnp.where(done_flip, n_scanned, s.scanned),
                    jnp.where(found, s.scanned, scanned)),
        relax_row=sel(jnp.where(done_flip, n_row, s.relax_row), jnp.maximum(owner, 0)),
        relax_base=sel(jnp.where(done_flip, n_base, s.relax_base), next_base),
        j=sel(s.col4row[fr], j),
        start=sel(jnp.where(done_flip, n_row, s.start), s.start),
        k=sel(jnp.where(done_flip, k_next, s.k), s.k),
        flipping=sel(~done_flip, found))

  return lax.while_loop(lambda s: s.k < num_free, step, state).col4row


def linear_sum_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Minimum-cost assignment, same semantics as `scipy.optimize.linear_sum_assignment`.

  Args:
    cost: [N, M] float costs. Non-finite entries are replaced by a finite value larger than any
      assignment of finite entries (so they are used only when unavoidable).

  Returns:
    (rows, cols): int32 [min(N, M)] each, rows ascending, such that cost[rows, cols].sum() is
    minimal.
    Ties may give a different assignment from scipy's, of the same total cost.
  """
  n, m = cost.shape
  k = min(n, m)
  if k == 0:
    return jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32)
  cost = _finite_costs(cost.astype(jnp.float32))
  if n <= m:
    return jnp.arange(n, dtype=jnp.int32), _wide_col4row(cost)
  # Tall: solve the transpose (each column picks a row), then list the pairs by ascending row.
  row4col = _wide_col4row(cost.T)
  order = jnp.argsort(row4col).astype(jnp.int32)
  return row4col[order], order


def batched_linear_sum_assignment(costs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`linear_sum_assignment` over a batch: costs [B, N, M] -> (rows, cols) int32 [B, min(N, M)]."""
  return jax.vmap(linear_sum_assignment)(costs)

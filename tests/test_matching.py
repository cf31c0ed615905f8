"""Tests for minvis_jax.matching against scipy.optimize.linear_sum_assignment."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from minvis_jax import matching


def _random_costs(rng, kind: str, count: int, shape: tuple[int, int]) -> np.ndarray:
  n, m = shape
  if kind == 'float':
    return rng.normal(size=(count, n, m)).astype(np.float32) * 3.0
  if kind == 'int':  # many ties
    return rng.integers(0, 4, size=(count, n, m)).astype(np.float32)
  if kind == 'constant_rows':  # some rows constant, the rest small integers
    costs = rng.integers(0, 5, size=(count, n, m)).astype(np.float32)
    constant = rng.random((count, n)) < 0.5
    values = rng.integers(0, 5, size=(count, n, 1)).astype(np.float32)
    return np.where(constant[..., None], values, costs)
  if kind == 'near_identity':  # tracker-like: mostly a permutation, a few collisions
    costs = rng.random((count, n, m)).astype(np.float32)
    for c in costs:
      perm = rng.permutation(m)[:n]
      c[np.arange(n), perm] -= 1.0
    return costs
  raise ValueError(kind)


# (kind, count, shape): 1000 matrices in all, a few compilations (one per shape).
_CASES = [
    ('float', 200, (8, 8)),
    ('int', 200, (8, 8)),
    ('int', 100, (5, 9)),
    ('int', 100, (9, 5)),
    ('constant_rows', 100, (10, 10)),
    ('float', 100, (20, 3)),
    ('int', 50, (7, 1)),
    ('float', 50, (1, 7)),
    ('near_identity', 50, (30, 30)),
    ('float', 46, (100, 100)),
    ('near_identity', 2, (200, 200)),
    ('float', 2, (300, 300)),
]


def _check_against_scipy(costs: np.ndarray, rows: np.ndarray, cols: np.ndarray):
  n, m = costs.shape[1:]
  k = min(n, m)
  assert rows.shape == (costs.shape[0], k) and cols.shape == (costs.shape[0], k)
  assert rows.dtype == np.int32 and cols.dtype == np.int32
  for c, r, cc in zip(costs, rows, cols):
    assert np.all(np.diff(r) > 0), 'rows must be ascending and distinct'
    assert len(np.unique(cc)) == k, 'columns must be distinct'
    assert r.min(initial=0) >= 0 and r.max(initial=0) < max(n, 1) and cc.max(initial=0) < max(m, 1)
    sr, sc = scipy.optimize.linear_sum_assignment(c)
    ref = c[sr, sc].sum(dtype=np.float64)
    ours = c[r, cc].sum(dtype=np.float64)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind,count,shape', _CASES)
def test_vmapped_matches_scipy_optimum(kind, count, shape):
  rng = np.random.default_rng(zlib.crc32(f'{kind}{shape}'.encode()))
  costs = _random_costs(rng, kind, count, shape)
  rows, cols = jax.jit(jax.vmap(matching.linear_sum_assignment))(jnp.asarray(costs))
  _check_against_scipy(costs, np.asarray(rows), np.asarray(cols))


@pytest.mark.parametrize('kind', ['float', 'int', 'near_identity'])
def test_vmap_and_sequential_map_agree_with_scipy(kind):
  rng = np.random.default_rng(7)
  costs = _random_costs(rng, kind, 24, (12, 12))
  # Half of the batch needs no search at all: distinct row argmins are returned as they are.
  for c in costs[:12]:
    c[np.arange(12), rng.permutation(12)] -= 100.0
  argmins = costs.argmin(-1)
  batched = jax.jit(matching.batched_linear_sum_assignment)
  mapped = jax.jit(lambda c: jax.lax.map(matching.linear_sum_assignment, c))
  for fn in (batched, mapped):
    rows, cols = fn(jnp.asarray(costs))
    _check_against_scipy(costs, np.asarray(rows), np.asarray(cols))
    np.testing.assert_array_equal(np.asarray(cols)[:12], argmins[:12])


def test_tall_with_constant_padded_columns_like_the_matcher():
  # The matcher's cost is [Q, N] with padded target slots set to 0: constant columns, all tied.
  rng = np.random.default_rng(3)
  costs = rng.random((6, 40, 16)).astype(np.float32)
  costs[:, :, 5:] = 0.0
  costs[0] = 0.0  # every entry tied
  rows, cols = jax.jit(matching.batched_linear_sum_assignment)(jnp.asarray(costs))
  _check_against_scipy(costs, np.asarray(rows), np.asarray(cols))


@pytest.mark.parametrize('shape', [(6, 0), (0, 6), (0, 0)])
def test_empty(shape):
  rows, cols = jax.jit(matching.linear_sum_assignment)(jnp.zeros(shape))
  assert rows.shape == (0,) and cols.shape == (0,)
  assert rows.dtype == jnp.int32 and cols.dtype == jnp.int32


def test_non_finite_entries_are_avoided():
  rng = np.random.default_rng(5)
  costs = rng.random((16, 10, 10)).astype(np.float32)
  bad = rng.random(costs.shape) < 0.3
  costs_inf = np.where(bad, np.inf, costs).astype(np.float32)
  # scipy accepts +inf as "forbidden" when a finite assignment exists; ours must find the same
  # optimum.
  costs_nan = np.where(bad, np.nan, costs).astype(np.float32)
  costs_neg = np.where(bad, -np.inf, costs).astype(np.float32)
  fn = jax.jit(jax.vmap(matching.linear_sum_assignment))
  for variant in (costs_inf, costs_nan, costs_neg):
    rows, cols = (np.asarray(a) for a in fn(jnp.asarray(variant)))
    for c, r, cc in zip(costs_inf, rows, cols):
      sr, sc = scipy.optimize.linear_sum_assignment(c)
      np.testing.assert_allclose(c[r, cc].sum(), c[sr, sc].sum(), rtol=1e-5)
  # All entries non-finite: still a valid permutation, no crash.
  rows, cols = matching.linear_sum_assignment(jnp.full((4, 4), jnp.nan))
  assert sorted(np.asarray(cols).tolist()) == [0, 1, 2, 3]


def test_inside_scan_like_the_tracker():
  rng = np.random.default_rng(11)
  costs = _random_costs(rng, 'near_identity', 6, (16, 16))

  def step(carry, c):
    rows, cols = matching.linear_sum_assignment(c)
    return carry + c[rows, cols].sum(), cols

  total, _ = jax.jit(lambda cs: jax.lax.scan(step, 0.0, cs))(jnp.asarray(costs))
  ref = sum(c[scipy.optimize.linear_sum_assignment(c)].sum() for c in costs)
  np.testing.assert_allclose(float(total), ref, rtol=1e-5)

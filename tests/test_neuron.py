"""Property tests of the core against the paper's equations and theorems.

Oracles are independent: a NumPy re-derivation of the IF recurrence, and the
closed forms of eq. 5, 7, 8 evaluated in NumPy float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cos_jax

# A few shapes/lengths only: each new shape is a new XLA compile.
STEPS = st.sampled_from([1, 2, 4, 8])
SHAPES = st.sampled_from([(64,), (8, 16), (2, 3, 5)])
THRESHOLDS = st.floats(0.25, 10.0)
SEEDS = st.integers(0, 2**31 - 1)
PROPERTY = settings(max_examples=40, deadline=None)
# Jitted once per shape/dtype; eager calls would re-trace the scan every time.
if_neuron = jax.jit(cos_jax.if_neuron)


def random_currents(seed, steps, shape, threshold, dtype=np.float32):
  """Currents mixing negative, sub-threshold and supra-threshold values."""
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.2, 1.5)
  x = rng.normal(0.3, scale, (steps,) + tuple(shape)) * threshold
  return x.astype(dtype)


def if_oracle(currents, threshold, v0):
  """Plain NumPy IF recurrence (eq. 2-4), step by step, float64."""
  currents = np.asarray(currents, np.float64)
  v = np.broadcast_to(np.asarray(v0, np.float64), currents.shape[1:]).copy()
  spikes = np.zeros_like(currents)
  for t, current in enumerate(currents):
    u = v + current
    spikes[t] = u >= threshold
    v = u - spikes[t] * threshold
  return spikes, v


def qcfs_oracle(z, threshold, levels):
  return threshold / levels * np.clip(
      np.floor(np.asarray(z, np.float64) * levels / threshold + 0.5), 0, levels)


# ---------------------------------------------------------------- QCFS (eq. 7)

@PROPERTY
@given(seed=SEEDS, threshold=THRESHOLDS, levels=st.sampled_from([1, 2, 4, 8, 16]))
def test_qcfs_on_grid_clipped_and_matches_formula(seed, threshold, levels):
  x = np.random.default_rng(seed).normal(0, threshold, (256,)).astype(np.float32)
  out = np.asarray(cos_jax.qcfs(jnp.asarray(x), threshold, levels))
  k = out * levels / threshold
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)
  assert out.min() >= 0 and out.max() <= threshold * (1 + 1e-6)
  np.testing.assert_allclose(out, qcfs_oracle(x, threshold, levels),
                             rtol=1e-5, atol=1e-5 * threshold)


def test_qcfs_straight_through_gradients():
  threshold, levels = 2.0, 4
  # Away from rounding/clipping boundaries: below 0, inside, above λ.
  x = jnp.array([-3.0, -0.1, 0.3, 0.9, 1.37, 1.6, 5.0])
  grad_x = jax.grad(lambda x: cos_jax.qcfs(x, threshold, levels).sum())(x)
  inside = (x * levels / threshold + 0.5 >= 0) & (
      x * levels / threshold + 0.5 < levels + 1)
  np.testing.assert_allclose(grad_x, np.where(inside, 1.0, 0.0))
  # d/dλ of λ/L·(s + c), s = xL/λ + 1/2, c = stop_grad(floor(s) - s):
  # (out - x)/λ inside the clip range, 1 above it, 0 below it.
  out = cos_jax.qcfs(x, threshold, levels)
  grad_t = jax.vmap(jax.grad(lambda t, xi: cos_jax.qcfs(xi, t, levels)),
                    (None, 0))(jnp.float32(threshold), x)
  s = x * levels / threshold + 0.5
  expected = np.where(s >= levels + 1, 1.0,
                      np.where(s < 0, 0.0, (out - x) / threshold))
  np.testing.assert_allclose(grad_t, expected, atol=1e-6)


def test_qcfs_rejects_bad_levels():
  with pytest.raises(ValueError, match='levels'):
    cos_jax.qcfs(jnp.ones(3), 1.0, 0)


@PROPERTY
@given(seed=SEEDS, threshold=THRESHOLDS, levels=st.sampled_from([1, 2, 4, 8]))
def test_if_rate_over_L_steps_from_half_equals_qcfs(seed, threshold, levels):
  """The QCFS design claim: constant current z, T = L steps from θ/2."""
  z = np.random.default_rng(seed).uniform(
      -threshold, 1.5 * threshold, (512,))
  # Stay off the rounding boundaries of floor(zL/θ + 1/2).
  frac = (z * levels / threshold + 0.5) % 1.0
  z = z[(frac > 1e-3) & (frac < 1 - 1e-3)]
  with jax.enable_x64(True):
    currents = jnp.broadcast_to(jnp.asarray(z), (levels,) + z.shape)
    result = if_neuron(currents, threshold, threshold / 2)
    rate = np.asarray(result.spikes.sum(0)) * threshold / levels
  np.testing.assert_allclose(rate, qcfs_oracle(z, threshold, levels),
                             atol=1e-9)


# ------------------------------------------------------------ IF (eq. 2-5)

@PROPERTY
@given(seed=SEEDS, steps=STEPS, shape=SHAPES, threshold=THRESHOLDS,
       per_neuron_v0=st.booleans())
def test_if_neuron_matches_numpy_oracle_spike_for_spike(
    seed, steps, shape, threshold, per_neuron_v0):
  currents = random_currents(seed, steps, shape, threshold, np.float64)
  rng = np.random.default_rng(seed + 1)
  v0 = (rng.uniform(-threshold, 2 * threshold, shape) if per_neuron_v0
        else threshold / 2)
  with jax.enable_x64(True):
    result = jax.jit(cos_jax.if_neuron)(jnp.asarray(currents), threshold,
                                        jnp.asarray(v0))
    spikes, v = np.asarray(result.spikes), np.asarray(result.v)
    assert result.spikes.dtype == jnp.float64
  want_spikes, want_v = if_oracle(currents, threshold, v0)
  np.testing.assert_array_equal(spikes, want_spikes)
  np.testing.assert_allclose(v, want_v, rtol=1e-12, atol=1e-12 * threshold)
  # Running statistics against the oracle's trace.
  trace = np.asarray(v0) + np.cumsum(currents, 0) - threshold * np.cumsum(
      want_spikes, 0)
  fired = want_spikes == 1
  np.testing.assert_array_equal(result.spike_count, want_spikes.sum(0))
  np.testing.assert_allclose(
      result.min_fired_v, np.where(fired, trace, np.inf).min(0), rtol=1e-12,
      atol=1e-12)
  np.testing.assert_allclose(
      result.max_silent_v, np.where(fired, -np.inf, trace).max(0), rtol=1e-12,
      atol=1e-12)


def test_spike_train_resumed_from_its_final_v_continues_the_same_run():
  """Two halves chained through return_final_v == one run (the oracle's)."""
  currents = random_currents(7, 11, (3, 4), 1.5, np.float64)
  with jax.enable_x64(True):
    first, v_mid = cos_jax.spike_train(jnp.asarray(currents[:5]), 1.5,
                                       return_final_v=True)
    second, v_end = cos_jax.spike_train(jnp.asarray(currents[5:]), 1.5, v_mid,
                                        return_final_v=True)
  want_spikes, want_v = if_oracle(currents, 1.5, 0.75)
  np.testing.assert_array_equal(np.concatenate([first, second]), want_spikes)
  np.testing.assert_allclose(v_end, want_v, rtol=1e-12, atol=1e-12)


@PROPERTY
@given(seed=SEEDS, steps=STEPS, shape=SHAPES, threshold=THRESHOLDS,
       dtype=st.sampled_from(['float32', 'float64']))
def test_conservation_eq5(seed, steps, shape, threshold, dtype):
  currents = random_currents(seed, steps, shape, threshold, dtype)
  v0 = np.random.default_rng(seed).uniform(0, threshold, shape).astype(dtype)
  with jax.enable_x64(dtype == 'float64'):
    result = if_neuron(jnp.asarray(currents), threshold,
                               jnp.asarray(v0))
    assert result.spikes.dtype == jnp.dtype(dtype)
    assert set(np.unique(np.asarray(result.spikes))) <= {0.0, 1.0}
    lhs = threshold * np.asarray(result.spikes, np.float64).sum(0)
    rhs = v0 + currents.astype(np.float64).sum(0) - np.asarray(result.v)
  tol = (1e-4 if dtype == 'float32' else 1e-11) * threshold * (steps + 1)
  np.testing.assert_allclose(lhs, rhs, atol=tol)


def test_probe_equals_if_statistics_and_default_v0_is_half():
  currents = jnp.asarray(random_currents(3, 8, (4, 5), 2.0))
  stats = cos_jax.probe(currents, 2.0)
  result = if_neuron(currents, 2.0, 1.0)
  for a, b in zip(stats, result.stats):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------ Theorems 1, 2 and 3

def _ann_and_snn(currents, threshold):
  """ψ for L = T and matching inputs: ANN pre-activation = mean current."""
  steps = currents.shape[0]
  a = qcfs_oracle(currents.sum(0) / steps, threshold, steps)
  spikes, v = if_oracle(currents, threshold, threshold / 2)
  count = spikes.sum(0)
  psi = np.asarray(cos_jax.offset_spikes(jnp.asarray(a), jnp.asarray(count),
                                         threshold, steps))
  return a, count, v, np.round(psi)


@PROPERTY
@given(seed=SEEDS, steps=STEPS, threshold=THRESHOLDS)
def test_theorem1_residual_sign_gives_offset_sign(seed, steps, threshold):
  with jax.enable_x64(True):
    currents = random_currents(seed, steps, (2000,), threshold, np.float64)
    _, count, v, psi = _ann_and_snn(currents, threshold)
  phi = count * threshold / steps
  case_i = (phi > 0) & (v < 0)
  case_ii = (phi < threshold) & (v >= threshold)
  assert np.all(psi[case_i] < 0)
  assert np.all(psi[case_ii] > 0)
  assert case_i.any() or case_ii.any() or steps == 1


@PROPERTY
@given(seed=SEEDS, steps=STEPS, threshold=THRESHOLDS,
       epsilon=st.floats(1e-6, 1 - 1e-6))
def test_theorem2_shift_changes_count_by_exactly_one(
    seed, steps, threshold, epsilon):
  with jax.enable_x64(True):
    currents = jnp.asarray(
        random_currents(seed, steps, (2000,), threshold, np.float64))
    v0 = jnp.asarray(np.random.default_rng(seed).uniform(
        -threshold, 2 * threshold, (2000,)))
    before = if_neuron(currents, threshold, v0)
    eps = epsilon * threshold
    down = v0 - jnp.maximum(threshold, before.min_fired_v + eps)
    up = v0 + jnp.maximum(threshold, threshold + eps - before.max_silent_v)
    after_down = if_neuron(currents, threshold, down).spike_count
    after_up = if_neuron(currents, threshold, up).spike_count
  count = np.asarray(before.spike_count)
  has_spike, has_silent = count > 0, count < steps
  np.testing.assert_array_equal(np.asarray(after_down)[has_spike],
                                count[has_spike] - 1)
  np.testing.assert_array_equal(np.asarray(after_up)[has_silent],
                                count[has_silent] + 1)


@PROPERTY
@given(seed=SEEDS, steps=STEPS, threshold=THRESHOLDS)
def test_theorem3_residual_gives_offset_value(seed, steps, threshold):
  with jax.enable_x64(True):
    currents = random_currents(seed, steps, (2000,), threshold, np.float64)
    _, _, v, psi = _ann_and_snn(currents, threshold)
  total = currents.sum(0)
  inside = (total >= -threshold / 2) & (total < threshold * steps + threshold / 2)
  np.testing.assert_array_equal(psi[inside], np.floor(v / threshold)[inside])
  assert inside.sum() > 200  # the property was checked on real data


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('steps', [4, 8])
@pytest.mark.parametrize('iterations', [1, 2, 4])
def test_iterative_property_k_iterations_remove_offsets_up_to_k(
    dtype, steps, iterations):
  """ρ = T = L, same input: k rounds zero every |ψ| ≤ k and grow none."""
  threshold, neurons = 1.5, 12_000
  rng = np.random.default_rng(steps * 10 + iterations)
  # Noise plus a per-neuron rising or falling ramp: early bursts make a
  # neuron fire too much, late ones too little, so |ψ| reaches 3-5.
  ramp = np.linspace(-1, 1, steps)[:, None] * rng.uniform(-2.5, 2.5, (1, neurons))
  currents = (rng.uniform(-0.5, 1.5, (steps, neurons)) + ramp) * threshold
  currents = currents.astype(dtype)
  a = qcfs_oracle(currents.astype(np.float64).sum(0) / steps, threshold, steps)
  with jax.enable_x64(dtype == 'float64'):
    currents = jnp.asarray(currents)
    before = if_neuron(currents, threshold).spike_count
    v0 = jax.jit(cos_jax.calibrate_layer, static_argnames='iterations')(
        currents, threshold, iterations=iterations)
    after = if_neuron(currents, threshold, v0).spike_count
    psi_before = np.round(a * steps / threshold - np.asarray(before))
    psi_after = np.round(a * steps / threshold - np.asarray(after))
  assert np.sum(np.abs(psi_before) >= min(iterations, 3)) > 30, 'data too easy'
  fixed = np.abs(psi_before) <= iterations
  assert np.all(psi_after[fixed] == 0), (
      f'{np.sum(psi_after[fixed] != 0)} of {fixed.sum()} not fixed')
  assert np.all(np.abs(psi_after) <= np.abs(psi_before))
  # Neurons beyond reach move k spikes closer, in the right direction.
  far = ~fixed
  np.testing.assert_array_equal(
      np.abs(psi_after[far]), np.abs(psi_before[far]) - iterations)


def test_calibrate_layer_shape_dtype_jit_and_args():
  currents = jnp.asarray(random_currents(0, 4, (3, 7), 1.0))
  v0 = jax.jit(cos_jax.calibrate_layer)(currents, 1.0)
  assert v0.shape == (3, 7) and v0.dtype == jnp.float32
  # iterations=0 is the identity; per-neuron thresholds broadcast.
  same = cos_jax.calibrate_layer(currents, 1.0, 0.3, iterations=0)
  np.testing.assert_array_equal(same, jnp.full((3, 7), 0.3))
  per_neuron = cos_jax.calibrate_layer(currents, jnp.full((7,), 1.0))
  np.testing.assert_array_equal(per_neuron, v0)
  with pytest.raises(ValueError, match='epsilon'):
    cos_jax.calibrate_layer(currents, 1.0, epsilon=1.5)


def test_shift_sign_uses_accumulated_shift():
  """After one down-shift, r = v(ρ) - δ (not v(ρ)) decides the next step."""
  threshold = 1.0
  # Constant 0.3 for 4 steps: ANN wants floor(1.2 + .5) = 1 spike; from θ/2
  # the IF neuron fires 1 spike (0.5 + 1.2 = 1.7 -> v(4) = 0.7): ψ = 0.
  currents = jnp.full((4, 1), 0.3)
  v0 = cos_jax.calibrate_layer(currents, threshold, iterations=3)
  np.testing.assert_allclose(v0, 0.5)
  # Start instead from a v0 that is one threshold too high: 2 spikes, ψ = -1,
  # v(4) = 0.7 ≥ 0 would say "fine" without the δ correction.
  shifted = cos_jax.calibrate_layer(currents, threshold, jnp.full((1,), 1.5))
  count = if_neuron(currents, threshold, shifted).spike_count
  np.testing.assert_array_equal(count, [1.0])


def test_ratio_and_mse():
  ratio, mse = cos_jax.ratio_and_mse(jnp.array([0.0, 1.0, -2.0, 0.0]))
  assert float(ratio) == 0.5 and float(mse) == pytest.approx(5 / 4)


@PROPERTY
@given(seed=SEEDS, steps=STEPS, threshold=THRESHOLDS)
def test_saturate_rule_fires_every_later_step(seed, steps, threshold):
  """saturate=True gives v(0) = +inf exactly to the neurons that fired at
  every probe step and ended with v(ρ) ≥ θ (NumPy oracle, from θ/2); they
  then fire at every later step whatever the input; every other neuron gets
  what the default rule gives."""
  rng = np.random.default_rng(seed)
  currents = (rng.uniform(0.3, 2.5, (steps, 512)) * threshold).astype(
      np.float32)
  keep = np.asarray(cos_jax.calibrate_layer(currents, threshold))
  fire = np.asarray(cos_jax.calibrate_layer(currents, threshold,
                                            saturate=True))
  spikes, v_end = if_oracle(currents, threshold, threshold / 2)
  saturated = (spikes.sum(0) == steps) & (v_end >= threshold)
  assert saturated.mean() > 0.05 and (~saturated).mean() > 0.05
  assert np.all(np.isposinf(fire[saturated]))
  np.testing.assert_array_equal(fire[~saturated], keep[~saturated])
  later = (rng.normal(-1.0, 1.0, (6, 512)) * threshold).astype(np.float32)
  train = np.asarray(if_neuron(jnp.asarray(later), threshold, fire).spikes)
  assert np.all(train[:, saturated] == 1)
  assert not np.all(train[:, ~saturated] == 1)

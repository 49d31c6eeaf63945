"""QCFS activation, IF neurons and the offset-spike calibration (COS), as pure functions.

Units and conventions (see docs/semantics.md for the full statement):

* ``threshold`` is a layer's firing threshold θ, equal to the QCFS clip value λ.
  It may be a scalar or anything that broadcasts against one time-step of currents.
* ``currents`` have a leading time axis: ``currents[t - 1]`` is I(t), the input
  current at step t = 1..T. The remaining axes are arbitrary (batch, neurons...).
* ``v`` is the membrane potential *after* the reset of a step; ``v0`` is v(0).

Every function here is pure, jit-able, shape-polymorphic and dtype-preserving
(float32, or float64 under ``jax_enable_x64``). Time is handled by ``lax.scan``
whose carry holds only per-neuron running values, so memory is O(neurons) beyond
the spike train itself — no ``[T, ...]`` potential trace is ever materialised.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Default Theorem-2 margin ε, as a fraction of θ (the reference code's 0.001·θ).
DEFAULT_EPSILON = 1e-3
# Longest time axis whose scan is fully unrolled (see `_if_scan`).
MAX_FULL_UNROLL = 16


def qcfs(x: Array, threshold: Array, levels: int) -> Array:
  """Quantization-clip-floor-shift activation (COS eq. 7).

  ``a = λ/L · clip(floor(x·L/λ + 1/2), 0, L)`` with λ = ``threshold``.

  The floor uses a straight-through estimator (identity gradient) so the
  network trains; the clip passes gradient 1 on [0, L] and 0 outside. Gradients reach
  ``threshold`` through ordinary autodiff of both places it appears.

  Args:
    x: pre-activations, any shape, float dtype.
    threshold: λ (> 0), scalar or broadcastable to ``x``.
    levels: L, the number of quantisation steps (a positive Python int).

  Returns:
    Array of ``x``'s shape whose values lie on the grid {kλ/L : k = 0..L}.

  Example:
    >>> cos_jax.qcfs(jnp.array([-1., 0.9, 3.1, 99.]), 8.0, 4)
    Array([0., 0., 4., 8.], dtype=float32)
  """
  if isinstance(levels, int) and levels <= 0:
    raise ValueError(f'levels must be a positive integer, got {levels}')
  check_threshold(threshold)
  threshold = jnp.asarray(threshold, x.dtype)
  scaled = x * levels / threshold + 0.5
  # Straight-through floor: forward floor(scaled), backward identity.
  floored = scaled + jax.lax.stop_gradient(jnp.floor(scaled) - scaled)
  # Clip with gradient 1 on the closed range [0, L], like torch.clamp (jnp.clip
  # would halve it on the end buckets, where the floored value sits exactly on
  # the bound).
  clipped = jnp.where(floored < 0, 0.0, jnp.where(floored > levels, levels,
                                                  floored))
  return clipped.astype(x.dtype) * threshold / levels


class ProbeStats(NamedTuple):
  """Per-neuron running statistics of an IF run (all shaped like one time-step).

  Attributes:
    v: final potential v(T) after the last reset.
    spike_count: number of spikes Σ s(t) (same float dtype as the currents).
    min_fired_v: min{v(t) | s(t) = 1}; +inf where the neuron never fired.
    max_silent_v: max{v(t) | s(t) = 0}; -inf where the neuron fired at every step.

  Example:
    >>> stats = cos_jax.probe(jnp.full((4, 1), 0.75), 1.0)   # from v(0) = 0.5
    >>> stats.spike_count, stats.v       # 1.25 1.0 0.75 1.5 fire at 1, 2, 4
    (Array([3.], dtype=float32), Array([0.5], dtype=float32))
    >>> stats.min_fired_v, stats.max_silent_v
    (Array([0.], dtype=float32), Array([0.75], dtype=float32))
  """
  v: Array
  spike_count: Array
  min_fired_v: Array
  max_silent_v: Array


class IFResult(NamedTuple):
  """Output of :func:`if_neuron`.

  Attributes:
    spikes: ``[T, ...]`` spike train in {0, 1} (dtype of the currents).
    v: final potential v(T).
    spike_count, min_fired_v, max_silent_v: as in :class:`ProbeStats`.

  Example:
    >>> result = cos_jax.if_neuron(jnp.full((4, 1), 0.75), 1.0)
    >>> result.spikes[:, 0]
    Array([1., 1., 0., 1.], dtype=float32)
    >>> result.stats == cos_jax.probe(jnp.full((4, 1), 0.75), 1.0)
    True
  """
  spikes: Array
  v: Array
  spike_count: Array
  min_fired_v: Array
  max_silent_v: Array

  @property
  def stats(self) -> ProbeStats:
    return ProbeStats(self.v, self.spike_count, self.min_fired_v,
                      self.max_silent_v)


def check_threshold(threshold) -> None:
  """Raises ValueError unless a concrete θ is finite and > 0 everywhere.

  Traced values (inside ``jit``) cannot be inspected and pass unchecked.
  """
  if isinstance(threshold, jax.core.Tracer):
    return
  value = np.asarray(threshold)
  if value.size and not np.all(np.isfinite(value) & (value > 0)):
    raise ValueError(f'threshold θ must be finite and > 0 (an IF neuron '
                     f'cannot fire against θ <= 0), got {value.min()}')


_RULE = threading.local()


@contextlib.contextmanager
def firing_rule(strict: bool):
  """Within it, IF neurons called without ``strict`` fire by that rule.

  ``strict=True`` is the rule of Bu et al.'s Inference-scale ANN-SNN code
  (``s = [u > θ]``); False is this package's (``s = [u ≥ θ]``). The rule is
  read while JAX traces, so a spiking layer sets it once around everything
  it computes (its v(0) method's probes included) and is cached under jit by
  its own static attribute (:class:`cos_jax.Activation`'s ``strict``).
  """
  before = getattr(_RULE, 'strict', False)
  _RULE.strict = bool(strict)
  try:
    yield
  finally:
    _RULE.strict = before


def _strict(strict: bool | None) -> bool:
  return getattr(_RULE, 'strict', False) if strict is None else bool(strict)


def half_threshold(threshold: Array, like: Array) -> Array:
  """The QCFS-matched initial potential θ/2, broadcast to ``like``'s shape."""
  return jnp.broadcast_to(jnp.asarray(threshold, like.dtype) / 2, like.shape)


def _if_scan(currents: Array, threshold: Array, v0: Array | None,
             keep_spikes: bool, keep_stats: bool = True,
             strict: bool | None = None):
  if currents.ndim == 0 or currents.shape[0] == 0:
    raise ValueError(f'currents need a leading time axis of at least one '
                     f'step, got shape {currents.shape}')
  check_threshold(threshold)
  threshold = jnp.asarray(threshold, currents.dtype)
  strict = _strict(strict)
  step_shape = currents.shape[1:]
  if v0 is None:
    v0 = half_threshold(threshold, currents[0])
  v0 = jnp.broadcast_to(jnp.asarray(v0, currents.dtype), step_shape)
  inf = jnp.asarray(jnp.inf, currents.dtype)
  init = ProbeStats(
      v=v0,
      spike_count=jnp.zeros(step_shape, currents.dtype),
      min_fired_v=jnp.full(step_shape, inf),
      max_silent_v=jnp.full(step_shape, -inf))

  def step(carry: ProbeStats, current: Array):
    u = carry.v + current                      # charge (eq. 2 before reset)
    fired = (u > threshold) if strict else (u >= threshold)  # fire (eq. 4)
    spike = fired.astype(currents.dtype)
    v = u - spike * threshold                  # reset by subtraction
    if not keep_stats:
      return carry._replace(v=v), spike
    carry = ProbeStats(
        v=v,
        spike_count=carry.spike_count + spike,
        min_fired_v=jnp.where(fired, jnp.minimum(carry.min_fired_v, v),
                              carry.min_fired_v),
        max_silent_v=jnp.where(fired, carry.max_silent_v,
                               jnp.maximum(carry.max_silent_v, v)))
    return carry, (spike if keep_spikes else None)

  # Unrolling (T is static and small) lets XLA fuse the recurrence into one
  # pass over the currents instead of T separate slice/update loops. Long runs
  # unroll partially to keep compile time bounded.
  unroll = True if currents.shape[0] <= MAX_FULL_UNROLL else 8
  return jax.lax.scan(step, init, currents, unroll=unroll)


def if_neuron(currents: Array, threshold: Array,
              v0: Array | None = None, *,
              strict: bool | None = None) -> IFResult:
  """Integrate-and-fire neurons with reset by subtraction (COS eq. 2-4).

  ``u(t) = v(t-1) + I(t)``, ``s(t) = [u(t) ≥ θ]``, ``v(t) = u(t) - s(t)·θ``.
  The value a layer passes on is ``s(t)·θ``.

  Args:
    currents: ``[T, ...]`` input currents I(1..T).
    threshold: θ, scalar or broadcastable to ``currents[0]``.
    v0: initial potential v(0), broadcastable to ``currents[0]``;
      ``None`` means θ/2 (the QCFS-matched default).
    strict: fire on ``u > θ`` (Bu et al.'s Inference-scale code) instead of
      ``u ≥ θ``; ``None`` takes the enclosing :func:`firing_rule` (default
      ``u ≥ θ``).

  Returns:
    :class:`IFResult` with ``spikes`` ``[T, ...]`` and per-neuron running
    statistics (final potential, spike count, min potential over spike steps,
    max potential over silent steps).

  Non-finite currents are not an error here (they may be traced): a NaN
  current never fires (``NaN ≥ θ`` is false) and leaves v NaN for the rest of
  the run; +inf fires and leaves v = inf - θ = inf, so the neuron fires at
  every later step; -inf silences it. Check inputs with ``jnp.isfinite``
  (``convert.py`` refuses non-finite images).

  Example:
    >>> r = cos_jax.if_neuron(jnp.full((4, 3), 0.75), 1.0)   # T=4, 3 neurons
    >>> r.spikes.shape
    (4, 3)
    >>> r.spike_count, r.v          # 0.5 + 4·0.75 = 3.5: 3 spikes, v(4) = 0.5
    (Array([3., 3., 3.], dtype=float32), Array([0.5, 0.5, 0.5], dtype=float32))
  """
  stats, spikes = _if_scan(currents, threshold, v0, keep_spikes=True,
                           strict=strict)
  return IFResult(spikes, *stats)


def spike_train(currents: Array, threshold: Array,
                v0: Array | None = None, *, return_final_v: bool = False,
                strict: bool | None = None):
  """Just the ``[T, ...]`` spikes of :func:`if_neuron` (no statistics kept).

  With ``return_final_v`` also returns v(T), so a run can resume from it.
  ``strict`` as in :func:`if_neuron`.

  Example:
    >>> I = jnp.full((4, 1), 0.75)
    >>> cos_jax.spike_train(I, 1.0)[:, 0]
    Array([1., 1., 0., 1.], dtype=float32)
    >>> first, v2 = cos_jax.spike_train(I[:2], 1.0, return_final_v=True)
    >>> cos_jax.spike_train(I[2:], 1.0, v2)[:, 0]      # resumes at step 3
    Array([0., 1.], dtype=float32)
  """
  carry, spikes = _if_scan(currents, threshold, v0, keep_spikes=True,
                           keep_stats=False, strict=strict)
  return (spikes, carry.v) if return_final_v else spikes


def probe(currents: Array, threshold: Array,
          v0: Array | None = None, *,
          strict: bool | None = None) -> ProbeStats:
  """Stage 1 of COS: run IF neurons over ``currents`` and keep only statistics.

  Same dynamics as :func:`if_neuron` but the spike train is not returned, so
  memory is O(neurons) regardless of the number of probe steps ρ.

  Args:
    currents: ``[ρ, ...]`` probe currents.
    threshold: θ.
    v0: initial potential (``None`` = θ/2).
    strict: the firing rule, as in :func:`if_neuron`.

  Returns:
    :class:`ProbeStats`, each field shaped like ``currents[0]``.

  Example:
    >>> stats = cos_jax.probe(jnp.full((8, 2, 3), 0.75), 1.0)   # ρ = 8
    >>> stats.spike_count.shape
    (2, 3)
  """
  stats, _ = _if_scan(currents, threshold, v0, keep_spikes=False,
                      strict=strict)
  return stats


def shift_v0(v0: Array, stats: ProbeStats, threshold: Array, probe_steps: int,
             epsilon: float = DEFAULT_EPSILON, *,
             saturate: bool = False) -> Array:
  """One COS step: decide the sign of the offset spike and shift v(0) (Thms 1-3).

  Let δ = v0 - θ/2 be the shift accumulated so far and r = v(ρ) - δ the residual
  the neuron would have had from θ/2 (conservation, eq. 5). By Theorem 3, the
  offset spike ψ = k when r/θ ∈ [k, k+1). Hence:

  * fired at least once and r < 0        -> too many spikes: shift down by
    ``max(θ, min{v(t)|s(t)=1} + ε)`` (Theorem 2(i): exactly one spike fewer);
  * silent at least once and r ≥ θ       -> too few spikes: shift up by
    ``max(θ, θ + ε - max{v(t)|s(t)=0})`` (Theorem 2(ii): exactly one more);
  * otherwise leave v0 unchanged.

  A neuron that fired at every probe step and still has r ≥ θ wants more
  spikes than one per step can give; no up-shift of Theorem 2 applies (it has
  no silent step). With ``saturate`` it gets v(0) = +inf: it then fires at
  every later step whatever its input (the PyTorch reference reaches nearly
  the same by a -1000 placeholder for the missing silent potential, i.e. an
  up-shift of about 1000θ). Without, it is left as it is.

  Args:
    v0: the potential the probe started from.
    stats: :class:`ProbeStats` of a probe from ``v0``.
    threshold: θ.
    probe_steps: ρ, the number of probe steps (to know "fired at every
      step").
    epsilon: ε as a fraction of θ, in (0, 1).
    saturate: the rule for neurons that fired at every probe step (above).

  Returns:
    The shifted initial potential, shaped like ``v0``.

  Example:
    >>> I = jnp.full((4, 1), 0.25)     # the ANN asks for 1 spike in 4 steps
    >>> v0 = jnp.ones(1)               # started too high:
    >>> stats = cos_jax.probe(I, 1.0, v0)
    >>> stats.spike_count              # one spike too many
    Array([2.], dtype=float32)
    >>> cos_jax.shift_v0(v0, stats, 1.0, probe_steps=4)   # down by θ
    Array([0.], dtype=float32)
  """
  threshold = jnp.asarray(threshold, v0.dtype)
  eps = epsilon * threshold
  accumulated = v0 - threshold / 2
  residual = stats.v - accumulated
  too_many = (stats.spike_count > 0) & (residual < 0)
  too_few = (stats.spike_count < probe_steps) & (residual >= threshold)
  # The inf sentinels only ever sit in the branch `where` discards.
  down = jnp.maximum(threshold, stats.min_fired_v + eps)
  up = jnp.maximum(threshold, threshold + eps - stats.max_silent_v)
  shifted = jnp.where(too_many, v0 - down, jnp.where(too_few, v0 + up, v0))
  if saturate:
    saturated = (stats.spike_count >= probe_steps) & (residual >= threshold)
    shifted = jnp.where(saturated, jnp.inf, shifted)
  return shifted


def _check_epsilon(epsilon: float) -> None:
  if not 0.0 < float(epsilon) < 1.0:
    raise ValueError(
        f'epsilon is a fraction of the threshold and must lie in (0, 1); '
        f'got {epsilon}')


def calibrate_layer(currents: Array, threshold: Array, v0: Array | None = None,
                    *, iterations: int = 1, epsilon: float = DEFAULT_EPSILON,
                    saturate: bool = False) -> Array:
  """Calibrated offset spikes for one layer: probe, judge the sign, shift v(0).

  Repeats probe -> :func:`shift_v0` ``iterations`` times on the same ρ input
  steps. Under the theorems' conditions (ρ = T = L, inputs matching the ANN's)
  k iterations remove every offset spike with |ψ| ≤ k.

  Args:
    currents: ``[ρ, ...]`` the layer's first ρ input currents.
    threshold: θ.
    v0: starting potential (``None`` = θ/2), broadcastable to ``currents[0]``.
    iterations: how many probe/shift rounds (≥ 1; 0 returns ``v0``).
    epsilon: ε as a fraction of θ, in (0, 1).
    saturate: v(0) = +inf for neurons that fired at every probe step and
      still want more (see :func:`shift_v0`); False (the default here)
      leaves them. The network-level :func:`cos_jax.calibrate` and
      :func:`cos_jax.evaluate_snn` default to ``saturated='fire'``, which is
      ``saturate=True``; pass ``saturate=True`` to match them.

  Returns:
    The calibrated v(0), shaped like ``currents[0]``.

  Example:
    >>> I = jnp.full((4, 1), 0.25)     # the ANN asks for 1 spike in 4 steps
    >>> v0 = cos_jax.calibrate_layer(I, 1.0, jnp.ones(1))   # from 2 spikes
    >>> v0, cos_jax.if_neuron(I, 1.0, v0).spike_count
    (Array([0.], dtype=float32), Array([1.], dtype=float32))
    >>> cos_jax.calibrate_layer(jnp.full((4, 1), 2.), 1.0, saturate=True)
    Array([inf], dtype=float32)
  """
  _check_epsilon(epsilon)
  if iterations < 0:
    raise ValueError(f'iterations must be >= 0, got {iterations}')
  probe_steps = currents.shape[0]
  if v0 is None:
    v0 = half_threshold(threshold, currents[0])
  v0 = jnp.broadcast_to(jnp.asarray(v0, currents.dtype), currents.shape[1:])

  one_round = lambda _, v: shift_v0(v, probe(currents, threshold, v),
                                    threshold, probe_steps, epsilon,
                                    saturate=saturate)
  return repeat(one_round, iterations, v0)


def repeat(body, rounds: int, value):
  """``rounds`` applications of ``body(i, value)``: inline for one round (XLA
  then fuses it with its neighbours), else a loop, so that compile time and
  memory do not grow with the number of rounds."""
  if rounds == 1:
    return body(0, value)
  return jax.lax.fori_loop(0, rounds, body, value)


def offset_spikes(ann_output: Array, spike_count: Array, threshold: Array,
                  time_steps: int) -> Array:
  """Offset spike ψ = a·T/θ - Σ s (COS eq. 8): desired minus actual count.

  Args:
    ann_output: the ANN (QCFS) activation a of the same neurons.
    spike_count: the SNN's spike count over ``steps`` time-steps.
    threshold: θ (= λ).
    time_steps: T, the number of steps the count covers.

  Returns:
    ψ per neuron (an integer-valued float when T is a multiple of L).

  Example:
    >>> a = cos_jax.qcfs(jnp.array([0.25, 0.5]), 1.0, 4)   # ANN: 1 and 2 of 4
    >>> cos_jax.offset_spikes(a, jnp.array([1., 1.]), 1.0, 4)
    Array([0., 1.], dtype=float32)
  """
  threshold = jnp.asarray(threshold, ann_output.dtype)
  return ann_output * time_steps / threshold - spike_count


def ratio_and_mse(psi: Array, tolerance: float = 1e-3) -> tuple[Array, Array]:
  """Ratio and MSE of COS §5.4 for offset spikes ``psi``.

  Ratio is the fraction of neurons whose SNN output equals the ANN's (|ψ| below
  ``tolerance``, which absorbs float rounding of a·T/θ); MSE is mean(ψ²).

  Example:
    >>> ratio, mse = cos_jax.ratio_and_mse(jnp.array([0., 1., 0., -1.]))
    >>> float(ratio), float(mse)
    (0.5, 0.5)
  """
  psi = jnp.asarray(psi)
  return jnp.mean(jnp.abs(psi) < tolerance), jnp.mean(psi * psi)

"""The paper's analyses per IF layer: offset-spike histograms, Ratio, MSE, rates.

For each IF layer and each of its neurons we compare the SNN's spike count over
T steps with the ANN's desired count ``a·T/θ`` (eq. 8), two ways:

* ``plain``: ``a`` is the QCFS ANN's activation on the same image (paper Fig. 1
  (a, b) and Fig. 3): errors of earlier layers propagate into later ones.
* ``constrained``: ``a = qcfs(ΣI/T)`` is what the ANN layer would output if fed
  the SNN's *actual* mean input current (Fig. 1 (c, d), Table S2 line 4): this
  isolates the error the layer adds itself.

All statistics are sums over the batch (histogram counts, numbers of exact
neurons, spikes) or per example (Σψ², summed on the host in float64), so
per-batch results add up across a dataset, to the same totals however the
batches were split over devices and processes, and :func:`finalize` turns
them into fractions.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cos_jax import checks, methods, neuron, runtime, snn
from cos_jax.activation import model_variables
from cos_jax.settings import DEFAULT_SATURATED, check_positive_int

PyTree = Any
# Histograms cover ψ in [-MAX_OFFSET, MAX_OFFSET]; larger |ψ| land on the ends.
MAX_OFFSET = 4
OFFSET_BINS = tuple(range(-MAX_OFFSET, MAX_OFFSET + 1))


def layer_name(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def _sown(intermediates: PyTree, leaf: str) -> dict[str, jax.Array]:
  """{layer name: value} for a sown leaf (sow stores a 1-tuple per call)."""
  flat = traverse_util.flatten_dict(intermediates)
  return {layer_name(path[:-1]): value[0] for path, value in flat.items()
          if path[-1] == leaf}


def _per_neuron_weights(mask: jax.Array, like: jax.Array) -> jax.Array:
  """The per-sample mask [B] broadcast to a per-neuron array [B, ...]."""
  return jnp.broadcast_to(mask.reshape((-1,) + (1,) * (like.ndim - 1)),
                          like.shape).astype(jnp.int32)


def _psi_stats(psi: jax.Array, weights: jax.Array,
               tolerance: float) -> dict[str, jax.Array]:
  bins = jnp.clip(jnp.round(psi), -MAX_OFFSET, MAX_OFFSET).astype(jnp.int32)
  histogram = jnp.zeros(len(OFFSET_BINS), jnp.int32).at[
      (bins + MAX_OFFSET).ravel()].add(weights.ravel())
  return {'histogram': histogram,
          'exact': jnp.sum((jnp.abs(psi) < tolerance) * weights),
          'squared_error': jnp.sum(weights * psi.astype(jnp.float32) ** 2,
                                   axis=tuple(range(1, psi.ndim)))}


@functools.partial(jax.jit, static_argnames=('model', 'T', 'method'))
def statistics(model, variables, images, mask, key, *, T: int,
               method: methods.Method):
  """:func:`layer_statistics` on settings already validated (no checks);
  ``method`` is bound to its settings."""
  _, ann_state = model.apply(
      model_variables(variables), images,
      train=False, mutable=['intermediates'])
  run = snn.run_method(model, variables, images, key, T=T, method=method,
                       record_steps=T)
  ann = _sown(ann_state['intermediates'], 'ann_output')
  counts = _sown(run.intermediates, 'spike_count')
  current_sums = _sown(run.intermediates, 'current_sum')
  thresholds = {layer_name(path[:-1]): value for path, value in
                traverse_util.flatten_dict(variables['params']).items()
                if path[-1] == 'threshold'}
  out = {}
  for name, count in counts.items():
    theta = thresholds[name].astype(count.dtype)
    # Desired counts a·T/θ are integers when L divides T; half a spike of
    # tolerance only absorbs float rounding of that product.
    tolerance = 0.5 if T % model.levels == 0 else 1e-3
    constrained_a = neuron.qcfs(current_sums[name] / T, theta, model.levels)
    weights = _per_neuron_weights(mask, count)
    out[name] = {
        'plain': _psi_stats(
            neuron.offset_spikes(ann[name], count, theta, T), weights,
            tolerance),
        'constrained': _psi_stats(
            neuron.offset_spikes(constrained_a, count, theta, T), weights,
            tolerance),
        # Integer sums: exact whatever the batch and device layout.
        'spikes': jnp.sum(jnp.round(count).astype(jnp.int32) * weights),
        'neurons': jnp.sum(weights),
    }
  return out, run.outputs


def layer_statistics(model: nn.Module, variables: PyTree, images: jax.Array,
                     *, T: int, init: str = 'cos', rho: int | None = None,
                     iterations: int = 1, schedule: str = 'layerwise',
                     epsilon: float = neuron.DEFAULT_EPSILON,
                     saturated: str = DEFAULT_SATURATED,
                     key: jax.Array | None = None,
                     mask: jax.Array | None = None):
  """Per-layer offset-spike statistics of one batch (sums over the batch).

  Args:
    model, variables, images: a zoo model, its variables, ``[B, H, W, C]``.
    T: the window the offset spikes are counted over (the paper uses T = L).
    init, rho, iterations, schedule, epsilon, saturated, key: as in
      :func:`cos_jax.evaluate_snn`; ``init='half'`` gives the uncalibrated
      "before" picture, ``init='cos'`` the calibrated one.
    mask: optional ``[B]`` 0/1 weights (padding samples get 0).

  Returns:
    ``(stats, outputs)``: ``stats[layer]`` has ``'plain'`` and ``'constrained'``
    dicts of ``histogram`` (counts of round(ψ) over ``OFFSET_BINS``, clipped),
    ``exact`` (neurons with ψ = 0) and ``squared_error`` (Σψ² per example,
    ``[B]``: :func:`accumulate` sums it in float64, so a total does not
    depend on how batches are split over devices or processes), plus
    ``spikes`` and ``neurons`` (for firing rates); ``outputs`` is the
    ``[T, B, C]`` SNN output of the same run.
  """
  T = check_positive_int('T', T)
  method = methods.resolve(init, rho, iterations, schedule, epsilon,
                           saturated)
  if method.corrected:
    raise ValueError(f'init={init!r} corrects from a calibration set; '
                     'layer_statistics takes the other methods')
  checks.check_inputs(variables, images, model,
                   **checks.run_bounds(T, method.calibration, None))
  if mask is None:
    mask = jnp.ones(images.shape[:1], jnp.int32)
  return statistics(model, variables, images, mask, key, T=T, method=method)


def accumulate(total: dict | None, stats: dict) -> dict:
  """Adds one batch's statistics into a running total (NumPy, on host; with
  several processes every process must call it, as it gathers the rows)."""
  stats = runtime.to_host(stats)
  for layer in stats.values():
    for kind in ('plain', 'constrained'):
      layer[kind]['squared_error'] = np.sum(layer[kind]['squared_error'],
                                            dtype=np.float64)
  if total is None:
    return stats
  return jax.tree.map(np.add, total, stats)


def finalize(total: dict, T: int) -> dict[str, dict]:
  """Turns summed statistics into per-layer Ratio, MSE, histograms and rates.

  Returns:
    ``{layer: {'ratio', 'mse', 'histogram', 'ratio_constrained',
    'mse_constrained', 'histogram_constrained', 'firing_rate'}}`` where
    histograms are ``{ψ: fraction}``, Ratio the fraction with ψ = 0, MSE the
    mean of ψ², and the firing rate the mean spikes per neuron per step.
  """
  out = {}
  for name, layer in total.items():
    n = float(layer['neurons'])
    row = {'firing_rate': float(layer['spikes']) / (n * T)}
    for kind, suffix in (('plain', ''), ('constrained', '_constrained')):
      s = layer[kind]
      row['ratio' + suffix] = float(s['exact']) / n
      row['mse' + suffix] = float(s['squared_error']) / n
      row['histogram' + suffix] = {
          int(b): float(c) / n for b, c in zip(OFFSET_BINS, s['histogram'])}
    out[name] = row
  return out

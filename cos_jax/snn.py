"""Running a zoo model as an IF spiking network: init, calibrate, simulate.

The SNN is the ANN's own module with ``spiking=SpikingConfig(...)`` and the same
``{'params', 'batch_stats'}`` variables. Linear layers (conv, dense, BN in
inference mode, average pooling) run once on the whole time-folded batch
``[B·T, ...]`` (sample-major); only the neuron state is scanned over time. The first layer's
current is computed once from the static image and broadcast over time.

Initial potentials travel as a "v0 pytree": the Flax ``'v0'`` collection, one
``[B, ...]`` leaf per IF layer, nested by module path like the params.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cos_jax import methods, neuron
from cos_jax.activation import SpikingConfig
from cos_jax.checks import check_inputs, run_bounds
from cos_jax.spiking_pass import (apply_in_chunks, apply_pass, join_step_spikes,
                                  merge_leading)
from cos_jax.settings import (DEFAULT_SATURATED, DEFAULT_TIME_CHUNK,
                              check_positive_int,
                              check_time_chunk)

PyTree = Any


def spiking(model: nn.Module, config: SpikingConfig) -> nn.Module:
  """The spiking twin of ``model``: same module, same variables, IF neurons.

  Its linear layers run on the time-folded batch, so ``apply`` returns
  ``[B·T, ...]`` rows, sample-major (row ``b·T + t``); :func:`simulate`
  unfolds them to ``[T, B, ...]``.

  Example:
    >>> snn = cos_jax.spiking(model, cos_jax.SpikingConfig(steps=4))
    >>> apply = lambda v, x: snn.apply(v, x, train=False, mutable=['v0'])
    >>> out, state = jax.eval_shape(apply, variables, images)   # or jax.jit
    >>> out.shape, sorted(state['v0'])[:2]      # 2 images x 4 steps
    ((8, 10), ['Activation_0', 'Activation_1'])
  """
  return model.clone(spiking=config)


def _thresholds_like(v0_shapes: PyTree, params: PyTree) -> PyTree:
  """For each v0 leaf path, the matching Activation's threshold parameter."""
  flat_params = traverse_util.flatten_dict(params)
  flat = traverse_util.flatten_dict(v0_shapes)
  return traverse_util.unflatten_dict(
      {path: flat_params[path[:-1] + ('threshold',)] for path in flat})


@functools.partial(jax.jit, static_argnames=('model',))
def init_v0(model: nn.Module, variables: PyTree, images: jax.Array) -> PyTree:
  """The QCFS-matched initial potentials θ/2 for every IF neuron and sample.

  Args:
    model: a zoo model (``cos_jax.models.get``), spiking or not.
    variables: its ``{'params', 'batch_stats'}``.
    images: ``[B, H, W, C]`` a batch (only its shape matters).

  Returns:
    The v0 pytree: ``{path...: {'v0': [B, ...neuron shape]}}`` filled with θ/2.
    No forward computation is compiled into the result (shapes come from
    ``jax.eval_shape``).

  Example:
    >>> v0 = cos_jax.init_v0(model, variables, images)
    >>> v0['Activation_0']['v0'].shape         # [B, H, W, C], the first layer
    (2, 28, 28, 32)
    >>> float(v0['Activation_0']['v0'].max())  # θ/2, θ = 8.0 at init
    4.0
  """
  check_inputs(variables, images, model)
  config = SpikingConfig(steps=1)
  shapes = jax.eval_shape(
      lambda v, x: apply_pass(model, v, x, None, config)[1]['v0'], variables,
      images)
  thresholds = _thresholds_like(shapes, variables['params'])
  return jax.tree.map(
      lambda s, th: neuron.half_threshold(th, jnp.zeros(s.shape, s.dtype)),
      shapes, thresholds)


@functools.partial(jax.jit, static_argnames=('model', 'method'))
def rule_v0(model: nn.Module, variables: PyTree, images: jax.Array, *,
            method: methods.Method) -> PyTree:
  """The v0 pytree of a method that neither probes nor draws (θ/2 for
  'half', 0 for 'zero'): its rule applied to θ and the shapes, as
  :func:`init_v0` (no forward computation)."""
  start = init_v0(model, variables, images)
  return jax.tree.map(
      lambda v, threshold: method.layer_v0(v[None], threshold, v, 0),
      start, _thresholds_like(start, variables['params']))


@functools.partial(jax.jit, static_argnames=('model', 'method'))
def _calibrate(model, variables, images, v0, *,
               method: methods.Method) -> PyTree:
  """v0 after a probing ``method``'s calibration over ρ steps."""
  config = SpikingConfig(steps=method.rho, method=method)
  if method.run == methods.FUSED:  # layerwise: one pass does every round
    return apply_pass(model, variables, images, v0, config)[1]['v0']
  return _global_passes(model, variables, images, v0, config,
                        method.pre_passes)[0]


def _global_passes(model, variables, images, v0, config: SpikingConfig,
                   passes: int):
  """The global schedule's ``passes`` network-wide probe passes of
  ``config.steps`` (ρ) steps from ``v0`` (θ/2 if None). Returns (calibrated
  v0, intermediates), where ``config.count_steps`` spike counts span every
  pass in order."""
  if v0 is None:
    v0 = init_v0(model, variables, images)
  def one_pass(v, _):
    _, state = apply_pass(model, variables, images, v, config)
    return state['v0'], state.get('intermediates', {})
  v0, sown = jax.lax.scan(one_pass, v0, length=passes)
  return v0, jax.tree.map(merge_leading, sown)


def calibrate(model: nn.Module, variables: PyTree, images: jax.Array,
              v0: PyTree | None = None, *, rho: int, iterations: int = 1,
              schedule: str = 'layerwise',
              epsilon: float = neuron.DEFAULT_EPSILON,
              saturated: str = DEFAULT_SATURATED) -> PyTree:
  """COS: per-sample initial potentials calibrated from a ρ-step probe.

  ``layerwise`` (paper Algorithm 1): layer l is probed on the first ρ outputs
  of the already calibrated layer l-1, shifted ``iterations`` times, then run
  ρ steps to feed layer l+1. ``global``: the whole network runs ρ steps from
  ``v0`` and every layer shifts at once; repeated ``iterations`` times.

  Args:
    model: a zoo model. variables: its ``{'params', 'batch_stats'}``.
    images: ``[B, H, W, C]`` inputs (static: fed at every step).
    v0: starting v0 pytree (``None`` = θ/2 everywhere).
    rho: probe length ρ ≥ 1 (independent of the later simulation length T).
    iterations: probe/shift rounds (≥ 1).
    schedule: 'layerwise' or 'global'.
    epsilon: Theorem-2 ε as a fraction of θ, in (0, 1).
    saturated: 'fire' or 'keep': what happens to a neuron that fired at
      every probe step and still wants more (``cos_jax.shift_v0``).

  Returns:
    The calibrated v0 pytree (same structure as :func:`init_v0`'s). Memory
    beyond a ρ-step simulation is O(neurons × batch).

  Raises:
    cos_jax.settings.SettingsError: a setting out of range.

  ``saturated`` defaults to 'fire' here and in :func:`evaluate_snn`, while
  the per-layer :func:`cos_jax.calibrate_layer` defaults to
  ``saturate=False`` (the 'keep' rule).

  Example:
    >>> v0 = cos_jax.calibrate(model, variables, images, rho=4)
    >>> jax.tree.map(jnp.shape, v0) == jax.tree.map(
    ...     jnp.shape, cos_jax.init_v0(model, variables, images))
    True
    >>> cos_jax.simulate(model, variables, images, v0, T=4).shape
    (4, 2, 10)
  """
  method = methods.resolve('cos', rho, iterations, schedule, epsilon,
                           saturated)
  check_inputs(variables, images, model, v0,
               **run_bounds(0, method.calibration, None))
  return _calibrate(model, variables, images, v0, method=method)


@functools.partial(jax.jit, static_argnames=('model', 'T', 'time_chunk'))
def _simulate(model, variables, images, v0, *, T, time_chunk):
  return apply_in_chunks(model, variables, images, v0, SpikingConfig(steps=T),
                        time_chunk=time_chunk)[0]


def step_spikes_from(model: nn.Module, variables: PyTree, images: jax.Array,
                     v0: PyTree, *, steps: int,
                     time_chunk: int | None) -> PyTree:
  """Every IF layer's ``'step_spikes'`` (``[steps, B, ...spatial]`` spikes
  per position, :class:`~cos_jax.activation.SpikingConfig`) of a ``steps``-step
  run from ``v0``. IF neurons are causal, so the first t steps of this are
  those of any run of t or more steps from the same v0: the spikes of every
  method that runs from the v0 it set (all but the global schedule's probe
  passes). Jit-able; not jitted.
  """
  config = SpikingConfig(steps=steps, count_steps=True)
  return apply_in_chunks(model, variables, images, v0, config,
                        time_chunk=time_chunk)[1]['intermediates']


def simulate(model: nn.Module, variables: PyTree, images: jax.Array,
             v0: PyTree | None = None, *, T: int,
             time_chunk: int | None = DEFAULT_TIME_CHUNK) -> jax.Array:
  """Runs the IF network T steps from ``v0``.

  Args:
    model, variables: a zoo model and its variables.
    images: ``[B, H, W, C]`` static inputs.
    v0: v0 pytree (``None`` = θ/2, the QCFS baseline).
    T: time-steps ≥ 1.
    time_chunk: simulate this many steps at a time, carrying the membrane
      potentials (bounds memory and keeps CPU caches warm; the spikes do not
      change). ``None`` runs all T steps as one time-folded batch.

  Returns:
    ``[T, B, num_classes]`` per-step outputs of the last (non-spiking) layer.
    The prediction at time t is ``outputs[:t].mean(0).argmax(-1)``.

  Example:
    >>> v0 = cos_jax.init_v0(model, variables, images)      # θ/2: the baseline
    >>> outputs = cos_jax.simulate(model, variables, images, v0, T=4)
    >>> outputs.shape
    (4, 2, 10)
    >>> outputs[:2].mean(0).argmax(-1).shape    # predictions at T = 2
    (2,)
  """
  T, time_chunk = check_positive_int('T', T), check_time_chunk(time_chunk)
  check_inputs(variables, images, model, v0,
               **run_bounds(T, None, time_chunk))
  return _simulate(model, variables, images, v0, T=T, time_chunk=time_chunk)


class SNNRun(NamedTuple):
  """Result of :func:`evaluate_snn`.

  Attributes:
    outputs: ``[T, B, num_classes]`` per-step outputs.
    v0: the initial potentials the T-step run started from.
    intermediates: per-layer spike counts / input-current sums over the first
      ``record_steps`` steps (empty dict when not recorded).

  Example:
    >>> run = cos_jax.evaluate_snn(model, variables, images, T=4, rho=4)
    >>> run.outputs.shape, run.intermediates
    ((4, 2, 10), {})
  """
  outputs: jax.Array
  v0: PyTree
  intermediates: PyTree


@functools.partial(jax.jit, static_argnames=(
    'model', 'T', 'method', 'record_steps', 'time_chunk', 'count_steps'))
def run_method(model: nn.Module, variables: PyTree, images: jax.Array,
               key: jax.Array | None, *, T: int, method: methods.Method,
               record_steps: int = 0,
               time_chunk: int | None = DEFAULT_TIME_CHUNK,
               count_steps: bool = False,
               corrections: PyTree | None = None) -> SNNRun:
  """:func:`evaluate_snn` on settings already validated (no checks here).

  ``method`` is a bound :class:`~cos_jax.methods.Method`; it says how the
  run goes (``method.run``) and how many steps it simulates
  (``method.steps(T)``, the length of the outputs). ``key`` is needed by
  'random' only; ``corrections`` (:func:`cos_jax.correction.measure`) by
  'pc' and 'bc' only.

  * FUSED (the layerwise probe, and every fill rule): one pass in which each
    layer sets its v(0), then runs ``method.layer_steps(T)`` steps, so that
    the next layer has its probe inputs too.
  * PASSES (the global schedule): probe passes, then the main run.
  * PRESIM (SRP): a τ-step pass from θ/2 sets each neuron's mask, then the
    main run from θ/2 passes on s·θ·mask.
  * CORRECTED (pc, bc): the main run with the measured corrections.

  With ``count_steps`` the intermediates also hold each layer's
  ``'step_spikes'`` (:class:`~cos_jax.activation.SpikingConfig`) over every
  step that passed spikes on, the pre passes first (``method.counted(T)``).
  """
  steps = method.steps(T)
  if method.run == methods.FUSED:
    config = SpikingConfig(steps=method.layer_steps(T), method=method,
                           record_steps=record_steps, count_steps=count_steps)
    outputs, state = apply_in_chunks(model, variables, images, None, config,
                                    capture=bool(record_steps),
                                    time_chunk=time_chunk, key=key)
    return SNNRun(outputs[:steps], state['v0'],
                  state.get('intermediates', {}))
  extra, start, probed = {}, None, None
  if method.run == methods.PASSES:
    start, probed = _global_passes(
        model, variables, images, None,
        SpikingConfig(steps=method.pre_steps, method=method,
                      count_steps=count_steps), method.pre_passes)
  elif method.run == methods.PRESIM:
    extra['mask'], probed = _presim_mask(model, variables, images, method,
                                         count_steps)
  elif method.run == methods.CORRECTED:
    start = corrections.get('v0')
    extra = {k: v for k, v in corrections.items() if k != 'v0'}
  outputs, state = apply_in_chunks(
      model, variables, images, start,
      SpikingConfig(steps=steps, record_steps=record_steps,
                    count_steps=count_steps, masked='mask' in extra,
                    shifted='shift' in extra),
      capture=bool(record_steps), time_chunk=time_chunk, extra=extra)
  if count_steps and probed is not None:
    state['intermediates'] = join_step_spikes(
        state['intermediates'], [probed, state['intermediates']])
  v0 = start if start is not None else state['v0']
  return SNNRun(outputs, v0, state.get('intermediates', {}))


def _presim_mask(model, variables, images, method: methods.Method,
                 count_steps: bool):
  """SRP's pre-simulation: the whole network runs τ steps from θ/2; per
  neuron and sample, mask = [v(τ) > 1e-3·θ] (1.0 or 0.0, ``[B, ...]`` per
  layer, the v0 tree's layout). Returns (mask, the pass's intermediates)."""
  _, state = apply_pass(model, variables, images, None,
                    SpikingConfig(steps=method.pre_steps, keep_final_v=True,
                                  count_steps=count_steps))
  v_end = state['v_end']
  mask = jax.tree.map(
      lambda v, threshold: (v > methods.SRP_MASK_FRACTION * threshold.astype(
          v.dtype)).astype(v.dtype),
      v_end, _thresholds_like(v_end, variables['params']))
  return mask, state.get('intermediates', {})


def evaluate_snn(model: nn.Module, variables: PyTree, images: jax.Array, *,
                 T: int, init: str = 'cos', rho: int | None = None,
                 iterations: int = 1, schedule: str = 'layerwise',
                 epsilon: float = neuron.DEFAULT_EPSILON,
                 saturated: str = DEFAULT_SATURATED,
                 key: jax.Array | None = None,
                 record_steps: int = 0,
                 time_chunk: int | None = DEFAULT_TIME_CHUNK,
                 calibration_images: jax.Array | None = None) -> SNNRun:
  """Sets v0 by ``init`` and simulates T steps, in one compiled pass.

  For ``init='cos'`` with the layerwise schedule this is the fused path: every
  layer runs ``max(ρ, T)`` steps (probe, shift, run) instead of 2ρ + T, and the
  result equals ``simulate(calibrate(...), T)``.

  Args:
    init: a method of :data:`cos_jax.methods.METHODS`: 'cos' (calibrated
      offset spikes), 'half' (θ/2, the QCFS baseline), 'lightweight'
      (v0 ← v(ρ)), 'zero', 'random' (uniform [0, θ), needs ``key``),
      'srp' (the authors' MPLayer with τ = ``rho``: outputs are the T steps
      after the τ-step pre-simulation), 'pc' or 'bc' (dataset-level
      potential / bias correction for this T, measured on
      ``calibration_images``).
    rho, iterations, schedule, epsilon, saturated: the calibration of a
      method that probes (``rho`` required there, and as τ by 'srp');
      ignored by the others.
    calibration_images: ``[N, H, W, C]`` training images 'pc' and 'bc'
      measure their correction on (never the images evaluated).
    record_steps: if > 0, also return per-layer spike counts and input-current
      sums over the first ``record_steps`` (≤ T) steps.
    time_chunk: as in :func:`simulate` (the first chunk also spans the probe
      and the recorded steps).
    Others as in :func:`calibrate` / :func:`simulate`.

  Returns:
    :class:`SNNRun` (outputs ``[T, B, C]``, the v0 used, intermediates).

  ``saturated`` defaults to 'fire', as in :func:`calibrate`; the per-layer
  :func:`cos_jax.calibrate_layer` defaults to ``saturate=False`` ('keep').

  Example:
    >>> run = cos_jax.evaluate_snn(model, variables, images, T=4, rho=4)
    >>> run.outputs.shape
    (4, 2, 10)
    >>> v0 = cos_jax.calibrate(model, variables, images, rho=4)  # same v(0)
    >>> outputs = cos_jax.simulate(model, variables, images, v0, T=4)
    >>> bool(jnp.allclose(run.outputs, outputs, atol=1e-5))
    True
  """
  T = check_positive_int('T', T)
  method = methods.resolve(init, rho, iterations, schedule, epsilon,
                           saturated)
  if method.needs_key and key is None:
    raise ValueError(f'init={init!r} needs a PRNG key '
                     '(key=jax.random.key(0))')
  if not 0 <= record_steps <= T:
    raise ValueError(f'record_steps must be in [0, T={T}], got {record_steps}')
  check_inputs(variables, images, model, **run_bounds(
      T, method.calibration, time_chunk, record_steps))
  time_chunk = check_time_chunk(time_chunk)
  corrections = None
  if method.corrected:
    if calibration_images is None:
      raise ValueError(f'init={init!r} needs calibration_images (a batch of '
                       'the training split)')
    from cos_jax import correction  # pylint: disable=g-import-not-at-top
    # (it runs the SNN itself: importing it at the top would be circular)
    corrections = correction.measure(model, variables, calibration_images,
                                     method=method, T=T,
                                     time_chunk=time_chunk)
  return run_method(model, variables, images, key, T=T, method=method,
                    record_steps=record_steps, time_chunk=time_chunk,
                    corrections=corrections)

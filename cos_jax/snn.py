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

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cos_jax import neuron
from cos_jax.activation import SpikingConfig

PyTree = Any
SCHEDULES = ('layerwise', 'global')
INITS = ('cos', 'half', 'lightweight', 'zero', 'random')
# Long simulations run in chunks of this many time-steps, carrying every IF
# layer's membrane potential from one chunk to the next. The time-folded
# activations of one chunk ([B·chunk, ...]) then stay cache-sized on a CPU and
# memory is bounded by the chunk instead of by T. Measured on the 2-core CPU
# by benchmarks/snn_speed.py (README): simulate(T=32) at batch 64 took x0.52
# the time and x0.14 the memory of one block in chunks of 8; chunks of 16 are
# barely faster than one block. None = one block.
DEFAULT_TIME_CHUNK = 8


def spiking(model: nn.Module, config: SpikingConfig) -> nn.Module:
  """The spiking twin of ``model``: same module, same variables, IF neurons."""
  return model.clone(spiking=config)


def _model_variables(variables: PyTree, v0: PyTree | None) -> dict:
  out = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  if v0 is not None:
    out['v0'] = v0
  return out


def _apply(model, variables, images, v0, config: SpikingConfig,
           capture: bool = False):
  """One spiking pass; returns (outputs [steps, B, C], mutated collections)."""
  mutable = []
  if v0 is None or config.init != 'given':
    mutable.append('v0')
  if capture:
    mutable.append('intermediates')
  if config.keep_final_v:
    mutable.append('v_end')
  out, state = spiking(model, config).apply(
      _model_variables(variables, v0), images, train=False, mutable=mutable)
  # Sample-major time folding (see Activation): [B·T, C] -> [T, B, C].
  outputs = jnp.moveaxis(
      out.reshape((images.shape[0], config.steps) + out.shape[1:]), 1, 0)
  return outputs, dict(state)


def _apply_chunked(model, variables, images, v0, config: SpikingConfig,
                   capture: bool = False, time_chunk: int | None = None):
  """:func:`_apply` over ``config.steps`` steps, run in time chunks.

  The first chunk runs ``config`` (so a layer-wise probe, which needs its
  first ρ inputs together, and the recorded steps fall inside it) for
  ``max(time_chunk, ρ, record_steps)`` steps; the rest continue from each
  layer's final potential, ``time_chunk`` steps at a time, under a
  ``lax.scan``. Spikes are identical to one long run: only the batch that
  linear layers see changes size. Returns what :func:`_apply` returns, the
  collections being those of the first chunk.
  """
  first_steps = max(time_chunk or config.steps, config.rho,
                    config.record_steps)
  if config.steps <= first_steps:
    return _apply(model, variables, images, v0, config, capture)
  outputs, state = _apply(
      model, variables, images, v0,
      dataclasses.replace(config, steps=first_steps, keep_final_v=True),
      capture)
  v_end = state.pop('v_end')
  full_chunks, remainder = divmod(config.steps - first_steps, time_chunk)
  continue_for = lambda steps, v: _apply(
      model, variables, images, v,
      SpikingConfig(steps=steps, keep_final_v=True))
  pieces = [outputs]
  if full_chunks:
    def one_chunk(v, _):
      out, chunk_state = continue_for(time_chunk, v)
      return chunk_state['v_end'], out
    v_end, chunked = jax.lax.scan(one_chunk, v_end, length=full_chunks)
    pieces.append(chunked.reshape((-1,) + chunked.shape[2:]))
  if remainder:
    pieces.append(continue_for(remainder, v_end)[0])
  return jnp.concatenate(pieces), state


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')


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
  """
  config = SpikingConfig(steps=1)
  shapes = jax.eval_shape(
      lambda v, x: _apply(model, v, x, None, config)[1]['v0'], variables,
      images)
  thresholds = _thresholds_like(shapes, variables['params'])
  return jax.tree.map(lambda s, th: jnp.full(s.shape, th / 2, s.dtype),
                      shapes, thresholds)


def _fill_v0(model, variables, images, kind: str, key=None) -> PyTree:
  """v0 pytrees for the comparison initialisations (paper Table S3)."""
  half = init_v0(model, variables, images)
  if kind == 'half':
    return half
  if kind == 'zero':
    return jax.tree.map(jnp.zeros_like, half)
  if kind == 'random':
    if key is None:
      raise ValueError("init='random' needs a PRNG key (key=jax.random.key(0))")
    leaves, treedef = jax.tree.flatten(half)
    keys = jax.random.split(key, len(leaves))
    # θ/2 · 2 = θ: uniform in [0, θ).
    return jax.tree.unflatten(treedef, [
        jax.random.uniform(k, leaf.shape, leaf.dtype) * (2 * leaf)
        for k, leaf in zip(keys, leaves)])
  raise ValueError(f'unknown init {kind!r}')


@functools.partial(jax.jit, static_argnames=(
    'model', 'rho', 'iterations', 'schedule', 'epsilon'))
def _calibrate(model, variables, images, v0, *, rho, iterations, schedule,
               epsilon):
  if schedule == 'layerwise':
    config = SpikingConfig(steps=rho, init='cos', rho=rho,
                           iterations=iterations, epsilon=epsilon)
    return _apply(model, variables, images, v0, config)[1]['v0']
  config = SpikingConfig(steps=rho, init='global', rho=rho, epsilon=epsilon)
  if v0 is None:
    v0 = init_v0(model, variables, images)
  one_round = lambda _, v: _apply(model, variables, images, v, config)[1]['v0']
  return jax.lax.fori_loop(0, iterations, one_round, v0)


def calibrate(model: nn.Module, variables: PyTree, images: jax.Array,
              v0: PyTree | None = None, *, rho: int, iterations: int = 1,
              schedule: str = 'layerwise',
              epsilon: float = neuron.DEFAULT_EPSILON) -> PyTree:
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

  Returns:
    The calibrated v0 pytree (same structure as :func:`init_v0`'s). Memory
    beyond a ρ-step simulation is O(neurons × batch).

  Example:
    >>> v0 = cos_jax.calibrate(model, variables, images, rho=8)
    >>> outputs = cos_jax.simulate(model, variables, images, v0, T=4)
  """
  _check_positive_int('rho', rho)
  _check_positive_int('iterations', iterations)
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
  neuron._check_epsilon(epsilon)  # pylint: disable=protected-access
  return _calibrate(model, variables, images, v0, rho=rho,
                    iterations=iterations, schedule=schedule,
                    epsilon=float(epsilon))


@functools.partial(jax.jit, static_argnames=('model', 'T', 'time_chunk'))
def _simulate(model, variables, images, v0, *, T, time_chunk):
  return _apply_chunked(model, variables, images, v0, SpikingConfig(steps=T),
                        time_chunk=time_chunk)[0]


def _check_time_chunk(time_chunk) -> None:
  if time_chunk is not None:
    _check_positive_int('time_chunk', time_chunk)


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
  """
  _check_positive_int('T', T)
  _check_time_chunk(time_chunk)
  return _simulate(model, variables, images, v0, T=T, time_chunk=time_chunk)


class SNNRun(NamedTuple):
  """Result of :func:`evaluate_snn`.

  Attributes:
    outputs: ``[T, B, num_classes]`` per-step outputs.
    v0: the initial potentials the T-step run started from.
    intermediates: per-layer spike counts / input-current sums over the first
      ``record_steps`` steps (empty dict when not recorded).
  """
  outputs: jax.Array
  v0: PyTree
  intermediates: PyTree


@functools.partial(jax.jit, static_argnames=(
    'model', 'T', 'init', 'rho', 'iterations', 'schedule', 'epsilon',
    'record_steps', 'time_chunk'))
def _evaluate(model, variables, images, key, *, T, init, rho, iterations,
              schedule, epsilon, record_steps, time_chunk):
  if init in ('cos', 'lightweight') and schedule == 'layerwise':
    # Fused: each layer probes its first ρ inputs, sets v0, and runs
    # max(ρ, T) steps so the next layer has ρ probe inputs too.
    config = SpikingConfig(steps=max(rho, T), init=init, rho=rho,
                           iterations=iterations, epsilon=epsilon,
                           record_steps=record_steps)
    outputs, state = _apply_chunked(model, variables, images, None, config,
                                    capture=bool(record_steps),
                                    time_chunk=time_chunk)
    v0 = state['v0']
  else:
    if init == 'cos':
      v0 = _calibrate(model, variables, images, None, rho=rho,
                      iterations=iterations, schedule=schedule,
                      epsilon=epsilon)
    elif init == 'lightweight':  # global lightweight: v(ρ) of a network run
      _, state = _apply(model, variables, images, None, SpikingConfig(
          steps=rho, init='lightweight', rho=rho))
      v0 = state['v0']
    else:
      v0 = _fill_v0(model, variables, images, init, key)
    outputs, state = _apply_chunked(
        model, variables, images, v0,
        SpikingConfig(steps=T, record_steps=record_steps),
        capture=bool(record_steps), time_chunk=time_chunk)
  intermediates = state.get('intermediates', {})
  return SNNRun(outputs[:T], v0, intermediates)


def evaluate_snn(model: nn.Module, variables: PyTree, images: jax.Array, *,
                 T: int, init: str = 'cos', rho: int | None = None,
                 iterations: int = 1, schedule: str = 'layerwise',
                 epsilon: float = neuron.DEFAULT_EPSILON,
                 key: jax.Array | None = None,
                 record_steps: int = 0,
                 time_chunk: int | None = DEFAULT_TIME_CHUNK) -> SNNRun:
  """Sets v0 by ``init`` and simulates T steps, in one compiled pass.

  For ``init='cos'`` with the layerwise schedule this is the fused path: every
  layer runs ``max(ρ, T)`` steps (probe, shift, run) instead of 2ρ + T, and the
  result equals ``simulate(calibrate(...), T)``.

  Args:
    init: 'cos' (calibrated offset spikes), 'half' (θ/2, the QCFS baseline),
      'lightweight' (v0 ← v(ρ)), 'zero', or 'random' (uniform [0, θ), needs
      ``key``).
    rho: probe length (required for 'cos' and 'lightweight').
    record_steps: if > 0, also return per-layer spike counts and input-current
      sums over the first ``record_steps`` (≤ T) steps.
    time_chunk: as in :func:`simulate` (the first chunk also spans the probe
      and the recorded steps).
    Others as in :func:`calibrate` / :func:`simulate`.

  Returns:
    :class:`SNNRun` (outputs ``[T, B, C]``, the v0 used, intermediates).
  """
  _check_positive_int('T', T)
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}')
  if init in ('cos', 'lightweight'):
    _check_positive_int('rho', rho)
    _check_positive_int('iterations', iterations)
    neuron._check_epsilon(epsilon)  # pylint: disable=protected-access
  else:
    rho = None
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
  if not 0 <= record_steps <= T:
    raise ValueError(f'record_steps must be in [0, T={T}], got {record_steps}')
  _check_time_chunk(time_chunk)
  return _evaluate(model, variables, images, key, T=T, init=init, rho=rho,
                   iterations=iterations, schedule=schedule,
                   epsilon=float(epsilon), record_steps=record_steps,
                   time_chunk=time_chunk)

"""The activation slot shared by the QCFS ANN and its IF spiking network.

Every ReLU position of a model holds one :class:`Activation`. It owns the layer's
trainable ``threshold`` (λ in the ANN, θ in the SNN) and nothing else, so the ANN
and the SNN share one parameter tree. What it computes depends on the model's
``spiking`` attribute:

* ``None`` — the QCFS ANN: ``qcfs(x, threshold, levels)``.
* a :class:`SpikingConfig` — an IF layer. Linear layers run with time folded into
  the batch (``[B·T, ...]``, sample-major); the activation unfolds to ``[T, B, ...]``, scans the
  neuron state over time and folds the spikes back. The per-sample initial
  potential lives in the ``'v0'`` variable collection (``[B, ...]`` per layer).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cos_jax import methods, neuron
from cos_jax.settings import Calibration


def model_variables(variables) -> dict:
  """The collections a model is applied with, ``{'params', 'batch_stats'}``
  (those present) of ``variables``; the rest ('v0', a pass's state) belong
  to one spiking pass."""
  return {k: variables[k] for k in ('params', 'batch_stats') if k in variables}


@dataclasses.dataclass(frozen=True)
class SpikingConfig:
  """Static settings of one spiking forward pass (hashable: a jit static).

  Attributes:
    steps: time-steps every IF layer runs (and the length of the output).
    method: the :class:`cos_jax.methods.Method` by which each layer sets
      v(0) before its run, or its name (bound to ``calibration`` here);
      ``None`` runs from the ``'v0'`` collection as given (θ/2 where it is
      absent). In a fused run (``method.run ==
      FUSED``) a layer sets v(0), then runs from it; in a probe pass of the
      global schedule it runs from the given v(0) (the run is the probe) and
      writes one round's result back to ``'v0'``.
    record_steps: if > 0, each layer sows into ``'intermediates'`` its spike
      count and summed input current over the first ``record_steps`` steps of
      its main run (for the offset-spike analyses).
    keep_final_v: if True, each layer writes its potential after the last
      step into the ``'v_end'`` collection (same tree as ``'v0'``), so a long
      run can continue in time chunks from where this one stopped.
    count_steps: if True, each layer sows into ``'intermediates'`` its spikes
      at every step of this pass, per sample, summed over the last (feature)
      axis: ``'step_spikes'``, ``[steps, B, ...spatial]``, int16 (int32 from
      2**15 features). For the cost counts of :mod:`cos_jax.cost`, where a
      neuron's fan-out does not depend on its channel.
    masked: each layer passes on ``s·θ·mask``, its ``'mask'`` collection's
      value (SRP; 0/1 per neuron and sample). The neuron still integrates
      and resets as usual; only its output is masked.
    shifted: each layer adds its ``'shift'`` collection's value (per
      channel, the bias correction 'bc') to its input current every step.

  Example:
    >>> config = cos_jax.SpikingConfig(
    ...     steps=8, method='cos', calibration=cos_jax.Calibration(rho=4))
    >>> config.probe_steps
    4
    >>> cos_jax.spiking(model, config).spiking is config
    True
  """
  steps: int
  method: methods.Method | str | None = None
  calibration: Calibration | None = None
  record_steps: int = 0
  keep_final_v: bool = False
  count_steps: bool = False
  masked: bool = False
  shifted: bool = False

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f'steps must be >= 1, got {self.steps}')
    if self.method is not None:
      method = methods.named(self.method, self.calibration)
      if method.takes_calibration and method.calibration is None:
        raise ValueError(f'method {method.name!r} needs a Calibration')
      object.__setattr__(self, 'method', method)
      object.__setattr__(self, 'calibration', method.calibration)
    if self.method is not None and self.method.probe_steps > self.steps:
      raise ValueError(f'method {self.method.name!r} probes '
                       f'{self.method.probe_steps} steps, more than '
                       f'steps={self.steps}')
    if not 0 <= self.record_steps <= self.steps:
      raise ValueError('record_steps must lie in [0, steps]')

  @property
  def probe_steps(self) -> int:
    """Input steps a layer's v(0) rule looks at (ρ, or 1 for a fill)."""
    return 1 if self.method is None else self.method.probe_steps

  @property
  def runs_from_new_v0(self) -> bool:
    return self.method is None or self.method.run == methods.FUSED

  @property
  def rounds(self) -> int:
    """Rounds per pass: all of them layerwise, one per pass globally."""
    if self.method is None or not self.method.probes_own_input:
      return 0
    return (self.method.calibration.iterations if self.runs_from_new_v0
            else 1)


class Activation(nn.Module):
  """QCFS activation (ANN) or IF neuron layer (SNN) with one threshold param.

  Attributes:
    levels: L, the QCFS quantisation levels.
    spiking: ``None`` for the ANN, else the spiking-pass settings.
    static_input: True for the network's first activation, whose input (the
      image through the first linear layer) is identical at every time-step:
      it arrives as ``[B, ...]`` and is broadcast over time here. Set by the
      model from the layer's position, never inferred from shapes.
    threshold_init: initial λ (the reference uses 8.0).
    plain_relu: the ANN is a plain ReLU (no quantisation, no clip) instead
      of QCFS, for networks converted without QCFS training; its threshold
      is then set by balancing (``cos_jax.balance_thresholds``), not trained.
    per_channel: the threshold is created with one value per channel (the
      input's last axis, ``[C]``) instead of one per layer. Variables given
      to ``apply`` decide by themselves: a ``threshold`` of shape ``()`` or
      ``[C]`` is used as it is, whatever this says.
    strict: IF neurons fire on ``u > θ`` (Bu et al.'s Inference-scale
      ANN-SNN code) instead of ``u ≥ θ``, in the run and in the probes of
      the v(0) method alike (:func:`cos_jax.neuron.firing_rule`).

  Example:
    >>> act = cos_jax.Activation(levels=4)            # the ANN: QCFS, λ = 8
    >>> x = jnp.array([-1., 0.9, 3.1, 99.])
    >>> act.apply(act.init(jax.random.key(0), x), x)
    Array([0., 0., 4., 8.], dtype=float32)
  """
  levels: int
  spiking: SpikingConfig | None = None
  static_input: bool = False
  threshold_init: float = 8.0
  plain_relu: bool = False
  per_channel: bool = False
  strict: bool = False

  @nn.compact
  def __call__(self, x):
    threshold = self.param('threshold', nn.initializers.constant(
        self.threshold_init), self._threshold_shape(x), jnp.float32)
    if self.spiking is None:
      out = (jax.nn.relu(x) if self.plain_relu
             else neuron.qcfs(x, threshold, self.levels))
      self.sow('intermediates', 'ann_output', out)
      return out
    with neuron.firing_rule(self.strict):
      return self._spike(x, threshold.astype(x.dtype))

  def _threshold_shape(self, x) -> tuple[int, ...]:
    """() or (C,): the given threshold's, else by ``per_channel``."""
    channels = (x.shape[-1],)
    if self.has_variable('params', 'threshold'):
      shape = jnp.shape(self.get_variable('params', 'threshold'))
      if shape not in ((), channels):
        raise ValueError(
            f'{self.name}: a threshold is a scalar or one value per channel '
            f'{channels}, got shape {shape}')
      return shape
    return channels if self.per_channel else ()

  def _spike(self, x, threshold):
    steps = self.spiking.steps
    if self.static_input:
      currents = jnp.broadcast_to(x, (steps,) + x.shape)
    else:
      # Time is folded sample-major: row b·T + t of a linear layer's batch is
      # sample b at step t. A device's shard of the folded batch then holds
      # whole samples, so sharding over the batch never splits a time series.
      currents = jnp.moveaxis(x.reshape((-1, steps) + x.shape[1:]), 1, 0)
    out = jnp.moveaxis(self.if_layer(currents, threshold), 0, 1)
    return out.reshape((-1,) + out.shape[2:])

  def if_layer(self, currents, threshold):
    """The IF layer on ``currents`` ``[T, B, ...]``: sets v(0) by the
    method, runs, records; returns the outputs ``s·θ``, ``[T, B, ...]``.

    The one spiking engine: the zoo's slots and the traced front end's
    sites both run it.
    """
    cfg = self.spiking
    v0_var = self.variable('v0', 'v0', neuron.half_threshold, threshold,
                           currents[0])
    v0 = v0_var.value
    if cfg.shifted:  # bc: a per-channel correction of the bias, every step
      currents = currents + self.get_variable('shift', 'v0').astype(
          currents.dtype)
    if cfg.method is not None:
      key = self.make_rng('v0') if cfg.method.needs_key else None
      new_v0 = cfg.method.layer_v0(currents[:cfg.probe_steps], threshold, v0,
                                   cfg.rounds, key)
      v0_var.value = new_v0
      if cfg.runs_from_new_v0:
        v0 = new_v0
    spikes, v_end = neuron.spike_train(currents, threshold, v0,
                                       return_final_v=True)
    if cfg.keep_final_v:
      # Same variable name as in 'v0', so v_end can be fed back as a v0 tree.
      self.put_variable('v_end', 'v0', v_end)
    if cfg.record_steps:
      n = cfg.record_steps
      self.sow('intermediates', 'spike_count', spikes[:n].sum(0))
      self.sow('intermediates', 'current_sum', currents[:n].sum(0))
    if cfg.count_steps:
      # Counted on a second pass over the currents, kept apart by the barrier:
      # counting `spikes` would make XLA write the spike train out, which it
      # otherwise fuses straight into the next layer's input. int16 counts
      # halve what the count adds to memory traffic.
      again = neuron.spike_train(
          *jax.lax.optimization_barrier((currents, threshold, v0)))
      if cfg.masked:  # a masked spike reaches no synapse
        again = again * self.get_variable('mask', 'v0')
      dtype = jnp.int16 if currents.shape[-1] < 2**15 else jnp.int32
      self.sow('intermediates', 'step_spikes', jnp.sum(again > 0, -1,
                                                       dtype=dtype))
    if cfg.masked:  # SRP: the neuron integrates as usual, its output is masked
      return spikes * threshold * self.get_variable('mask', 'v0')
    return spikes * threshold

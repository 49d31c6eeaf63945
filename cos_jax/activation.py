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
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from cos_jax import neuron

# How a spiking layer obtains its initial potential before its main run:
#   given       use the 'v0' collection as it is (default θ/2 when absent);
#   cos         layer-wise COS: calibrate from the first ρ input steps, then run;
#   lightweight layer-wise v(0) <- v(ρ) (paper A.5), then run;
#   global      run from the given v0, and write back one COS shift computed
#               from this run's first ρ steps (the network-wide online schedule).
InitMode = Literal['given', 'cos', 'lightweight', 'global']


@dataclasses.dataclass(frozen=True)
class SpikingConfig:
  """Static settings of a spiking forward pass (hashable: safe as a jit static).

  Attributes:
    steps: time-steps every IF layer runs (and the length of the output).
    init: how each layer sets v(0) before its run (see ``InitMode``).
    rho: probe length ρ for ``cos`` / ``lightweight`` / ``global``.
    iterations: COS probe/shift rounds per layer.
    epsilon: Theorem-2 ε as a fraction of θ.
    record_steps: if > 0, each layer sows into ``'intermediates'`` its spike
      count and summed input current over the first ``record_steps`` steps of
      its main run (for the offset-spike analyses).
    keep_final_v: if True, each layer writes its potential after the last
      step into the ``'v_end'`` collection (same tree as ``'v0'``), so a long
      run can continue in time chunks from where this one stopped.
  """
  steps: int
  init: InitMode = 'given'
  rho: int = 0
  iterations: int = 1
  epsilon: float = neuron.DEFAULT_EPSILON
  record_steps: int = 0
  keep_final_v: bool = False

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f'steps must be >= 1, got {self.steps}')
    if self.init in ('cos', 'lightweight', 'global'):
      if not 1 <= self.rho <= self.steps:
        raise ValueError(
            f'rho must be in [1, steps={self.steps}] for init={self.init!r}; '
            f'got {self.rho}')
    elif self.init != 'given':
      raise ValueError(f'unknown init mode {self.init!r}')
    if self.record_steps > self.steps:
      raise ValueError('record_steps must not exceed steps')


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
  """
  levels: int
  spiking: SpikingConfig | None = None
  static_input: bool = False
  threshold_init: float = 8.0

  @nn.compact
  def __call__(self, x):
    threshold = self.param('threshold', nn.initializers.constant(
        self.threshold_init), (), jnp.float32)
    if self.spiking is None:
      out = neuron.qcfs(x, threshold, self.levels)
      self.sow('intermediates', 'ann_output', out)
      return out
    return self._spike(x, threshold.astype(x.dtype))

  def _spike(self, x, threshold):
    cfg = self.spiking
    # Time is folded sample-major: row b·T + t of a linear layer's batch is
    # sample b at step t. A device's shard of the folded batch then holds
    # whole samples, so sharding over the batch never splits a time series.
    if self.static_input:
      currents = jnp.broadcast_to(x, (cfg.steps,) + x.shape)
    else:
      currents = jnp.moveaxis(
          x.reshape((-1, cfg.steps) + x.shape[1:]), 1, 0)
    v0_var = self.variable('v0', 'v0', neuron.half_threshold, threshold,
                           currents[0])
    v0 = v0_var.value
    if cfg.init == 'cos':
      v0 = neuron.calibrate_layer(currents[:cfg.rho], threshold, v0,
                                  iterations=cfg.iterations,
                                  epsilon=cfg.epsilon)
      v0_var.value = v0
    elif cfg.init == 'lightweight':
      v0 = neuron.probe(currents[:cfg.rho], threshold, v0).v
      v0_var.value = v0
    elif cfg.init == 'global':
      # One network-wide COS round: shift from this run's first ρ steps; the
      # run below still starts from the unshifted v0 (it is the probe).
      v0_var.value = neuron.shift_v0(
          v0, neuron.probe(currents[:cfg.rho], threshold, v0), threshold,
          cfg.rho, cfg.epsilon)
    spikes, v_end = neuron.spike_train(currents, threshold, v0,
                                       return_final_v=True)
    if cfg.keep_final_v:
      # Same variable name as in 'v0', so v_end can be fed back as a v0 tree.
      self.put_variable('v_end', 'v0', v_end)
    if cfg.record_steps:
      n = cfg.record_steps
      self.sow('intermediates', 'spike_count', spikes[:n].sum(0))
      self.sow('intermediates', 'current_sum', currents[:n].sum(0))
    out = jnp.moveaxis(spikes * threshold, 0, 1)
    return out.reshape((-1,) + out.shape[2:])

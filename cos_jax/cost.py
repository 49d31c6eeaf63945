"""What the spikes cost: synaptic operations, firing rates and energy.

A spike of an IF layer drives a fixed set of synapses in the linear layer(s)
that read the layer (its fan-out); each is one synaptic operation (SOP), an
accumulate. The ANN instead spends a multiply-accumulate (MAC) per weight and
input. The SNN's first linear layer reads the static image, so it costs MACs,
once (docs/semantics.md, "Static input"). docs/cost.md states the counting.

* :func:`analyse` reads a network once: per IF layer its neurons, the fan-out
  of each neuron and the layers it reaches, the ANN's MACs per linear layer and
  the MACs of the layers that read the image. Fan-outs come from a
  *connectivity twin* of the model: the model's own code with every conv and
  dense layer replaced by its 0/1 connection pattern (BatchNorm, being
  diagonal, by the identity), so stride, padding, pooling, flattening and
  residual paths count exactly as the model wires them.
* :func:`class_counts` (jit-able, on sharded batches) turns a run's per-step
  spike counts (``SpikingConfig.count_steps``) into exact int32 counts per
  step and fan-out class, padding rows left out.
* :func:`summarize` turns the summed counts into SOPs, rates and energy per
  method and t, as this implementation computes them and as streaming
  hardware would deploy them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cos_jax.activation import Activation
from cos_jax.settings import Calibration, SettingsError

PyTree = Any
OUTPUT = 'output'  # the network's (non-spiking) output, as a fan-out target
_LINEAR = (nn.Conv, nn.Dense)
# Probe patterns run through the twin this many neuron-values at a time.
_PROBE_VALUES = 2**24
# Exact counts: a sample's spikes per step and class are summed in float32
# (exact below 2**24), a batch's in int32.
_MAX_NEURONS, _MAX_BATCH_SPIKES = 2**24, 2**31 - 1


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Energy per operation.

  Attributes:
    name: its value of the ``cost_model`` setting.
    mac_pj: one multiply-accumulate, pJ (the ANN, and the SNN's input layer).
    ac_pj: one synaptic operation (an accumulate), pJ.
    source: where the figures come from.
  """
  name: str
  mac_pj: float
  ac_pj: float
  source: str


COST_MODELS = {m.name: m for m in (
    CostModel('45nm', 4.6, 0.9, '45 nm CMOS, 32-bit float: MAC 4.6 pJ '
              '(multiply 3.7 + add 0.9), AC 0.9 pJ (Horowitz, ISSCC 2014)'),
    CostModel('77fj', 12.5, 0.077, '77 fJ per SOP (the ROLLS chip, Qiao et '
              'al. 2015) against 12.5 pJ per FLOP, one FLOP per MAC, as in '
              'the QCFS line of papers'),
)}
DEFAULT_COST_MODEL = '45nm'


def cost_model(name: str | None) -> CostModel | None:
  """The :class:`CostModel` called ``name``; None for 'none' (no counting)."""
  if name in (None, 'none'):
    return None
  if name not in COST_MODELS:
    raise SettingsError('cost_model', f'must be one of '
                        f'{", ".join(COST_MODELS)} or none, got {name!r}')
  return COST_MODELS[name]


@dataclasses.dataclass(frozen=True)
class Network:
  """What the cost counts need to know about a network (per sample).

  Attributes:
    layers: IF layer names ('/'-joined module paths), in call order.
    neurons: per IF layer, its number of neurons.
    fanout: per IF layer, ``[...spatial]`` int64: the synapses one spike of
      a neuron at that position drives (the same for every channel).
    targets: per IF layer, the IF layers (or :data:`OUTPUT`) it reaches.
    ann_macs: per linear layer (conv, dense), the ANN's MACs.
    input_macs: MACs of the linear layers that read the image.
    depth: IF layers on the longest path through the network.
  """
  layers: tuple[str, ...]
  neurons: dict[str, int]
  fanout: dict[str, np.ndarray]
  targets: dict[str, tuple[str, ...]]
  ann_macs: dict[str, int]
  input_macs: int
  depth: int


def _name(module: nn.Module) -> str:
  return '/'.join(module.path)


def _ann(model: nn.Module) -> nn.Module:
  return model.clone(spiking=None) if getattr(model, 'spiking', None) else model


def _describe(model, variables, image_shape):
  """Shapes of every IF layer and of the output, and the ANN's MACs."""
  shapes, macs = {}, {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__':
      if isinstance(module, Activation):
        shapes[_name(module)] = tuple(out.shape[1:])
      elif isinstance(module, _LINEAR):
        kernel = module.get_variable('params', 'kernel')
        macs[_name(module)] = (math.prod(out.shape[1:])
                               * math.prod(kernel.shape[:-1]))
    return out

  def forward(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)
  out = jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(
      (1,) + tuple(image_shape), jnp.float32))
  shapes[OUTPUT] = tuple(out.shape[1:])
  return shapes, macs


def ann_macs(model: nn.Module, variables: PyTree, image_shape
             ) -> dict[str, int]:
  """MACs per sample of each conv and dense layer of the ANN (``kernel
  size × input channels × output elements``; from shapes only, so
  ``variables`` may be abstract)."""
  return _describe(_ann(model), variables, tuple(image_shape))[1]


def _connectivity(module: nn.Module, x: jax.Array) -> jax.Array:
  """A conv or dense layer with all weights 1 on a nonnegative input, its
  output features collapsed to one (the layers are channel-dense): positive
  exactly where some nonzero input is connected."""
  summed = jnp.abs(x).sum(-1, keepdims=True)
  if isinstance(module, nn.Dense):
    return summed
  if module.feature_group_count != 1:
    raise ValueError(f'{_name(module)}: grouped convolutions are not counted')
  size = module.kernel_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * (
      x.ndim - 2)
  twin = module.clone(parent=None, features=1, use_bias=False)
  return twin.apply({'params': {'kernel': jnp.ones(size + (1, 1))}}, summed)


def _twin(model, variables, images, outputs: dict, shapes: dict):
  """The connectivity twin's forward pass.

  Every IF layer outputs ``outputs[name]`` (zeros of batch 1 if absent),
  whatever its input. Returns ({IF layer or OUTPUT: its input}, {linear
  layer: its input}); arrays whose last axis is 1 where the real one is
  wider hold the same value for every feature.
  """
  inputs, linear_inputs, inside = {}, {}, []

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if inside or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, Activation):
      inputs[_name(module)] = args[0]
      return outputs.get(_name(module), jnp.zeros((1,) + shapes[_name(module)]))
    if isinstance(module, nn.BatchNorm):
      return args[0]
    if isinstance(module, _LINEAR):
      linear_inputs[_name(module)] = args[0]
      inside.append(module)  # the twin layer itself is a Conv: run it plainly
      try:
        return _connectivity(module, args[0])
      finally:
        inside.pop()
    if type(module).__module__.startswith('flax.linen') and not isinstance(
        module, (nn.Sequential, nn.Dropout)):
      raise ValueError(f'{_name(module)}: cost counting knows conv, dense, '
                       f'BatchNorm and Activation layers, not '
                       f'{type(module).__name__}')
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    inputs[OUTPUT] = model.apply(variables, images, train=False)
  return inputs, linear_inputs


def _probe_pattern(spec: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """One probe over a layer's neurons ``shape`` = (...spatial, C): ones in
  channel ``spec[-1]`` at the positions whose coordinate on axis d is
  ``spec[d]`` (every coordinate where ``spec[d]`` < 0)."""
  spatial = shape[:-1]
  keep = jnp.ones(spatial, bool)
  for axis in range(len(spatial)):
    coordinate = jax.lax.broadcasted_iota(jnp.int32, spatial, axis)
    keep &= (spec[axis] < 0) | (coordinate == spec[axis])
  channel = jnp.arange(shape[-1]) == spec[-1]
  return (keep[..., None] & channel).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('model', 'shapes',
                                             'image_shape'))
def _reach_counts(model, variables, specs, probed, image, *, shapes,
                  image_shape):
  """Neurons of every target reached by each probe of ``specs`` [P, m+1]
  over the IF layer numbered ``probed``, and which linear layers see a
  nonzero input, on an image of ``image`` everywhere (both traced: one
  compilation serves every layer; the other layers output zeros)."""
  shapes = dict(shapes)
  outputs = {
      layer: jax.vmap(lambda s, shape=shapes[layer]: _probe_pattern(
          s, shape))(specs) * (probed == i)
      for i, layer in enumerate(n for n in shapes if n != OUTPUT)}
  inputs, linear_inputs = _twin(model, variables, jnp.full(
      (1,) + image_shape, image), outputs, shapes)
  counts = {}
  for target, x in inputs.items():
    features = math.prod(x.shape[1:])
    wide = math.prod(shapes[target]) // features  # a collapsed feature axis
    reached = jnp.sum(x != 0, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)
    counts[target] = jnp.broadcast_to(reached * wide, specs.shape[:1])
  return counts, {name: jnp.any(x != 0) for name, x in linear_inputs.items()}


def _probe_specs(shape, rank):
  """The probes of one layer as rows [axis_0..axis_{rank-1}, channel]: the
  whole layer, one slab per index of each spatial axis, then check points
  (corners, centre; the centre in the last channel), all in channel 0 but
  the last."""
  spatial = shape[:-1]
  n = len(spatial)
  pad = [-1] * (rank - n)
  specs = [[-1] * n + pad + [0]]
  for axis, size in enumerate(spatial):
    specs += [[-1] * axis + [k] + [-1] * (n - axis - 1) + pad + [0]
              for k in range(size)]
  corners = {tuple((size - 1) * ((i >> d) & 1) for d, size in
                   enumerate(spatial)) for i in range(2**n)}
  centre = tuple(size // 2 for size in spatial)
  checks = sorted(corners | {centre})
  specs += [list(p) + pad + [0] for p in checks]
  specs.append(list(centre) + pad + [shape[-1] - 1])
  return np.array(specs, np.int32), checks, centre


def _probe_chunk(shapes):
  """Probes per twin pass: one size for every layer (one compilation)."""
  layers = [n for n in shapes if n != OUTPUT]
  most = max(1 + sum(shapes[n][:-1]) + 2**(len(shapes[n]) - 1) + 2
             for n in layers)
  return max(1, min(most, _PROBE_VALUES // sum(
      math.prod(shapes[n]) for n in layers)))


def _layer_fanout(model, variables, image_shape, shapes, layer):
  """(fan-out map [...spatial] int64, targets) of one IF layer.

  The 2-D reach of a neuron through convs and pools is a product of one
  interval (with strides, a regular subset) per axis, so its size factors
  as ``whole × Π_d slab_d / whole``, where slab_d is what the slab through
  its coordinate on axis d reaches and ``whole`` what the whole layer
  reaches. The check points compare this with single-neuron probes.
  """
  shape = shapes[layer]
  layers = [n for n in shapes if n != OUTPUT]
  rank = max(len(shapes[n]) - 1 for n in layers)
  specs, checks, centre = _probe_specs(shape, rank)
  chunk = _probe_chunk(shapes)
  pieces = []
  for start in range(0, len(specs), chunk):
    part = specs[start:start + chunk]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
    out, _ = _reach_counts(model, variables, padded, layers.index(layer),
                           0.0, shapes=tuple(shapes.items()),
                           image_shape=image_shape)
    pieces.append({k: np.asarray(v, np.int64)[:len(part)]
                   for k, v in out.items()})
  counts = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
  spatial = shape[:-1]
  fanout = np.zeros(spatial, np.int64)
  targets = []
  for target, c in counts.items():
    whole = c[0]
    if whole == 0:
      continue
    targets.append(target)
    product, offset = np.array(whole, np.int64), 1
    for size in spatial:
      product = np.multiply.outer(product, c[offset:offset + size]) // whole
      offset += size
    fanout += product
  exact = sum(c[len(specs) - len(checks) - 1:] for c in counts.values())
  predicted = [fanout[p] for p in checks] + [fanout[centre]]
  if list(exact) != predicted:
    raise ValueError(f'{layer}: fan-out is not separable by axes or differs '
                     f'by channel (checks {list(exact)} != {predicted}); '
                     'cost.analyse does not cover this network')
  return fanout, tuple(targets)


def analyse(model: nn.Module, variables: PyTree, image_shape) -> Network:
  """Reads the cost-relevant structure of a zoo (or zoo-like) network.

  Args:
    model: the ANN (a spiking twin is read as its ANN).
    variables: its ``{'params', 'batch_stats'}`` (only shapes matter).
    image_shape: ``(H, W, C)`` of one image.

  Returns:
    :class:`Network`. Works from shapes and a twin pass per IF layer over a
    few hundred probe patterns; no weights are read.

  Raises:
    ValueError: a layer kind the twin does not know (grouped convs, other
      norms), or a fan-out that is not separable by axes.
  """
  model = _ann(model)
  variables = {k: variables[k] for k in ('params', 'batch_stats')
               if k in variables}
  image_shape = tuple(image_shape)
  shapes, ann_macs = _describe(model, variables, image_shape)
  layers = tuple(n for n in shapes if n != OUTPUT)
  fanout, targets = {}, {}
  for layer in layers:
    fanout[layer], targets[layer] = _layer_fanout(
        model, variables, image_shape, shapes, layer)
  rank = max(len(shapes[n]) - 1 for n in layers)
  _, fed = _reach_counts(  # no layer probed, an image of ones
      model, variables, np.zeros((_probe_chunk(shapes), rank + 1), np.int32),
      -1, 1.0, shapes=tuple(shapes.items()), image_shape=image_shape)
  input_macs = sum(ann_macs[name] for name, seen in fed.items() if seen)
  memo = {}

  def chain(layer):  # IF layers on the longest path starting at ``layer``
    if layer not in memo:
      memo[layer] = 1 + max((chain(t) for t in targets[layer] if t != OUTPUT),
                            default=0)
    return memo[layer]
  neurons = {n: math.prod(shapes[n]) for n in layers}
  if max(neurons.values()) >= _MAX_NEURONS:
    raise ValueError(f'an IF layer has {max(neurons.values())} neurons; exact '
                     f'counts need fewer than {_MAX_NEURONS}')
  return Network(layers=layers, neurons=neurons,
                 fanout=fanout, targets=targets, ann_macs=ann_macs,
                 input_macs=input_macs,
                 depth=max((chain(n) for n in layers), default=0))


def fanout_classes(network: Network) -> dict[str, tuple[np.ndarray,
                                                         np.ndarray]]:
  """Per IF layer: (one-hot ``[positions, K]`` int32 of each position's
  fan-out class, the K fan-out values int64). Counting spikes per class on
  the device and weighting them on the host keeps every sum an exact
  integer, whatever the order of the reduction."""
  out = {}
  for layer, fanout in network.fanout.items():
    values, ids = np.unique(fanout.ravel(), return_inverse=True)
    out[layer] = (np.eye(len(values), dtype=np.int32)[ids.ravel()], values)
  return out


def check_batch(network: Network, batch: int) -> None:
  """Raises ValueError if ``batch`` samples could overflow the int32 sums of
  :func:`class_counts`."""
  if batch * max(network.neurons.values(), default=0) > _MAX_BATCH_SPIKES:
    raise ValueError(f'a batch of {batch} could hold more than 2**31 spikes '
                     'of one layer per step: count smaller batches')


def class_counts(intermediates: PyTree, onehots: dict[str, jax.Array],
                 mask: jax.Array) -> dict[str, jax.Array]:
  """Spikes per step and fan-out class, summed over the unmasked samples.

  Args:
    intermediates: a run's sown values with ``'step_spikes'`` per IF layer,
      ``[S, B, ...spatial]`` (``snn.run_method(..., count_steps=True)``).
    onehots: per IF layer, its ``[positions, K]`` classes
      (:func:`fanout_classes`).
    mask: ``[B]`` 0/1 (padding rows 0).

  Returns:
    ``{layer: int32 [S, K]}``. Jit-able; exact for any sharding of B.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != 'step_spikes':
      continue
    layer = '/'.join(path[:-1])
    steps = value[0]
    # Per sample a float matmul (its partial sums are integers below 2**24,
    # see analyse), then an int32 sum over the unmasked samples.
    per_class = jnp.dot(steps.reshape(steps.shape[:2] + (-1,)).astype(
        jnp.float32), onehots[layer].astype(jnp.float32)).astype(jnp.int32)
    out[layer] = jnp.sum(per_class * mask.astype(jnp.int32)[None, :, None],
                         axis=1)
  return out


def accumulate(total: dict | None, counts: dict) -> dict:
  """Adds one batch's :func:`class_counts` into a running int64 total."""
  counts = {k: np.asarray(v, np.int64) for k, v in counts.items()}
  if total is None:
    return counts
  return {k: total[k] + counts[k] for k in total}


def run_layout(steps: int, calibration: Calibration | None
               ) -> tuple[int, int]:
  """(probe steps, main-run steps) of the spikes a method's run records for
  accuracies up to ``steps``: the layerwise fused run records its
  ``max(ρ, steps)`` steps; the global schedule its ``iterations·ρ`` probe
  steps, then ``steps``; an uncalibrated method ``steps``."""
  if calibration is None:
    return 0, steps
  if calibration.schedule == 'layerwise':
    return 0, max(steps, calibration.rho)
  return calibration.iterations * calibration.rho, steps


def summarize(network: Network, totals: dict[str, dict],
              runs: dict[str, tuple[int, Calibration | None]],
              examples: int, model: CostModel) -> dict:
  """Per-sample SOPs, energy, rates and latency per method and t.

  Args:
    network: :func:`analyse`'s result.
    totals: per method, the summed :func:`class_counts` of its runs.
    runs: per method, (its longest t, its Calibration or None).
    examples: samples counted.
    model: the energy figures.

  Returns:
    A JSON-ready dict (lists index t = 1, 2, ...); see docs/cost.md.
  """
  ann_pj = model.mac_pj * sum(network.ann_macs.values())
  input_pj = model.mac_pj * network.input_macs
  values = {k: v for k, (_, v) in fanout_classes(network).items()}
  out = {'cost_model': dataclasses.asdict(model),
         'ann': {'macs': sum(network.ann_macs.values()), 'energy_pj': ann_pj,
                 'layers': dict(network.ann_macs)},
         'input_macs': network.input_macs, 'depth': network.depth,
         'if_layers': {n: {'neurons': network.neurons[n],
                           'mean_fanout': float(network.fanout[n].mean()),
                           'targets': list(network.targets[n])}
                       for n in network.layers},
         'methods': {}}
  for name, (steps, calibration) in runs.items():
    probe, main = run_layout(steps, calibration)
    t = np.arange(1, steps + 1)
    layerwise = calibration is not None and probe == 0
    emitted = np.maximum(t, calibration.rho) if layerwise else t
    as_run = np.zeros(steps)
    deployed = np.zeros(steps)
    layers, probe_sops = {}, 0
    for layer in network.layers:
      counts = totals[name][layer]
      assert len(counts) == probe + main, (layer, counts.shape, probe, main)
      sops = counts @ values[layer]
      cumulative = np.cumsum(sops[probe:]) / examples
      spikes = np.cumsum(counts[probe:].sum(1)) / examples
      probe_sops += sops[:probe].sum() / examples
      as_run += cumulative[emitted - 1]
      last = network.targets[layer] == (OUTPUT,)  # emits t steps, not ρ
      deployed += cumulative[(t if last else emitted) - 1]
      layers[layer] = {
          'rate': (spikes[:steps] / (network.neurons[layer] * t)).tolist(),
          'sops': cumulative[:steps].tolist(),
          'probe_sops': float(sops[:probe].sum() / examples)}
    as_run += probe_sops
    deployed += probe_sops
    energy = lambda s: input_pj + model.ac_pj * s
    neurons = sum(network.neurons.values())
    out['methods'][name] = {
        'sops': as_run.tolist(),
        'energy_pj': energy(as_run).tolist(),
        'relative_energy': (energy(as_run) / ann_pj).tolist(),
        'deployment': {
            'sops': deployed.tolist(),
            'energy_pj': energy(deployed).tolist(),
            'relative_energy': (energy(deployed) / ann_pj).tolist(),
            'latency': (t + (network.depth * calibration.rho if layerwise
                             else probe)).tolist(),
            # Layerwise: every layer buffers its first ρ input currents and
            # runs its probe on them before replaying them.
            'buffered_currents': (calibration.rho * neurons if layerwise
                                  else 0),
            'probe_neuron_updates': (calibration.iterations * calibration.rho
                                     * neurons if layerwise else 0)},
        'layers': layers}
  return out

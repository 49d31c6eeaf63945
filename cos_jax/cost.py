"""What the spikes cost: synaptic operations, firing rates and energy.

A spike of an IF layer drives a fixed set of synapses in the linear layer(s)
that read the layer (its fan-out); each is one synaptic operation (SOP), an
accumulate. The ANN instead spends a multiply-accumulate (MAC) per weight and
input. The SNN's first linear layer reads the static image, so it costs MACs,
once (docs/semantics.md, "Static input"). docs/cost.md states the counting.

* :func:`analyse` reads a network once: per IF layer its neurons, the fan-out
  of each neuron and the layers it reaches, the ANN's MACs per linear layer and
  the MACs of the layers that read the image. Fan-outs come from the model's
  connectivity twin (``cos_jax.fanout``), so stride, padding, pooling,
  flattening and residual paths count exactly as the model wires them.
* :func:`class_counts` (jit-able, on sharded batches) turns a run's per-step
  spike counts (``SpikingConfig.count_steps``) into exact int32 counts per
  step and fan-out class, padding rows left out.
* :func:`summarize` turns the counts of the counted batches into SOPs, rates
  and energy per method and t, as this implementation computes them and as
  streaming hardware would deploy them, with the standard error over the
  batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cos_jax import fanout, methods, trace_twin
from cos_jax.activation import Activation, model_variables
from cos_jax.settings import SettingsError

PyTree = Any
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
# Images counted by default (convert.py's cost_examples; configs/convert.py
# says why not all).
DEFAULT_COST_EXAMPLES = 512


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
    targets: per IF layer, the IF layers (or :data:`fanout.OUTPUT`) it reaches.
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


def _ann(model: nn.Module) -> nn.Module:
  return model.clone(spiking=None) if getattr(model, 'spiking', None) else model


def _describe(model, variables, image_shape):
  """Shapes of every IF layer and of the output, and the ANN's MACs."""
  if trace_twin.is_traced(model):  # no modules to intercept: its jaxpr's
    return trace_twin.describe(model, variables, image_shape)
  shapes, macs = {}, {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__':
      if isinstance(module, Activation):
        shapes[fanout.module_name(module)] = tuple(out.shape[1:])
      elif isinstance(module, fanout.LINEAR):
        kernel = module.get_variable('params', 'kernel')
        macs[fanout.module_name(module)] = (math.prod(out.shape[1:])
                               * math.prod(kernel.shape[:-1]))
    return out

  def forward(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)
  out = jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(
      (1,) + tuple(image_shape), jnp.float32))
  shapes[fanout.OUTPUT] = tuple(out.shape[1:])
  return shapes, macs


def ann_macs(model: nn.Module, variables: PyTree, image_shape
             ) -> dict[str, int]:
  """MACs per sample of each conv and dense layer of the ANN (``kernel
  size × input channels × output elements``; from shapes only, so
  ``variables`` may be abstract)."""
  return _describe(_ann(model), variables, tuple(image_shape))[1]


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
  variables = model_variables(variables)
  image_shape = tuple(image_shape)
  shapes, ann_macs = _describe(model, variables, image_shape)
  layers = tuple(n for n in shapes if n != fanout.OUTPUT)
  fanouts, targets = {}, {}
  for layer in layers:
    fanouts[layer], targets[layer] = fanout.layer_fanout(
        model, variables, image_shape, shapes, layer)
  fed = fanout.fed_by_image(model, variables, image_shape, shapes)
  input_macs = sum(ann_macs[name] for name, seen in fed.items() if seen)
  memo = {}

  def chain(layer):  # IF layers on the longest path starting at ``layer``
    if layer not in memo:
      memo[layer] = 1 + max((chain(t) for t in targets[layer]
                             if t != fanout.OUTPUT),
                            default=0)
    return memo[layer]
  neurons = {n: math.prod(shapes[n]) for n in layers}
  if max(neurons.values()) >= _MAX_NEURONS:
    raise ValueError(f'an IF layer has {max(neurons.values())} neurons; exact '
                     f'counts need fewer than {_MAX_NEURONS}')
  return Network(layers=layers, neurons=neurons,
                 fanout=fanouts, targets=targets, ann_macs=ann_macs,
                 input_macs=input_macs,
                 depth=max((chain(n) for n in layers), default=0))


def fanout_classes(network: Network) -> dict[str, tuple[np.ndarray,
                                                         np.ndarray]]:
  """Per IF layer: (one-hot ``[positions, K]`` int32 of each position's
  fan-out class, the K fan-out values int64). Counting spikes per class on
  the device and weighting them on the host keeps every sum an exact
  integer, whatever the order of the reduction."""
  out = {}
  for layer, synapses in network.fanout.items():
    values, ids = np.unique(synapses.ravel(), return_inverse=True)
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


class Counter:
  """The spike counts of the counted batches: add a batch, then summarise.

  A sample of the batches is counted (the first ``examples`` images in
  whole batches; None: all). Methods that replay from their v0
  (``Method.run == FUSED``) are then counted by one program shared by all
  of them, rerun from each v0 over the longest of their runs: IF neurons
  are causal, so its first t steps are those of every shorter run. The
  others (probe passes, SRP's masks, per-T corrections), and every method
  when all images are counted, count inside their own run (docs/cost.md).

  Args:
    network: :func:`analyse`'s result.
    runs: ``{key: (bound Method, T)}``, the runs of one batch
      (``ConversionSettings.runs``).
    examples: images to count (None: every image).
    place: puts a host array on the devices (replicated).
  """

  def __init__(self, network: Network, runs: dict, examples: int | None,
               place=lambda x: x):
    self.network, self.runs, self.examples = network, runs, examples
    self.onehots = {layer: place(onehot) for layer, (onehot, _) in
                    fanout_classes(network).items()}
    self.batches = []
    self._reruns = {method.name for method, _ in runs.values()
                    if examples is not None and method.run == methods.FUSED}
    self.rerun_steps = max((sum(method.counted(T)) for method, T in
                            runs.values() if method.name in self._reruns),
                           default=None)

  def reruns(self, method: methods.Method) -> bool:
    """Whether ``method`` is counted by the shared program from its v0."""
    return method.name in self._reruns

  def by_rule(self, method: methods.Method) -> bool:
    """Whether its v0 is rebuilt from its rule rather than kept from its
    run (as an output, a v0 set by rule alone would be written out on every
    batch)."""
    return not (method.probes_own_input or method.needs_key)

  def wants_more(self) -> bool:
    """Whether the next batch is counted."""
    return (self.examples is None
            or sum(n for n, _ in self.batches) < self.examples)

  def add(self, n: int, counts: dict) -> None:
    """One batch: its real rows ``n`` and ``{key: {layer: [S, K]}}`` (a
    rerun spans the longest run's steps: each keeps its own)."""
    if n:
      self.batches.append((n, {
          key: {layer: c[:sum(method.counted(T))]
                for layer, c in counts[key].items()}
          for key, (method, T) in self.runs.items()}))

  def summary(self, model: CostModel) -> dict:
    """:func:`summarize` of the counted batches."""
    return summarize(self.network, self.batches, self.runs, model)


def summarize(network: Network, batches: list[tuple[int, dict]],
              runs: dict[str, tuple[methods.Method, int]],
              model: CostModel) -> dict:
  """Per-sample SOPs, energy, rates and latency per method and t.

  Args:
    network: :func:`analyse`'s result.
    batches: per counted batch, (its real samples, {run key: its
      :func:`class_counts` on the host}).
    runs: per run key, (its bound Method, its T). The runs of a method
      corrected per T (keys ``'pc@4'``) merge into one entry: its values at
      each run's T, None at the other t.
    model: the energy figures.

  Returns:
    A JSON-ready dict (lists index t = 1, 2, ...); see docs/cost.md. Each
    method's ``'sops_stderr'`` is the standard error of its SOPs per sample
    over the counted batches (a ratio estimator's; None from one batch).
  """
  examples = sum(n for n, _ in batches)
  ann_pj = model.mac_pj * sum(network.ann_macs.values())
  input_pj = model.mac_pj * network.input_macs
  out = {'cost_model': dataclasses.asdict(model),
         'examples': examples, 'batches': len(batches),
         'ann': {'macs': sum(network.ann_macs.values()), 'energy_pj': ann_pj,
                 'layers': dict(network.ann_macs)},
         'input_macs': network.input_macs, 'depth': network.depth,
         'if_layers': {n: {'neurons': network.neurons[n],
                           'mean_fanout': float(network.fanout[n].mean()),
                           'targets': list(network.targets[n])}
                       for n in network.layers},
         'methods': {}}
  energy = lambda s: input_pj + model.ac_pj * s
  neurons = sum(network.neurons.values())
  values = {k: v for k, (_, v) in fanout_classes(network).items()}
  for key, (method, T) in runs.items():
    steps = method.steps(T)
    totals = {layer: sum(np.asarray(counts[key][layer], np.int64)
                         for _, counts in batches)
              for layer in network.layers}
    as_run, deployed, layers = _per_sample(network, values, totals, method,
                                           T, examples)
    per_batch = [_per_sample(network, values, counts[key], method, T, n)[0]
                 for n, counts in batches]
    buffered, probe_updates = method.buffers(neurons)
    entry = {
        'sops': as_run.tolist(),
        'sops_stderr': _standard_error([n for n, _ in batches], per_batch,
                                       as_run),
        'energy_pj': energy(as_run).tolist(),
        'relative_energy': (energy(as_run) / ann_pj).tolist(),
        'deployment': {
            'sops': deployed.tolist(),
            'energy_pj': energy(deployed).tolist(),
            'relative_energy': (energy(deployed) / ann_pj).tolist(),
            'latency': [method.latency(t, network.depth)
                        for t in range(1, steps + 1)],
            'buffered_currents': buffered,
            'probe_neuron_updates': probe_updates},
        'layers': layers}
    if key == method.name:
      out['methods'][key] = entry
    else:
      _merge_at(out['methods'].setdefault(method.name, {}), entry, T)
  return out


def _merge_at(merged: dict, entry: dict, T: int) -> None:
  """Puts the value at t = T of every per-t list of ``entry`` into
  ``merged``, in lists that grow with None (a per-T correction's runs)."""
  for name, value in entry.items():
    if isinstance(value, dict):
      _merge_at(merged.setdefault(name, {}), value, T)
    elif isinstance(value, list) and len(value) == T:
      target = merged.setdefault(name, [])
      target.extend([None] * (T - len(target)))
      target[T - 1] = value[T - 1]
    else:
      merged[name] = value


def _per_sample(network: Network, values: dict[str, np.ndarray],
                counts: dict[str, np.ndarray], method: methods.Method,
                T: int, examples: int):
  """(SOPs per sample as run [steps], as deployed [steps], per-layer rates
  and SOPs) from summed class counts ``{layer: [pre + main, K]}``
  (``method.counted(T)``) and each layer's fan-out class values
  (:func:`fanout_classes`)."""
  pre, main = method.counted(T)
  steps = method.steps(T)
  t = np.arange(1, steps + 1)
  emitted = np.array([method.emitted(i) for i in t])
  as_run, deployed = np.zeros(steps), np.zeros(steps)
  layers, pre_sops = {}, 0
  for layer in network.layers:
    layer_counts = np.asarray(counts[layer], np.int64)
    assert len(layer_counts) == pre + main, (layer, layer_counts.shape,
                                             pre, main)
    sops = layer_counts @ values[layer]
    cumulative = np.cumsum(sops[pre:]) / examples
    spikes = np.cumsum(layer_counts[pre:].sum(1)) / examples
    pre_sops += sops[:pre].sum() / examples
    as_run += cumulative[emitted - 1]
    # A streaming chip's last IF layer emits t steps into the output, even
    # where the fused run computed its ρ probe steps.
    last = network.targets[layer] == (fanout.OUTPUT,)
    deployed += cumulative[(t if last else emitted) - 1]
    layers[layer] = {
        'rate': (spikes[:steps] / (network.neurons[layer] * t)).tolist(),
        'sops': cumulative[:steps].tolist(),
        'probe_sops': float(sops[:pre].sum() / examples)}
  return as_run + pre_sops, deployed + pre_sops, layers


def _standard_error(sizes: list[int], means: list[np.ndarray],
                    mean: np.ndarray) -> list[float] | None:
  """Standard error of a mean per sample estimated from batches of
  ``sizes`` samples with per-sample ``means`` (ratio estimator, batches as
  the sampled units); None from a single batch."""
  if len(sizes) < 2:
    return None
  sizes = np.asarray(sizes, np.float64)[:, None]
  spread = np.sum((sizes * (np.stack(means) - mean)) ** 2, axis=0)
  k = len(sizes)
  return (np.sqrt(spread * k / (k - 1)) / sizes.sum()).tolist()

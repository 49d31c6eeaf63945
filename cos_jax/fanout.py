"""Fan-outs: which synapses a spike drives, read off the model's own code.

A *connectivity twin* of a network is the network's forward pass with every
conv and dense layer replaced by its 0/1 connection pattern (BatchNorm, being
diagonal, by the identity), so stride, padding, pooling, flattening and
residual paths count exactly as the model wires them. Probing an IF layer's
neurons through it (whole layer, one slab per spatial index, check points)
gives each neuron's fan-out without building a dense connection matrix.
``cos_jax.cost`` builds on it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cos_jax import trace_twin
from cos_jax.activation import Activation

OUTPUT = 'output'  # the network's (non-spiking) output, as a fan-out target
LINEAR = (nn.Conv, nn.Dense)
# Probe patterns run through the twin this many neuron-values at a time.
PROBE_VALUES = 2**24


def module_name(module: nn.Module) -> str:
  return '/'.join(module.path)


def connectivity(module: nn.Module, x: jax.Array) -> jax.Array:
  """A conv or dense layer with all weights 1 on a nonnegative input, its
  output features collapsed to one (the layers are channel-dense): positive
  exactly where some nonzero input is connected."""
  summed = jnp.abs(x).sum(-1, keepdims=True)
  if isinstance(module, nn.Dense):
    return summed
  if module.feature_group_count != 1:
    raise ValueError(f'{module_name(module)}: grouped convolutions are not counted')
  size = module.kernel_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * (
      x.ndim - 2)
  twin = module.clone(parent=None, features=1, use_bias=False)
  return twin.apply({'params': {'kernel': jnp.ones(size + (1, 1))}}, summed)


def twin(model, variables, images, outputs: dict, shapes: dict):
  """The connectivity twin's forward pass.

  Every IF layer outputs ``outputs[name]`` (zeros of batch 1 if absent),
  whatever its input. Returns ({IF layer or OUTPUT: its input}, {linear
  layer: its input}); arrays whose last axis is 1 where the real one is
  wider hold the same value for every feature. A traced model's twin is
  read off its jaxpr (``cos_jax.trace_twin``).
  """
  if trace_twin.is_traced(model):
    return trace_twin.twin(model, variables, images, outputs, shapes)
  inputs, linear_inputs, inside = {}, {}, []

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if inside or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, Activation):
      inputs[module_name(module)] = args[0]
      return outputs.get(module_name(module), jnp.zeros((1,) + shapes[module_name(module)]))
    if isinstance(module, nn.BatchNorm):
      return args[0]
    if isinstance(module, LINEAR):
      linear_inputs[module_name(module)] = args[0]
      inside.append(module)  # the twin layer itself is a Conv: run it plainly
      try:
        return connectivity(module, args[0])
      finally:
        inside.pop()
    if type(module).__module__.startswith('flax.linen') and not isinstance(
        module, (nn.Sequential, nn.Dropout)):
      raise ValueError(f'{module_name(module)}: cost counting knows conv, dense, '
                       f'BatchNorm and Activation layers, not '
                       f'{type(module).__name__}')
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    inputs[OUTPUT] = model.apply(variables, images, train=False)
  return inputs, linear_inputs


def probe_pattern(spec: jax.Array, shape: tuple[int, ...]) -> jax.Array:
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
def reach_counts(model, variables, specs, probed, image, *, shapes,
                  image_shape):
  """Neurons of every target reached by each probe of ``specs`` [P, m+1]
  over the IF layer numbered ``probed``, and which linear layers see a
  nonzero input, on an image of ``image`` everywhere (both traced: one
  compilation serves every layer; the other layers output zeros)."""
  shapes = dict(shapes)
  outputs = {
      layer: jax.vmap(lambda s, shape=shapes[layer]: probe_pattern(
          s, shape))(specs) * (probed == i)
      for i, layer in enumerate(n for n in shapes if n != OUTPUT)}
  inputs, linear_inputs = twin(model, variables, jnp.full(
      (1,) + image_shape, image), outputs, shapes)
  counts = {}
  for target, x in inputs.items():
    features = math.prod(x.shape[1:])
    wide = math.prod(shapes[target]) // features  # a collapsed feature axis
    reached = jnp.sum(x != 0, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)
    counts[target] = jnp.broadcast_to(reached * wide, specs.shape[:1])
  return counts, {name: jnp.any(x != 0) for name, x in linear_inputs.items()}


def probe_specs(shape, rank):
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


def probe_chunk(shapes):
  """Probes per twin pass: one size for every layer (one compilation)."""
  layers = [n for n in shapes if n != OUTPUT]
  most = max(1 + sum(shapes[n][:-1]) + 2**(len(shapes[n]) - 1) + 2
             for n in layers)
  return max(1, min(most, PROBE_VALUES // sum(
      math.prod(shapes[n]) for n in layers)))


def layer_fanout(model, variables, image_shape, shapes, layer):
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
  specs, checks, centre = probe_specs(shape, rank)
  chunk = probe_chunk(shapes)
  pieces = []
  for start in range(0, len(specs), chunk):
    part = specs[start:start + chunk]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
    out, _ = reach_counts(model, variables, padded, layers.index(layer),
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


def fed_by_image(model, variables, image_shape, shapes) -> dict[str, bool]:
  """Which linear layers see the image (a nonzero input with every IF layer
  silent): the layers whose MACs the SNN spends on the static input."""
  layers = [n for n in shapes if n != OUTPUT]
  rank = max(len(shapes[n]) - 1 for n in layers)
  _, fed = reach_counts(  # no layer probed, an image of ones
      model, variables, np.zeros((probe_chunk(shapes), rank + 1), np.int32),
      -1, 1.0, shapes=tuple(shapes.items()), image_shape=image_shape)
  return {name: bool(seen) for name, seen in fed.items()}

"""The connectivity twin of a traced model, read off its jaxpr.

``cos_jax.fanout`` finds fan-outs by running a network's *connectivity twin*:
the forward pass with every conv and dense layer replaced by its 0/1
connection pattern. A zoo model's twin intercepts its Flax modules; a
:class:`~cos_jax.traced.TracedModel` has none, so its twin evaluates the
traced jaxpr equation by equation (:func:`cos_jax.jaxpr_walk.evaluate`) on
values of two kinds:

* *data*: depends on the image or on a site (an IF layer); held as a
  nonnegative array whose nonzero entries are the positions a probe reaches;
* *const*: depends on the parameters alone; computed as the model does.

The image enters as ``|image|``. On data, ``conv_general_dilated`` and
``dot_general`` with one data operand are the linear layers: the same
operation (strides, padding, dilation, groups, contraction) with an all-ones
kernel, the 0/1 connection pattern (a channel-dense conv over the feature
sum with a one-feature kernel, broadcast, as the zoo twin computes it); its
MACs are recorded from the equation's shapes. A product or quotient by a
const (BatchNorm's scale, average pooling's 1/n) and a negation are the
identity; adding a const (a bias, BatchNorm's shift) keeps the data operand
alone; adding or subtracting two data values is ``|a| + |b|`` (a residual
join). Reductions, reshapes, window sums, transposes, pads, slices, gathers,
concatenations and ``select_n`` on a const condition apply as they are, a
const in a value slot taken as zero. Calls are inlined; anything else on
data is refused in one line that names the operation and the source line.
Sites output their probes, whatever their input, as in the zoo twin.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cos_jax import jaxpr_walk
from cos_jax.traced import NET, TracedModel

OUTPUT = 'output'  # as cos_jax.fanout.OUTPUT
LINEAR = ('conv_general_dilated', 'dot_general')
# Applied as they are; the operand slots that carry the value (the others,
# indices or a padding value, must be const).
_STRUCTURAL = {name: (0,) for name in (
    'reshape', 'broadcast_in_dim', 'transpose', 'squeeze', 'expand_dims',
    'slice', 'reduce_sum', 'reduce_window_sum', 'rev', 'copy', 'copy_p',
    'cumsum', 'sharding_constraint', 'reduce_precision', 'mesh_cast',
    'reshard', 'dynamic_slice', 'gather', 'pad', 'convert_element_type')}
_STRUCTURAL.update({'dynamic_update_slice': (0, 1)})
_SUMS = frozenset({'add', 'add_any', 'sub'})
_SCALES = frozenset({'mul', 'div', 'neg'})  # the first data operand kept


class Data:
  """A value that depends on the image or a site: ``x >= 0``, nonzero where
  a probe (or the image) reaches."""

  def __init__(self, x):
    self.x = x


def is_traced(model) -> bool:
  return isinstance(model, TracedModel)


def _refuse(eqn, what: str = ''):
  raise ValueError(
      f'{jaxpr_walk.where(eqn)}: cost counting does not cover '
      f'{what or eqn.primitive.name} on a value that depends on the image or '
      'a ReLU (it knows conv, dot, sums, scaling by parameters, pooling and '
      'reshapes)')


def linear_stacks(jaxpr, prefix: str = '') -> list[tuple[str, str]]:
  """(name stack, primitive) of every conv / dot equation, in the order
  :func:`jaxpr_walk.evaluate` (``inline_all``) meets them."""
  stacks = []
  for eqn in jaxpr.eqns:
    stack = '/'.join(s for s in (prefix, str(eqn.source_info.name_stack))
                     if s)
    if jaxpr_walk.is_relu(eqn):
      continue
    if (inner := jaxpr_walk.body(eqn)) is not None:
      stacks += linear_stacks(inner[0], stack)
    elif eqn.primitive.name in LINEAR:
      stacks.append((stack, eqn.primitive.name))
  return stacks


def linear_names(stacks) -> tuple[str, ...]:
  """A unique name per linear equation: its module path where that path
  holds one conv / dot, else ``<path>/<primitive>_<j>`` (``<primitive>_<k>``
  in trace order where there is no path), as sites are named."""
  return jaxpr_walk.site_names([stack for stack, _ in stacks],
                               [primitive for _, primitive in stacks])


def _macs(eqn) -> int:
  """Multiply-accumulates of one conv / dot (the whole batch)."""
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == 'conv_general_dilated':
    kernel = eqn.invars[1].aval.shape
    out_features = eqn.params['dimension_numbers'].rhs_spec[0]
    return math.prod(out) * math.prod(kernel) // kernel[out_features]
  (contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return math.prod(out) * math.prod(lhs[d] for d in contract)


def _channel_dense(eqn, data) -> bool:
  """A conv of data by a const kernel, every output feature reading every
  input feature."""
  return (eqn.primitive.name == 'conv_general_dilated' and data[0]
          and eqn.params['feature_group_count'] == 1
          and eqn.params['batch_group_count'] == 1)


def _collapsed_conv(eqn, x, out):
  """An all-ones conv of ``x`` (channel-dense): every output feature is the
  same window sum of ``x`` summed over its features, so that sum is
  convolved with a one-feature kernel and broadcast (as the zoo twin does,
  at a conv's cost over one channel)."""
  spec = eqn.params['dimension_numbers']
  summed = jnp.sum(x, axis=spec.lhs_spec[1], keepdims=True)
  kernel = list(eqn.invars[1].aval.shape)
  kernel[spec.rhs_spec[0]] = kernel[spec.rhs_spec[1]] = 1
  y, = jaxpr_walk.bind(eqn, [summed, jnp.ones(kernel, x.dtype)])
  return jnp.broadcast_to(y, out.shape).astype(out.dtype)


def _walk(model: TracedModel, net, images, site_outputs):
  """The twin on ``images`` (batch 1 in the counts): each site outputs
  ``site_outputs(name, input)``. Returns ({site or OUTPUT: its input},
  {linear layer: its input}, {linear layer: MACs}, {site: input shape})."""
  closed = model.program.jaxpr(net, images)
  names = linear_names(linear_stacks(closed.jaxpr))
  net_leaves, image_leaves = (jax.tree.leaves(net),
                              jax.tree.leaves(images))
  args = net_leaves + [Data(jnp.abs(x)) for x in image_leaves]
  inputs, linear_inputs, macs, shapes = {}, {}, {}, {}
  order = iter(names)

  def site(k, x):
    name = model.sites[k]
    x = x.x if isinstance(x, Data) else jnp.zeros_like(x)
    inputs[name], shapes[name] = x, tuple(x.shape[1:])
    return Data(jnp.abs(site_outputs(name, x)))

  def apply(eqn, values):
    primitive = eqn.primitive.name
    linear = next(order) if primitive in LINEAR else None
    data = [isinstance(v, Data) for v in values]
    if not any(data):
      return jaxpr_walk.bind(eqn, values)
    xs = [v.x if d else v for v, d in zip(values, data)]
    avals = [v.aval for v in eqn.outvars]
    if primitive in LINEAR:
      if all(data):
        _refuse(eqn, f'{primitive} of two such values')
      k = data.index(True)
      linear_inputs[linear], macs[linear] = xs[k], _macs(eqn)
      if _channel_dense(eqn, data):
        return [Data(_collapsed_conv(eqn, xs[0], avals[0]))]
      pattern = [x if d else jnp.ones_like(x) for x, d in zip(xs, data)]
      return [Data(y) for y in jaxpr_walk.bind(eqn, pattern)]
    if primitive in _SUMS:
      total = sum(jnp.broadcast_to(x, avals[0].shape) for x, d in
                  zip(xs, data) if d)
      return [Data(total.astype(avals[0].dtype))]
    if primitive in _SCALES:
      if primitive == 'mul' and all(data):
        _refuse(eqn, 'a product of two such values (mul)')
      if primitive == 'div' and data[1]:
        _refuse(eqn, 'a division by such a value')
      x = jnp.broadcast_to(xs[data.index(True)], avals[0].shape)
      return [Data(x.astype(avals[0].dtype))]
    if primitive == 'select_n' and not data[0]:
      slots = range(1, len(xs))
    elif primitive == 'concatenate':
      slots = range(len(xs))
    elif primitive in _STRUCTURAL:
      slots = _STRUCTURAL[primitive]
      if primitive == 'convert_element_type' and not jnp.issubdtype(
          eqn.params['new_dtype'], jnp.floating):
        _refuse(eqn, 'a conversion to an integer type')
    else:
      _refuse(eqn)
    if any(d and i not in slots for i, d in enumerate(data)):
      _refuse(eqn, f'{primitive} with such a value as an index or padding')
    zeroed = set(slots) | ({1} if primitive == 'pad' else set())
    operands = [x if d or i not in zeroed else jnp.zeros_like(x)
                for i, (x, d) in enumerate(zip(xs, data))]
    return [Data(y) for y in jaxpr_walk.bind(eqn, operands)]

  out = jaxpr_walk.evaluate(closed.jaxpr, closed.consts, args, site=site,
                            apply=apply, inline_all=True)
  if len(out) != 1:
    raise ValueError(f'the traced function returns {len(out)} arrays')
  logits = out[0]
  inputs[OUTPUT] = (logits.x if isinstance(logits, Data)
                    else jnp.zeros_like(logits))
  return inputs, linear_inputs, macs, shapes


def twin(model: TracedModel, variables, images, outputs: dict,
         shapes: dict):
  """``cos_jax.fanout.twin`` of a traced model: ({site or OUTPUT: its
  input}, {linear layer: its input}) on ``images`` of batch 1, each site
  outputting ``outputs[name]`` ``[P, ...]`` (zeros if absent), all P probes
  at once (``vmap``), so every array has a leading axis P."""
  if images.shape[0] != 1:
    raise ValueError(f'the twin runs on one image, got {images.shape[0]}')
  net = variables['params'][NET]
  probes = max((len(x) for x in outputs.values()), default=1)
  batched = {name: jnp.broadcast_to(outputs.get(name, jnp.zeros(
      (1,) + tuple(shapes[name]))), (probes,) + tuple(shapes[name]))
             for name in model.sites}

  def one(probe):
    return _walk(model, net, images,
                 lambda name, _: probe[name][None])[:2]
  inputs, linear_inputs = jax.vmap(one)(batched)
  merge = lambda x: x.reshape((-1,) + x.shape[2:])  # [P, 1, ...] -> [P, ...]
  return jax.tree.map(merge, inputs), jax.tree.map(merge, linear_inputs)


def describe(model: TracedModel, variables, image_shape):
  """``cos_jax.cost._describe`` of a traced model: ({site: its shape, OUTPUT:
  the logits' shape}, {linear layer: the ANN's MACs per sample}), from the
  jaxpr at batch 1 (shapes only)."""
  found = {}

  def walk(net, images):
    inputs, _, macs, shapes = _walk(model, net, images,
                                    lambda _, x: jnp.zeros_like(x))
    found.update(macs=macs, shapes={**shapes, OUTPUT: tuple(
        inputs[OUTPUT].shape[1:])})
    return inputs[OUTPUT]
  jax.eval_shape(walk, variables['params'][NET], jax.ShapeDtypeStruct(
      (1,) + tuple(image_shape), jnp.float32))
  return found['shapes'], found['macs']

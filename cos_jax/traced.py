"""Any JAX network in: a function's ReLU calls become QCFS / IF layers.

:func:`trace` turns ``fn(variables, images) -> logits``, written in any JAX
framework (Flax NNX or Linen, Equinox, plain ``jax.numpy``), into a model that
every function of :mod:`cos_jax.snn` accepts: each ``jax.nn.relu`` call is an
activation site, run as :class:`~cos_jax.activation.Activation` (the zoo's
slot, so the neuron, method and calibration logic is the same code). The
function is traced to a jaxpr once per input shape and evaluated equation by
equation:

* the ANN: every site is a QCFS activation with its own threshold;
* the SNN: a value that depends on no site (the image through the first
  layers) is computed once, as in the ANN; a value that does carries a time
  axis after its batch axis, ``[B, T, ...]``, and the equations on it run on
  all steps at once: a conv on the time-folded batch ``[B·T, ...]`` (the
  zoo's sample-major folding, so a batch sharded over devices stays
  sharded), anything else under ``jax.vmap`` over the time axis; each site
  is the zoo's IF slot on the folded currents.

:func:`cos_jax.with_qcfs` (:mod:`cos_jax.qcfs_function`) applies the same
substitution to a user's training-mode function, with the same site names, so
its trained thresholds feed the SNN; :mod:`cos_jax.zoo_trace` reads the zoo's
own models through the same jaxpr.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cos_jax import neuron
from cos_jax.activation import Activation, SpikingConfig
from cos_jax.jaxpr_walk import (NotConvertible, bind, body,
                                check_network, evaluate, site_names,
                                site_stacks)
from cos_jax.settings import check_positive_int

PyTree = Any
NET = 'net'  # the key of the user's variables in the traced model's params


def _array_leaves(tree: PyTree, what: str) -> None:
  """Refuses a leaf that is not an array or a number (one line)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float,
                             jax.ShapeDtypeStruct)):
      raise ValueError(
          f'{what}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, '
          'not an array: pass only arrays (e.g. eqx.partition(model, '
          'eqx.is_array)[0]) and close over the rest in the function')


class Program:
  """A traced function: its site names and one jaxpr per input shape.

  Hashed by identity, so a model holding it is a valid ``jit`` static.
  """

  def __init__(self, fn: Callable, sites: tuple[str, ...]):
    self.fn = fn
    self.sites = sites
    self._jaxprs = {}

  def jaxpr(self, *args):
    """The closed jaxpr of ``fn(*args)`` (traced once per shape)."""
    key = trace_key(*args)
    if key not in self._jaxprs:
      closed = jax.make_jaxpr(self.fn)(*args)
      names = site_names(site_stacks(closed.jaxpr))
      if names != self.sites:
        raise NotConvertible(
            f'the function has sites {list(names)} at input shapes {key[1]} '
            f'but {list(self.sites)} when traced first: its ReLUs must not '
            'depend on the batch size')
      self._jaxprs[key] = closed
    return self._jaxprs[key]


class Temporal:
  """A value with a time axis: ``[B, T, ...]`` for a value ``[B, ...]`` (time
  right after the leading, batch, axis: folded, it is the zoo's sample-major
  ``[B·T, ...]``, so a device's shard of the batch holds whole time series),
  ``[T]`` for a scalar."""

  def __init__(self, x, axis: int):
    self.x, self.axis = x, axis

  @property
  def steps(self) -> int:
    return self.x.shape[self.axis]


def _time_axis(aval) -> int:
  return min(1, aval.ndim)


def _conv_folded(eqn, lhs: Temporal, rhs):
  """A convolution whose input carries time: time folded into the batch
  sample-major (a reshape, no copy), as the zoo's layers see it."""
  x = lhs.x
  folded = x.reshape((-1,) + x.shape[2:])
  out = bind(eqn, [folded, rhs])[0]
  return [Temporal(out.reshape(x.shape[:2] + out.shape[1:]), 1)]


def _static_cond(eqn, values):
  """A cond on a static index (e.g. lax.platform_dependent) whose operands
  carry time: each branch evaluated here, so its equations get these rules
  too. Outputs carry time in every branch."""
  timed = [isinstance(v, Temporal) for v in values[1:]]
  steps = next(v.steps for v in values[1:] if isinstance(v, Temporal))
  out_axes = [_time_axis(v.aval) for v in eqn.outvars]

  def branch_fn(closed):
    def run(*arrays):
      operands = [Temporal(a, _time_axis(v.aval)) if t else a for a, t, v in
                  zip(arrays, timed, eqn.invars[1:])]
      outs = evaluate(closed.jaxpr, closed.consts, operands,
                      site=None, apply=_apply_in_time)
      return [o.x if isinstance(o, Temporal) else jnp.expand_dims(
          o, axis).repeat(steps, axis) for o, axis in zip(outs, out_axes)]
    return run

  outs = jax.lax.switch(values[0], [branch_fn(b) for b in
                                    eqn.params['branches']],
                        *[v.x if t else v for v, t in zip(values[1:], timed)])
  return [Temporal(o, axis) for o, axis in zip(outs, out_axes)]


def _apply_in_time(eqn, values):
  """``eqn`` on values some of which are :class:`Temporal`: run on every
  step at once (a conv folds time into its batch; any other equation runs
  under ``vmap`` over the time axis)."""
  timed = [isinstance(v, Temporal) for v in values]
  if not any(timed):
    return bind(eqn, values)
  name = eqn.primitive.name
  if (name == 'conv_general_dilated' and timed == [True, False]
      and values[0].axis == 1
      and eqn.params['dimension_numbers'].lhs_spec[0] == 0):
    return _conv_folded(eqn, *values)
  if name == 'cond' and not timed[0]:
    return _static_cond(eqn, values)
  out_axes = [_time_axis(v.aval) for v in eqn.outvars]
  outs = jax.vmap(lambda *xs: bind(eqn, xs),
                  in_axes=[v.axis if t else None
                           for v, t in zip(values, timed)],
                  out_axes=out_axes)(*[v.x if t else v
                                       for v, t in zip(values, timed)])
  return [Temporal(o, axis) for o, axis in zip(outs, out_axes)]


class TracedModel(nn.Module):
  """A traced function as a model of the zoo's interface.

  ``model.apply(net_variables, images)`` is the QCFS ANN;
  ``model.clone(spiking=SpikingConfig(...))`` the IF network, whose output
  is time-folded ``[B·T, C]`` sample-major like a zoo model's.

  Attributes:
    program: the traced function (:class:`Program`).
    levels: L, the QCFS quantisation levels of every site.
    spiking: ``None`` for the ANN, else the spiking pass settings.
    threshold_init: λ of a site without a given threshold.
    strict: IF neurons fire on ``u > θ`` (Bu et al.) instead of ``u ≥ θ``.
    plain_relu: the ANN is the function itself (plain ReLU at every site)
      instead of QCFS: a network to convert with balanced thresholds
      (:func:`cos_jax.balance_thresholds`).

  A site's threshold is a scalar or one value per channel (``[C]``, the
  last axis), as given in the variables (:func:`trace`'s ``thresholds``).
  """
  program: Program
  levels: int
  spiking: SpikingConfig | None = None
  threshold_init: float = 8.0
  strict: bool = False
  plain_relu: bool = False

  @property
  def sites(self) -> tuple[str, ...]:
    return self.program.sites

  def step_bytes(self, variables, image) -> int:
    """Bytes of every value the ANN forward of ``image`` (one image, an
    array or ShapeDtypeStruct ``[1, ...]``) computes, each equation's
    outputs: what a spiking block's memory scales with, per image and step
    (``cos_jax.checks.model_facts``)."""
    return _output_bytes(self.program.jaxpr(variables['params'][NET],
                                            image).jaxpr)

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # the traced function is the inference function
    net = self.get_variable('params', NET)
    closed = self.program.jaxpr(net, images)
    args = jax.tree.leaves((net, images))

    def site(k, x):
      static = not isinstance(x, Temporal)
      layer = Activation(self.levels, self.spiking, static_input=static,
                         threshold_init=self.threshold_init,
                         strict=self.strict, plain_relu=self.plain_relu,
                         name=self.sites[k])
      if self.spiking is None:
        return layer(x)
      if not static and x.axis != 1:
        raise NotConvertible(f'site {self.sites[k]} acts on a scalar; a '
                             'ReLU site needs a batch axis')
      # The slot takes and gives time folded sample-major, [B·T, ...]:
      # a reshape of [B, T, ...], no copy.
      out = layer(x if static else x.x.reshape((-1,) + x.x.shape[2:]))
      return Temporal(out.reshape((-1, self.spiking.steps) + out.shape[1:]),
                      1)

    out = evaluate(closed.jaxpr, closed.consts, args, site=site,
                   apply=bind if self.spiking is None else _apply_in_time)
    if len(out) != 1:
      raise NotConvertible(f'the function returns {len(out)} arrays; it must '
                           'return the logits [B, C] alone')
    logits = out[0]
    if self.spiking is None:
      return logits
    if not isinstance(logits, Temporal):
      raise NotConvertible('the logits do not depend on any ReLU')
    if logits.axis != 1:
      raise NotConvertible('the logits must be [B, C]')
    return logits.x.reshape((-1,) + logits.x.shape[2:])  # [B·T, C]


def _thresholds(sites: Sequence[str], thresholds, threshold_init) -> dict:
  """One threshold per site from None, a sequence or a mapping by name."""
  if thresholds is None:
    values = [threshold_init] * len(sites)
  elif isinstance(thresholds, Mapping):
    unknown = sorted(set(thresholds) - set(sites))
    if unknown:
      raise ValueError(f'thresholds names {unknown}, not sites; the sites '
                       f'are {list(sites)}')
    values = [thresholds.get(s, threshold_init) for s in sites]
  else:
    values = list(thresholds)
    if len(values) != len(sites):
      raise ValueError(f'thresholds has {len(values)} values for '
                       f'{len(sites)} sites {list(sites)}')
  out = {}
  for name, value in zip(sites, values):
    if isinstance(value, jax.ShapeDtypeStruct):  # abstract variables (shapes
      out[name] = {'threshold': value}           # only, e.g. memory analysis)
      continue
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(jnp.float32)
    neuron.check_threshold(value)
    out[name] = {'threshold': value}
  return out


def trace(fn: Callable, variables: PyTree, images, *, levels: int,
          thresholds=None, threshold_init: float = 8.0
          ) -> tuple[TracedModel, dict]:
  """A user's network as a QCFS ANN and IF SNN of the zoo's interface.

  Args:
    fn: ``fn(variables, images) -> logits [B, C]``, the inference function,
      any JAX code; each ``jax.nn.relu`` call in it is an activation site.
    variables: its variables, any pytree of arrays.
    images: ``[B, ...]`` example inputs (shape and dtype are what matter).
    levels: L, the QCFS quantisation levels.
    thresholds: None (every site gets ``threshold_init``), a sequence in site
      order, or a mapping from site name to threshold; a threshold is a
      scalar or one value per channel of the site (``[C]``, its last axis).
    threshold_init: the threshold of a site not given one.

  Returns:
    ``(model, net_variables)``: ``model.sites`` names the sites in trace
    order by JAX's name stack where there is one (a Linen module path;
    ``vmap()/...`` under ``jax.vmap``), else ``relu_<k>`` (NNX pushes no
    name stack); ``net_variables = {'params': {'net': variables,
    site: {'threshold': θ}, ...}}``; ``model.apply(net_variables, images)``
    is the QCFS ANN's logits, differentiable in both. ``model`` goes
    wherever a zoo model does (``cos_jax.calibrate``, ``simulate``,
    ``evaluate_snn``, ``init_v0``, the analyses and cost counting).

  Raises:
    cos_jax.jaxpr_walk.NotConvertible: ``fn`` has no ReLU, or an operation
      on a value that depends on a ReLU is not linear (max pooling,
      LayerNorm, a product of spiking values, a data-dependent branch, a
      random operation); the one-line message names the operation, the
      source line and what to use instead.

  Example:
    >>> def mlp(p, x):
    ...   return jax.nn.relu(x.reshape(len(x), -1) @ p['w1']) @ p['w2']
    >>> p = {'w1': jnp.ones((784, 16)) / 784, 'w2': jnp.ones((16, 10))}
    >>> net, net_vars = cos_jax.trace(mlp, p, jnp.ones((2, 28, 28, 1)),
    ...                               levels=4, thresholds=[1.0])
    >>> net.sites
    ('relu_0',)
    >>> cos_jax.evaluate_snn(net, net_vars, jnp.ones((2, 28, 28, 1)), T=4,
    ...                      rho=4).outputs.shape
    (4, 2, 10)
  """
  levels = check_positive_int('levels', levels)
  _array_leaves(variables, 'variables')
  closed = jax.make_jaxpr(fn)(variables, images)
  check_network(closed)
  program = Program(fn, site_names(site_stacks(closed.jaxpr)))
  program._jaxprs[trace_key(variables, images)] = closed
  model = TracedModel(program, levels, threshold_init=threshold_init)
  params = {NET: variables,
            **_thresholds(program.sites, thresholds, threshold_init)}
  return model, {'params': params}


def trace_key(*args):
  """Traced-once key of arguments: their tree and each leaf's shape and
  dtype (arrays, tracers or ShapeDtypeStructs)."""
  leaves, tree = jax.tree.flatten(args)
  return (tree, tuple((tuple(jnp.shape(x)), jnp.dtype(getattr(
      x, 'dtype', None) or jnp.result_type(x))) for x in leaves))


def _output_bytes(jaxpr) -> int:
  """Bytes of every value the equations of ``jaxpr`` compute."""
  total = 0
  for eqn in jaxpr.eqns:
    inner = body(eqn)
    if inner is not None:
      total += _output_bytes(inner[0])
      continue
    total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars
                 if hasattr(v.aval, 'dtype'))
  return total

"""The zoo's hand-built models seen through the jaxpr.

A zoo-style model marks its ReLUs as :class:`~cos_jax.activation.Activation`
slots. Read as ``jax.nn.relu`` calls, the slots are :func:`cos_jax.trace`'s
sites, which gives the zoo path the traced path's linearity check
(:func:`check_model`, run by every function of :mod:`cos_jax.snn`) and the
same network on the traced front end (:func:`trace_zoo_model`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax

from cos_jax.activation import Activation, model_variables
from cos_jax.jaxpr_walk import (NotConvertible, check_network, site_names,
                                site_stacks)
from cos_jax.traced import TracedModel, trace, trace_key

PyTree = Any


def _as_relu(next_fun, args, kwargs, context):
  if isinstance(context.module, Activation) and context.method_name == (
      '__call__'):
    return jax.nn.relu(args[0])
  return next_fun(*args, **kwargs)


_CHECKED = set()


def check_model(model: nn.Module, variables: PyTree, images) -> None:
  """The linearity check of :func:`trace` on a zoo-style model.

  Its Activation slots are read as ReLU sites, so a hand-built model with
  max pooling, LayerNorm or a stray ``jax.nn.relu`` between two slots is
  refused (NotConvertible) instead of converting silently wrong. Each model
  and input shape is checked once; a traced model was checked by
  :func:`trace`.
  """
  if isinstance(model, TracedModel):
    return
  model = model.clone(spiking=None) if hasattr(model, 'spiking') else model
  collections = model_variables(variables)
  key = (model, trace_key(collections, images))
  if key in _CHECKED:
    return
  with nn.intercept_methods(_as_relu):
    closed = jax.make_jaxpr(functools.partial(model.apply, train=False))(
        collections, images)
  stray = len(site_stacks(closed.jaxpr)) - _slots(model, collections, images)
  if stray:
    raise NotConvertible(
        f'{type(model).__name__} calls jax.nn.relu {stray} time(s) outside '
        'its Activation slots; use the Activation slot (the act factory) '
        'for every ReLU')
  check_network(closed, what=type(model).__name__)
  _CHECKED.add(key)


def _slots(model, collections, images) -> int:
  """How many Activation calls one forward pass makes."""
  calls = []

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, Activation) and context.method_name == (
        '__call__'):
      calls.append(1)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    jax.eval_shape(functools.partial(model.apply, train=False), collections,
                   images)
  return len(calls)


def trace_zoo_model(model: nn.Module, variables: PyTree, images
                    ) -> tuple[TracedModel, dict]:
  """A zoo-style model through :func:`trace`: its forward with every
  Activation slot read as ``jax.nn.relu``, the slots' thresholds carried
  over. The same network on the traced front end (what the tests and
  ``benchmarks/zoo_speed.py`` compare with the zoo path).
  """
  collections = model_variables(variables)
  ann = model.clone(spiking=None)

  def fn(v, x):
    with nn.intercept_methods(_as_relu):
      return ann.apply(v, x, train=False)

  names = site_names(site_stacks(jax.make_jaxpr(fn)(collections,
                                                    images).jaxpr))
  flat = traverse_util.flatten_dict(collections['params'])
  # A slot's site is named by its module path under the model's own name.
  thresholds = {s: flat[tuple(s.split('/')[1:]) + ('threshold',)]
                for s in names}
  return trace(fn, collections, images, levels=model.levels,
               thresholds=thresholds, threshold_init=model.threshold_init)

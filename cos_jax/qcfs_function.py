"""A user's training-mode function with QCFS at its ReLU sites.

:func:`with_qcfs` is :func:`cos_jax.trace`'s substitution for training: the
same jaxpr walk and the same site names, so the thresholds a user trains with
it feed the traced SNN directly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cos_jax import neuron
from cos_jax.jaxpr_walk import bind, evaluate, site_names, site_stacks
from cos_jax.settings import check_positive_int


@dataclasses.dataclass(frozen=True)
class QCFSFunction:
  """``fn`` with each ReLU call replaced by QCFS (see :func:`with_qcfs`)."""
  fn: Callable
  levels: int

  def _traced(self, args, kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    arrays = [isinstance(x, (jax.Array, np.ndarray, np.generic))
              for x in leaves]

    def flat(*xs):
      it = iter(xs)
      full = [next(it) if a else x for x, a in zip(leaves, arrays)]
      a, k = jax.tree.unflatten(tree, full)
      return self.fn(*a, **k)

    inputs = [x for x, a in zip(leaves, arrays) if a]
    closed, shape = jax.make_jaxpr(flat, return_shape=True)(*inputs)
    return closed, inputs, shape

  def sites(self, *args, **kwargs) -> tuple[str, ...]:
    """The site names of ``fn(*args, **kwargs)``, as :func:`trace` names
    them."""
    return site_names(site_stacks(self._traced(args, kwargs)[0].jaxpr))

  def init(self, *args, threshold_init: float = 8.0, **kwargs) -> dict:
    """``{site: threshold_init}`` for every site of ``fn(*args, **kwargs)``."""
    return {s: jnp.float32(threshold_init) for s in self.sites(*args,
                                                               **kwargs)}

  def __call__(self, thresholds: Mapping, *args, **kwargs):
    closed, inputs, shape = self._traced(args, kwargs)
    names = site_names(site_stacks(closed.jaxpr))
    missing = [s for s in names if s not in thresholds]
    if missing:
      raise ValueError(f'thresholds lacks the sites {missing} (use '
                       '.init(*args) for the names)')
    out = evaluate(closed.jaxpr, closed.consts, inputs,
                   site=lambda k, x: neuron.qcfs(x, thresholds[names[k]],
                                                 self.levels),
                   apply=bind)
    return jax.tree.unflatten(jax.tree.structure(shape), out)


def with_qcfs(fn: Callable, *, levels: int) -> QCFSFunction:
  """``fn`` with every ``jax.nn.relu`` call a QCFS activation of L levels.

  Works on any function, a training-mode forward included: BatchNorm
  statistics, dropout keys and auxiliary outputs pass through as ``fn``
  returns them. The sites are named as :func:`trace` names them, so the
  thresholds trained here feed the SNN directly.

  Args:
    fn: any function calling ``jax.nn.relu``.
    levels: L.

  Returns:
    ``qfn(thresholds, *args, **kwargs)``, ``thresholds`` a mapping from site
    name to λ, differentiable in it (straight-through floor) and in the
    array arguments; ``qfn.init(*args, **kwargs)`` gives every site λ = 8.

  Example:
    >>> def mlp(p, x):
    ...   return jax.nn.relu(x @ p['w1']) @ p['w2']
    >>> qfn = cos_jax.with_qcfs(mlp, levels=4)
    >>> p = {'w1': jnp.ones((3, 5)), 'w2': jnp.ones((5, 2))}
    >>> thresholds = qfn.init(p, jnp.ones((2, 3)))
    >>> qfn(thresholds, p, jnp.ones((2, 3))).shape
    (2, 2)
  """
  return QCFSFunction(fn, check_positive_int('levels', levels))

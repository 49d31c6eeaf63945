"""Training-free thresholds for a plain-ReLU network: per-channel balancing.

The rule of Bu et al., "Inference-scale ANN-SNN conversion" (CVPR 2025), as
their code (putshua/Inference-scale-ANN-SNN) runs it: ``layers.py``,
``SpikingNeuron2d.optimize`` / ``SpikingNeuron4d.optimize``, driven by
``utils.py``'s ``weight_scaling_iter`` over training batches. Per channel c
of every ReLU position, θ_c starts at 0 and each batch, in one forward pass
of the network in inference mode, does

    θ_c ← θ_c + rate · mean over batch and space of 2 (x − θ_c)·[x > θ_c]
    y   = θ_c − relu(θ_c − relu(x))        (the ReLU clipped at the new θ_c)

so a layer balances on the output of the layers before it, already clipped
at their new thresholds. The network's weights do not change and it stays a
plain ReLU network; only the thresholds of its IF neurons come from here.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cos_jax.activation import Activation, model_variables
from cos_jax.settings import SettingsError, check_positive_int

PyTree = Any

# weight_scaling_iter(train_loader, model, device, iter) with the notebook's
# iter = 10 breaks after the batch i > iter, so it balances on batches
# i = 0..11: twelve batches (of 100 ImageNet training images there).
DEFAULT_BATCHES = 12
# SpikingNeuron2d/4d's c (their default torch.tensor(1.)).
DEFAULT_RATE = 1.0
# A channel whose input was never positive on the balancing batches ends at
# θ_c = 0 there (it then passes nothing on: s·θ = 0). An IF neuron here needs
# θ > 0, so such a channel gets this fraction of its layer's largest θ: it
# passes on at most that much per step, and only for a positive input it
# never had on the training batches.
DEAD_FRACTION = 1e-6


def _balancing(rate):
  """An interceptor running every Activation slot as the balancing step."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, Activation)
            and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    x = args[0]
    if module.has_variable('balance', 'threshold'):
      theta = module.get_variable('balance', 'threshold').astype(x.dtype)
    else:
      theta = jnp.zeros(x.shape[-1:], x.dtype)
    axes = tuple(range(x.ndim - 1))  # batch and space: all but the channel
    theta = theta + rate * jnp.mean(2 * (x - theta) * (x > theta), axes)
    module.put_variable('balance', 'threshold', theta)
    return theta - jax.nn.relu(theta - jax.nn.relu(x))

  return intercept


@functools.partial(jax.jit, static_argnames=('model',))
def _balance_step(model, variables, state, images, rate):
  """One batch of balancing: the thresholds after it (the 'balance' tree)."""
  with nn.intercept_methods(_balancing(rate)):
    _, new = model.apply({**variables, **state}, images, train=False,
                         mutable=['balance'])
  return {'balance': new['balance']}


def balance_thresholds(model: nn.Module, variables: PyTree,
                       batches: Iterable, *,
                       num_batches: int = DEFAULT_BATCHES,
                       rate: float = DEFAULT_RATE) -> dict:
  """Per-channel thresholds of a plain-ReLU network, balanced on data.

  Bu et al.'s ``SpikingNeuron*.optimize`` rule (module docstring): per
  channel θ_c starts at 0; on each batch, in one inference-mode forward pass
  with every ReLU clipped at its balanced threshold,
  ``θ_c ← θ_c + rate · mean(2 (x − θ_c)·[x > θ_c])`` over batch and space.

  Args:
    model: a zoo model with ``plain_relu=True`` or a :func:`cos_jax.trace`
      model of a function with ``jax.nn.relu`` (its thresholds are not
      read). Any model with Activation slots is accepted: a QCFS net's slots
      balance as ReLUs too.
    variables: its variables (``{'params', 'batch_stats'}``).
    batches: training images, an iterable of ``[B, ...]`` arrays; the first
      ``num_batches`` are used, in order.
    num_batches: batches to balance on (the authors: 12, with 100 images
      each).
    rate: c, the step size (the authors: 1).

  Returns:
    ``variables`` with every slot's ``threshold`` replaced by its balanced
    ``[C]`` thresholds (same dtype as the images). A channel whose input
    was never positive gets ``DEAD_FRACTION`` of its layer's largest θ
    instead of 0 (an IF threshold is > 0). The result runs through
    :func:`cos_jax.evaluate_snn` and every other function of the SNN.

  Raises:
    cos_jax.SettingsError: ``num_batches`` not a positive integer, ``rate``
      not a finite number > 0, or no batch given.

  Example:
    >>> relu_net = cos_jax.models.get('small', num_classes=10, levels=4,
    ...                               plain_relu=True)
    >>> relu_vars = relu_net.init(jax.random.key(0), images)
    >>> balanced = cos_jax.balance_thresholds(relu_net, relu_vars, [images])
    >>> balanced['params']['Activation_0']['threshold'].shape   # 32 channels
    (32,)
    >>> cos_jax.evaluate_snn(relu_net, balanced, images, T=4,
    ...                      rho=4).outputs.shape
    (4, 2, 10)
  """
  num_batches = check_positive_int('num_batches', num_batches)
  if (isinstance(rate, bool) or not isinstance(rate, (int, float))
      or not 0 < rate < float('inf')):
    raise SettingsError('rate', f'must be a finite number > 0, got {rate!r}')
  collections = model_variables(variables)
  state, seen = {}, 0
  for images in batches:
    if seen == num_batches:
      break
    images = jnp.asarray(images)
    state = _balance_step(model, collections, state, images,
                          jnp.asarray(rate, images.dtype))
    seen += 1
  if not seen:
    raise SettingsError('batches', 'holds no images to balance on')
  params = variables['params']
  for path, theta in traverse_util.flatten_dict(state['balance']).items():
    largest = jnp.max(theta)
    floor = jnp.where(largest > 0, largest * DEAD_FRACTION, DEAD_FRACTION)
    params = _replace(params, path,
                      jnp.where(theta > 0, theta, floor.astype(theta.dtype)))
  return {**variables, 'params': params}


def _replace(tree, path, value):
  """A copy of nested dicts ``tree`` with ``tree[path[0]][path[1]]... =
  value`` (the other nodes shared, the user's own pytrees untouched)."""
  if path[0] not in tree:
    raise ValueError(f'variables have no parameter {"/".join(path)} for a '
                     'slot\'s threshold')
  head, rest = path[0], path[1:]
  return {**tree, head: value if not rest else _replace(tree[head], rest,
                                                        value)}

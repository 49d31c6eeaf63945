"""Dataset-level calibration: potential correction 'pc' and bias correction 'bc'.

Li et al., ICML 2021 ("A free lunch from ANN: towards efficient, accurate
spiking neural networks calibration"; yhhhli/SNN_Calibration,
``models/calibration.py``, ``emp_bias_corr``). On a calibration batch of
**training** images, layer by layer in forward order, with the earlier layers
already corrected:

* a: the ANN's activation of the layer (``[N, ...]``);
* r: the SNN's mean output over the T steps, ``θ · spikes / T``;
* 'bc' adds ``−mean over batch and space of (r − a)`` (per channel) to the
  layer's bias, i.e. to its input current at every step;
* 'pc' sets the layer's initial potential per neuron to
  ``θ/2 + T · mean over batch of (a − r)``. (The authors' neurons start at 0
  and get θ/(2T) more current per step, θ/2 over the run; their
  ``mem_pot_init`` comes on top of it. Here θ/2 is v(0), so it is added.)

Both depend on T: one correction per T (``convert.py`` measures one per
reported T, docs/comparison.md). A correction is one fixed value per neuron
or channel for every test image; COS's shift is per sample.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cos_jax import methods, snn
from cos_jax.activation import model_variables

PyTree = Any


def _layer_names(tree: PyTree) -> list[tuple[str, ...]]:
  """The leaf paths of a v0-shaped tree, in the order the layers were
  called (Flax creates collections in call order): forward order."""
  return list(traverse_util.flatten_dict(tree))


@functools.partial(jax.jit, static_argnames=('model',))
def _ann_outputs(model, variables, images) -> dict:
  """Each QCFS layer's output a, ``{path (..., 'v0'): [N, ...]}``."""
  _, state = model.apply(
      model_variables(variables),
      images,
      train=False, mutable=['intermediates'])
  flat = traverse_util.flatten_dict(state['intermediates'])
  return {path[:-1] + ('v0',): value[0] for path, value in flat.items()
          if path[-1] == 'ann_output'}


def _mean_outputs(model, variables, images, corrections, method, T,
                  time_chunk) -> dict:
  """Each IF layer's mean output r = θ · spikes / T over a T-step run with
  ``corrections``, ``{path: [N, ...]}``."""
  run = snn.run_method(model, variables, images, None, T=T, method=method,
                       record_steps=T, time_chunk=time_chunk,
                       corrections=corrections)
  flat_params = traverse_util.flatten_dict(variables['params'])
  flat = traverse_util.flatten_dict(run.intermediates)
  return {path[:-1] + ('v0',): value[0] * flat_params[
      path[:-1] + ('threshold',)] / T
          for path, value in flat.items() if path[-1] == 'spike_count'}


def measure(model: nn.Module, variables: PyTree, images: jax.Array, *,
            method: methods.Method, T: int,
            time_chunk: int | None = None) -> dict:
  """The correction of ``method`` ('pc' or 'bc') for T steps.

  Args:
    model, variables: a zoo model and its ``{'params', 'batch_stats'}``.
    images: ``[N, H, W, C]`` training images (the calibration set).
    method: the bound 'pc' or 'bc' method.
    T: the simulation length the correction is for.
    time_chunk: as in :func:`cos_jax.simulate`.

  Returns:
    pc: ``{'v0': tree of [1, ...neuron]}``, θ/2 + T·mean_batch(a − r);
    bc: ``{'shift': tree of [C]}``, the current added to each channel.
    Trees are laid out like the v0 tree (leaf name 'v0'); they are what
    :func:`cos_jax.snn.run_method` takes as ``corrections``.
  """
  start = snn.init_v0(model, variables, images[:1])
  ann = _ann_outputs(model, variables, images)
  flat = traverse_util.flatten_dict(start)
  if method.rule == 'pc':
    current = {'v0': dict(flat)}
  else:
    current = {'shift': {path: jnp.zeros(v.shape[-1:], v.dtype)
                         for path, v in flat.items()}}
  unflat = lambda c: {k: traverse_util.unflatten_dict(v)
                      for k, v in c.items()}
  for path in _layer_names(start):
    r = _mean_outputs(model, variables, images, unflat(current), method, T,
                      time_chunk)[path]
    a = ann[path].astype(r.dtype)
    if method.rule == 'pc':
      current['v0'][path] = flat[path] + T * jnp.mean(a - r, axis=0,
                                                      keepdims=True)
    else:
      spread = tuple(range(r.ndim - 1))  # batch and space: per channel
      current['shift'][path] = current['shift'][path] - jnp.mean(
          r - a, axis=spread)
  return unflat(current)

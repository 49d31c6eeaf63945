"""One spiking pass of a model, whole or in time chunks.

:func:`apply_pass` runs the model's spiking twin (``spiking=SpikingConfig``)
once and unfolds its sample-major ``[B·T, ...]`` rows to ``[T, B, ...]``;
:func:`apply_in_chunks` runs a long pass as a first block and then
``time_chunk`` steps at a time from each layer's final potential. The public
functions of :mod:`cos_jax.snn` are built on these two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from cos_jax.activation import SpikingConfig, model_variables
from cos_jax.blocks import block_steps
from cos_jax.zoo_trace import check_model

PyTree = Any


def _pass_variables(variables: PyTree, v0: PyTree | None,
                     extra: dict | None = None) -> dict:
  out = model_variables(variables)
  if v0 is not None:
    out['v0'] = v0
  return {**out, **(extra or {})}


def apply_pass(model, variables, images, v0, config: SpikingConfig,
           capture: bool = False, key: jax.Array | None = None,
           extra: dict | None = None):
  """One spiking pass; returns (outputs [steps, B, C], mutated collections).

  ``extra``: more read-only collections, SRP's ``'mask'`` or bc's
  ``'shift'`` (trees like the v0 tree)."""
  check_model(model, variables, images)  # once per model and shape
  mutable = []
  if v0 is None or config.method is not None:
    mutable.append('v0')
  if capture or config.count_steps:
    mutable.append('intermediates')
  if config.keep_final_v:
    mutable.append('v_end')
  out, state = model.clone(spiking=config).apply(
      _pass_variables(variables, v0, extra), images, train=False,
      mutable=mutable,
      rngs=None if key is None else {'v0': key})
  # Sample-major time folding (see Activation): [B·T, C] -> [T, B, C].
  outputs = jnp.moveaxis(
      out.reshape((images.shape[0], config.steps) + out.shape[1:]), 1, 0)
  return outputs, dict(state)


def apply_in_chunks(model, variables, images, v0, config: SpikingConfig,
                   capture: bool = False, time_chunk: int | None = None,
                   key: jax.Array | None = None, extra: dict | None = None):
  """:func:`apply_pass` over ``config.steps`` steps, run in time chunks.

  The first chunk runs ``config`` (so a layer-wise probe, which needs its
  first ρ inputs together, and the recorded steps fall inside it) for
  ``max(time_chunk, ρ, record_steps)`` steps; the rest continue from each
  layer's final potential, ``time_chunk`` steps at a time, under a
  ``lax.scan``. Spikes are identical to one long run: only the batch that
  linear layers see changes size. Returns what :func:`apply_pass` returns, the
  collections being those of the first chunk, except that the per-step
  spike counts of ``config.count_steps`` span every chunk.
  """
  first_steps = block_steps(config.steps, config.probe_steps, time_chunk,
                            config.record_steps)
  if config.steps <= first_steps:
    return apply_pass(model, variables, images, v0, config, capture, key, extra)
  outputs, state = apply_pass(
      model, variables, images, v0,
      dataclasses.replace(config, steps=first_steps, keep_final_v=True),
      capture, key, extra)
  v_end = state.pop('v_end')
  full_chunks, remainder = divmod(config.steps - first_steps, time_chunk)
  continue_for = lambda steps, v: apply_pass(
      model, variables, images, v,
      SpikingConfig(steps=steps, keep_final_v=True,
                    count_steps=config.count_steps, masked=config.masked,
                    shifted=config.shifted), extra=extra)
  pieces, counted = [outputs], [state.get('intermediates', {})]
  if full_chunks:
    def one_chunk(v, _):
      out, chunk_state = continue_for(time_chunk, v)
      return chunk_state['v_end'], (out, chunk_state.get('intermediates', {}))
    v_end, (chunked, sown) = jax.lax.scan(one_chunk, v_end,
                                          length=full_chunks)
    pieces.append(chunked.reshape((-1,) + chunked.shape[2:]))
    counted.append(jax.tree.map(merge_leading, sown))
  if remainder:
    out, chunk_state = continue_for(remainder, v_end)
    pieces.append(out)
    counted.append(chunk_state.get('intermediates', {}))
  if config.count_steps:
    state['intermediates'] = join_step_spikes(counted[0], counted)
  return jnp.concatenate(pieces), state


def merge_leading(x):
  """[n, steps, ...] -> [n·steps, ...] (scanned chunks back into one run)."""
  return x.reshape((-1,) + x.shape[2:])


def join_step_spikes(base: dict, trees: list[dict]) -> dict:
  """The intermediates ``base`` with its ``'step_spikes'`` replaced by those
  of ``trees`` joined along time, in order."""
  flat = traverse_util.flatten_dict(base)
  for path in flat:
    if path[-1] == 'step_spikes':
      flat[path] = (jnp.concatenate([
          traverse_util.flatten_dict(tree)[path][0] for tree in trees]),)
  return traverse_util.unflatten_dict(flat)

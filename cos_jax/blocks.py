"""The size of a time-folded block: how many steps one spiking pass folds
into the batch at once (:func:`block_steps`), and a bound on the memory it
needs (:func:`memory_bound`), both known before anything compiles."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

PyTree = Any


# Upper bound of XLA's temp memory of a time-folded block, as a fraction of
# batch × steps × (all module outputs of one image): measured 0.08-0.41 on
# the small net, ResNet-20 and a narrow VGG-16 (compiled memory analysis,
# chunked and unchunked), so half of it never under-estimates.
_MEMORY_FRACTION = 0.5


def memory_bound(model: nn.Module, variables: PyTree, image_shape, *,
                 batch: int, steps: int) -> int:
  """Upper bound, in bytes, of the temp memory of one spiking block.

  A block is what one time-folded pass holds at once: ``steps`` time-steps of
  ``batch`` images (a time chunk, or ρ, or the whole run without chunks).
  Computed from shapes only (``jax.eval_shape``), before any compilation.
  """
  from cos_jax import checks  # pylint: disable=g-import-not-at-top
  # (checks sizes blocks with block_steps below: imported here, no cycle)
  per_image_step = checks.model_facts(model, variables,
                                      image_shape).step_bytes
  return int(_MEMORY_FRACTION * batch * steps * per_image_step)


def block_steps(T: int, probe_steps: int, time_chunk: int | None,
                record_steps: int = 0) -> int:
  """Steps of the longest block a run of ``T`` steps folds at once."""
  total = max(T, probe_steps)
  first = max(time_chunk or total, probe_steps, record_steps)
  return min(total, first)

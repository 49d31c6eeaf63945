"""What the cost tests share: random variables for any zoo model."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, image):
  """Random kernels of either sign, and BN statistics and thresholds in
  [0.5, 1.5], for ``model`` on images of shape ``image`` (drawn in NumPy:
  no compilation)."""
  rng = np.random.default_rng(3)
  draw = lambda path, leaf: (
      rng.standard_normal(leaf.shape) if path[-1].key == 'kernel'
      else rng.uniform(0.5, 1.5, leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1,) + image)))

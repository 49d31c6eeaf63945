"""Convolutions that stay fast on XLA:CPU for every layer shape of the zoo.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (the
zoo passes it to ``flax.linen.Conv``). Each call picks one of two
implementations from static shapes, at trace time:

* ``'lax'``: ``lax.conv_general_dilated`` itself.
* ``'matmul'``: im2col by strided slices of the zero-padded input, concatenated
  along channels, and one matmul with the kernel reshaped to
  ``[taps·C_in, C_out]``. Taps that read only padding for every output pixel
  are dropped (on a 1×1 map a padded 3×3 conv is its centre tap alone).

The choice is :func:`choose`, which reads one table, :data:`CPU_RULES`. Only
the CPU backend has rules: the platform is settled when the function is lowered
(``lax.platform_dependent``), so a function traced on a CPU host and compiled
for a GPU or TPU still runs ``lax.conv_general_dilated`` there. Both forms
compute the same sums in a different order: results agree up to float
rounding, and gradients flow through slices, a concatenation and a dot.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# The one layout the matmul form handles: what flax.linen.Conv uses in 2-D.
_NHWC = ('NHWC', 'HWIO', 'NHWC')


class ConvGeometry(NamedTuple):
  """Static description of one 2-D convolution in NHWC / HWIO layout.

  Attributes:
    in_spatial: (H, W) of the input map.
    kernel_spatial: (kh, kw) of the kernel.
    strides: (sh, sw).
    padding: ((low, high) rows, (low, high) columns) of zero padding.
    in_features: C_in.
    out_features: C_out.
  """
  in_spatial: tuple[int, int]
  kernel_spatial: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  in_features: int
  out_features: int

  @property
  def out_spatial(self) -> tuple[int, int]:
    """(H_out, W_out) of the output map."""
    return tuple(
        (size + low + high - k) // s + 1 for size, k, s, (low, high) in zip(
            self.in_spatial, self.kernel_spatial, self.strides, self.padding))

  def live_taps(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel rows and columns that read the input for some output pixel.

    A tap at offset i along an axis reads padded positions i + o·s,
    o = 0..out-1; it is dead when all of them fall in the padding.
    """
    def live(size, k, s, out, low):
      return tuple(i for i in range(k)
                   if any(low <= i + o * s < low + size for o in range(out)))
    return tuple(live(*args) for args in zip(
        self.in_spatial, self.kernel_spatial, self.strides, self.out_spatial,
        (low for low, _ in self.padding)))


class Rule(NamedTuple):
  """Use ``method`` for a convolution whose geometry satisfies ``applies``."""
  method: str
  applies: Callable[[ConvGeometry], bool]
  reason: str


def _map_smaller_than_kernel(g: ConvGeometry) -> bool:
  return any(size < k for size, k in zip(g.in_spatial, g.kernel_spatial))


# XLA:CPU only; first match wins, no match means 'lax'. Measured per layer with
# `benchmarks/zoo_speed.py --layer_table ...`: on every other zoo shape (1x1
# shortcuts, the 3-channel first layers, 3x3 and 7x7 convs on maps from 4x4 to
# 224x224) the matmul form was slower (up to several times on large maps) or
# not consistently faster, so those stay on lax.
CPU_RULES = (
    Rule('matmul', _map_smaller_than_kernel,
         'input map smaller than the kernel (VGG-16 block 5 on 32x32 images: '
         '2x2 maps under 3x3 kernels): XLA:CPU\'s conv falls to ~1% of its '
         'usual rate there; im2col runs at matmul speed.'),
)


def choose(geometry: ConvGeometry | None, platform: str) -> str:
  """The implementation for one convolution on one platform.

  Args:
    geometry: the layer's static shapes, or None when the matmul form does not
      cover it (dilation, feature groups, another layout or rank).
    platform: the backend, ``'cpu'``, ``'gpu'`` or ``'tpu'``.

  Returns:
    'lax' or 'matmul' (see :data:`CPU_RULES` for why).
  """
  if geometry is None or platform != 'cpu':
    return 'lax'
  for rule in CPU_RULES:
    if rule.applies(geometry):
      return rule.method
  return 'lax'


def geometry_of(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                window_strides: Sequence[int], padding,
                lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                feature_group_count: int = 1,
                batch_group_count: int = 1) -> ConvGeometry | None:
  """The :class:`ConvGeometry` of a ``lax.conv_general_dilated`` call.

  Arguments are those of ``lax.conv_general_dilated`` (shapes for arrays).
  Returns None when the matmul form does not cover the call: not 2-D
  NHWC/HWIO/NHWC, any dilation, feature or batch groups, or an empty output.
  """
  if len(lhs_shape) != 4 or len(rhs_shape) != 4 or dimension_numbers is None:
    return None
  if (lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)):
    return None
  ones = (1, 1)
  if (tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
      or feature_group_count != 1 or batch_group_count != 1):
    return None
  in_spatial, kernel_spatial = tuple(lhs_shape[1:3]), tuple(rhs_shape[:2])
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(in_spatial, kernel_spatial, strides, padding)
  geometry = ConvGeometry(
      in_spatial, kernel_spatial, strides,
      tuple((int(low), int(high)) for low, high in padding),
      int(lhs_shape[3]), int(rhs_shape[3]))
  if min(geometry.out_spatial) < 1 or not all(geometry.live_taps()):
    return None
  return geometry


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, geometry: ConvGeometry,
                   precision=None, preferred_element_type=None) -> jax.Array:
  """A 2-D convolution as im2col (strided slices) and one dot.

  Args:
    lhs: input ``[N, H, W, C_in]``.
    rhs: kernel ``[kh, kw, C_in, C_out]``.
    geometry: the call's :class:`ConvGeometry` (from :func:`geometry_of`).
    precision, preferred_element_type: passed to ``lax.dot_general``.

  Returns:
    ``[N, H_out, W_out, C_out]``, the convolution (cross-correlation, as
    ``lax.conv_general_dilated``) of ``lhs`` with ``rhs``.
  """
  (pad_h, pad_w), (sh, sw) = geometry.padding, geometry.strides
  (out_h, out_w), (rows, cols) = geometry.out_spatial, geometry.live_taps()
  if pad_h != (0, 0) or pad_w != (0, 0):
    lhs = lax.pad(lhs, jnp.zeros((), lhs.dtype),
                  ((0, 0, 0), pad_h + (0,), pad_w + (0,), (0, 0, 0)))
  n, c = lhs.shape[0], lhs.shape[3]
  columns = [
      lax.slice(lhs, (0, i, j, 0),
                (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c),
                (1, sh, sw, 1))
      for i in rows for j in cols]
  patches = (jnp.concatenate(columns, axis=-1) if len(columns) > 1
             else columns[0])
  if rows != tuple(range(rhs.shape[0])) or cols != tuple(range(rhs.shape[1])):
    rhs = rhs[np.asarray(rows)[:, None], np.asarray(cols)[None, :]]
  # Row-major (i, j, c) tap order of the patches is the kernel's HWIO order.
  kernel = rhs.reshape(-1, rhs.shape[-1])
  return lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """``lax.conv_general_dilated`` with a per-shape, per-backend implementation.

  Same arguments and result as ``lax.conv_general_dilated``. Where
  :func:`choose` picks 'matmul' for the CPU, the call lowers to
  :func:`conv_as_matmul` on CPU and to ``lax.conv_general_dilated`` on every
  other platform.
  """
  reference = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  geometry = geometry_of(jnp.shape(lhs), jnp.shape(rhs), window_strides,
                         padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count,
                         batch_group_count)
  if choose(geometry, 'cpu') == 'lax':
    return reference(lhs, rhs)
  matmul = functools.partial(conv_as_matmul, geometry=geometry,
                             precision=precision,
                             preferred_element_type=preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=matmul, default=reference)


# Model attribute ``conv_impl`` -> the function its convolutions call.
IMPLEMENTATIONS = {'auto': conv_general_dilated,
                   'lax': lax.conv_general_dilated}


def implementation(name: str) -> Callable[..., jax.Array]:
  """The conv function for ``conv_impl=name`` ('auto' or 'lax')."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'conv_impl must be one of {", ".join(IMPLEMENTATIONS)}, '
                     f'got {name!r}')
  return IMPLEMENTATIONS[name]

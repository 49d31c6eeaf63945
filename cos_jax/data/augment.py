"""AutoAugment (CIFAR-10 policy) and Cutout on uint8 images, with stateless RNG.

Kept hand-written on purpose: the maintained TF implementation
(``tensorflow_models``) differs from the reference in one sub-policy and draws
with stateful RNG, which would break the seeded, resumable data order. The
policy is that of Cubuk et al. (2019) as the reference uses it
(DeepVoltaire/AutoAugment via ANN2SNN_COS); every op reproduces PIL's
semantics, and ``tests/test_augment.py`` checks them against PIL.

All ops take and return uint8 ``[H, W, 3]`` tensors; every random choice is a
``tf.random.stateless_*`` draw from an explicit key.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from cos_jax.data._tensorflow import tf

# --------------------------------------------------------------------------
# AutoAugment ops: uint8 [H, W, 3] -> uint8 [H, W, 3]; PIL semantics
# --------------------------------------------------------------------------

_FILL = 128  # Grey fill of the geometric ops, as in the reference.


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Clips to [0, 255] and truncates, like PIL's blend does."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ``Image.blend(degenerate, image, factor)`` on uint8 images."""
  d = tf.cast(degenerate, tf.float32)
  out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return _to_uint8(out)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point): uint8 [H, W]."""
  rgb = tf.cast(image, tf.int32)
  luma = tf.bitwise.right_shift(
      rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000,
      16)
  return tf.cast(luma, tf.uint8)


def _affine(image: tf.Tensor, transform: Sequence, interpolation: str) -> tf.Tensor:
  """Applies an output->input affine map [a0, a1, a2, b0, b1, b2] (PIL order).

  Output pixel (x, y) samples input ((a0 x + a1 y + a2), (b0 x + b1 y + b2));
  outside pixels are filled with grey 128.
  """
  transform = tf.cast(tf.stack(list(transform) + [0.0, 0.0]), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None],
      transforms=transform[None],
      output_shape=tf.shape(image)[:2],
      fill_value=float(_FILL),
      interpolation=interpolation,
      fill_mode='CONSTANT')[0]
  out = tf.cast(tf.round(out), tf.uint8)
  out.set_shape(image.shape)
  return out


def shear_x(image: tf.Tensor, shear) -> tf.Tensor:
  """Horizontal shear: output (x, y) <- input (x + shear * y, y)."""
  return _affine(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0], 'BILINEAR')


def shear_y(image: tf.Tensor, shear) -> tf.Tensor:
  """Vertical shear: output (x, y) <- input (x, y + shear * x)."""
  return _affine(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0], 'BILINEAR')


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """Output (x, y) <- input (x + pixels, y): content moves left by `pixels`."""
  return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], 'NEAREST')


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """Output (x, y) <- input (x, y + pixels): content moves up by `pixels`."""
  return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], 'NEAREST')


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the centre (PIL's rotate)."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _affine(image, [cos, -sin, x_offset, sin, cos, y_offset], 'NEAREST')


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, maps [min, max] linearly onto [0, 255] (PIL, cutoff 0).

  Uses PIL's float64 formula ``int(x * scale + offset)`` so results match it
  bit for bit (float32 lands on 84.99.. where PIL gets 85).
  """
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  out = tf.clip_by_value(tf.floor(x * scale + offset), 0.0, 255.0)
  return tf.cast(out, tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's histogram equalisation of one uint8 [H, W] channel."""
  x = tf.cast(channel, tf.int32)
  histo = tf.math.bincount(tf.reshape(x, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(histo, histo > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def equalised():
    lut = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, x), tf.uint8)

  return tf.cond(step > 0, equalised, lambda: channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  channels = [_equalize_channel(image[..., c]) for c in range(image.shape[-1])]
  return tf.stack(channels, axis=-1)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts pixels >= threshold; threshold 256 is the identity."""
  below = tf.cast(image, tf.float32) < tf.cast(threshold, tf.float32)
  return tf.where(below, image, 255 - image)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the top `bits` bits of each pixel; 8 bits is the identity."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the grey of the mean luma."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float32)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the image's grayscale version."""
  gray = tf.repeat(_grayscale(image)[..., None], image.shape[-1], axis=-1)
  return _blend(gray, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image.

  The smoothing kernel is [[1,1,1],[1,5,1],[1,1,1]] / 13; as in PIL the
  one-pixel border is left unfiltered.
  """
  x = tf.cast(image, tf.float32)
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, smooth, x)
  return _blend(degenerate, image, factor)


# Magnitude level (0..9) -> op argument, exactly the reference's `ranges`.
_RANGES = {
    'ShearX': np.linspace(0, 0.3, 10),
    'ShearY': np.linspace(0, 0.3, 10),
    'TranslateX': np.linspace(0, 150 / 331, 10),  # Fraction of the width.
    'TranslateY': np.linspace(0, 150 / 331, 10),
    'Rotate': np.linspace(0, 30, 10),  # Degrees.
    'Color': np.linspace(0.0, 0.9, 10),
    'Posterize': np.round(np.linspace(8, 4, 10), 0).astype(int),  # Bits.
    'Solarize': np.linspace(256, 0, 10),  # Threshold.
    'Contrast': np.linspace(0.0, 0.9, 10),
    'Sharpness': np.linspace(0.0, 0.9, 10),
    'Brightness': np.linspace(0.0, 0.9, 10),
}


# Op name -> fn(image, magnitude, sign) with magnitude from _RANGES (0 where the
# op has none) and sign a random +-1.0. Like the reference, shears, translations
# and enhancements get a random sign; Rotate does not (the reference rotates
# counter-clockwise only).
def _width(image):
  return tf.cast(tf.shape(image)[1], tf.float32)


def _height(image):
  return tf.cast(tf.shape(image)[0], tf.float32)


_POLICY_OPS = {
    'ShearX': lambda im, m, s: shear_x(im, s * m),
    'ShearY': lambda im, m, s: shear_y(im, s * m),
    'TranslateX': lambda im, m, s: translate_x(im, s * m * _width(im)),
    'TranslateY': lambda im, m, s: translate_y(im, s * m * _height(im)),
    'Rotate': lambda im, m, s: rotate(im, m),
    'Color': lambda im, m, s: color(im, 1.0 + s * m),
    'Posterize': lambda im, m, s: posterize(im, tf.cast(m, tf.int32)),
    'Solarize': lambda im, m, s: solarize(im, m),
    'Contrast': lambda im, m, s: contrast(im, 1.0 + s * m),
    'Sharpness': lambda im, m, s: sharpness(im, 1.0 + s * m),
    'Brightness': lambda im, m, s: brightness(im, 1.0 + s * m),
    'AutoContrast': lambda im, m, s: auto_contrast(im),
    'Equalize': lambda im, m, s: equalize(im),
    'Invert': lambda im, m, s: invert(im),
    'Identity': lambda im, m, s: im,  # An op whose coin flip said "skip".
}
_OP_NAMES = tuple(_POLICY_OPS)

# The 25 CIFAR-10 sub-policies: ((op, probability, level), (op, probability, level)).
CIFAR10_POLICY = (
    (('Invert', 0.1, 7), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, 8), ('Equalize', 0.9, 2)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, 5), ('Equalize', 0.5, 1)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, 7), ('AutoContrast', 0.4, 8)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, 3)),
    (('Equalize', 0.2, 0), ('AutoContrast', 0.6, 0)),
    (('Equalize', 0.2, 8), ('Equalize', 0.8, 4)),
    (('Color', 0.9, 9), ('Equalize', 0.6, 6)),
    (('AutoContrast', 0.8, 4), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, 3)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, 2), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, 8), ('Invert', 0.1, 3)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, 1)),
)


def _policy_tables(policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(op index int32, probability float32, magnitude float32), each [S, 2]."""
  ops = [[_OP_NAMES.index(op) for op, _, _ in sub] for sub in policy]
  probs = [[p for _, p, _ in sub] for sub in policy]
  mags = [[float(_RANGES[op][level]) if op in _RANGES else 0.0
           for op, _, level in sub] for sub in policy]
  return (np.array(ops, np.int32), np.array(probs, np.float32),
          np.array(mags, np.float32))


def apply_policy_op(image: tf.Tensor, op: str, level: int, sign=1.0) -> tf.Tensor:
  """Applies one policy op at magnitude `level` (0..9) with the given sign."""
  m = float(_RANGES[op][level]) if op in _RANGES else 0.0
  return _POLICY_OPS[op](image, tf.constant(m), tf.constant(sign, tf.float32))


def autoaugment(image: tf.Tensor, key: tf.Tensor, policy=CIFAR10_POLICY
                ) -> tf.Tensor:
  """Applies one uniformly chosen sub-policy. uint8 [H, W, 3] -> same.

  Each of its two ops is applied with its probability, in order. The ops are
  dispatched by a table lookup and one `switch_case` over op types per stage,
  so the graph holds each op twice rather than once per sub-policy entry
  (tracing the naive 25-way switch is slow, and tf.data retraces per epoch).

  Args:
    image: uint8 [H, W, 3].
    key: stateless seed, int [2]; the result is a pure function of it.
    policy: sequence of sub-policies, each a pair of (op, probability, level).
  """
  op_table, prob_table, mag_table = _policy_tables(policy)
  keys = tf.random.experimental.stateless_split(key, 5)
  sub = tf.random.stateless_uniform([], keys[0], 0, len(policy), tf.int32)
  identity = _OP_NAMES.index('Identity')
  for stage in range(op_table.shape[1]):
    apply = (tf.random.stateless_uniform([], keys[1 + 2 * stage])
             < tf.gather(prob_table[:, stage], sub))
    op = tf.where(apply, tf.gather(op_table[:, stage], sub), identity)
    sign = tf.where(tf.random.stateless_uniform([], keys[2 + 2 * stage]) < 0.5,
                    -1.0, 1.0)
    magnitude = tf.gather(mag_table[:, stage], sub)
    branches = [functools.partial(_POLICY_OPS[name], image, magnitude, sign)
                for name in _OP_NAMES]
    image = tf.switch_case(op, branches)
  return image


def cutout(image: tf.Tensor, length: int, key: tf.Tensor, center=None
           ) -> tf.Tensor:
  """Zeroes one length x length square (clipped at the borders), as DeVries.

  The centre (y, x) is uniform over the image, so the square may be cut by the
  border, exactly like the reference's Cutout. Works on any dtype, [H, W, C].

  Args:
    image: [H, W, C].
    length: side of the square in pixels.
    key: stateless seed, int [2], drawing the centre.
    center: optional int (y, x) overriding the random centre (for tests).
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  if center is None:
    ky, kx = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    cy = tf.random.stateless_uniform([], ky, 0, h, tf.int32)
    cx = tf.random.stateless_uniform([], kx, 0, w, tf.int32)
  else:
    cy, cx = (tf.constant(c, tf.int32) for c in center)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = ((rows >= cy - length // 2) & (rows < cy + length // 2) &
            (cols >= cx - length // 2) & (cols < cx + length // 2))
  return tf.where(inside[..., None], tf.zeros_like(image), image)



"""AutoAugment and Cutout (cos_jax.augment.augment) against PIL and NumPy."""

import numpy as np
import pytest

from cos_jax.data import augment
from cos_jax.data._tensorflow import tf


@pytest.fixture(scope='module')
def image():
  return np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)


def _pil(array):
  PIL_Image = pytest.importorskip('PIL.Image')
  return PIL_Image.fromarray(array)


_OPS = ['ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'AutoContrast',
        'Invert', 'Equalize', 'Solarize', 'Posterize', 'Contrast', 'Color',
        'Brightness', 'Sharpness']


@pytest.mark.parametrize('op', _OPS)
def test_policy_op_keeps_shape_and_dtype(image, op):
  for level in (0, 5, 9):
    for sign in (-1.0, 1.0):
      out = augment.apply_policy_op(tf.constant(image), op, level, sign)
      assert out.shape == image.shape and out.dtype == tf.uint8


@pytest.mark.parametrize('op', ['ShearX', 'ShearY', 'TranslateX', 'TranslateY',
                                'Rotate', 'Solarize', 'Posterize', 'Contrast',
                                'Color', 'Brightness', 'Sharpness'])
def test_policy_op_is_identity_at_level_zero(image, op):
  out = augment.apply_policy_op(tf.constant(image), op, 0)
  np.testing.assert_array_equal(out.numpy(), image)


def test_identities(image):
  x = tf.constant(image)
  np.testing.assert_array_equal(augment.invert(augment.invert(x)).numpy(), image)
  np.testing.assert_array_equal(augment.solarize(x, 256).numpy(), image)
  np.testing.assert_array_equal(augment.posterize(x, 8).numpy(), image)
  np.testing.assert_array_equal(augment.rotate(x, 0.0).numpy(), image)
  for op in (augment.contrast, augment.color, augment.brightness, augment.sharpness):
    np.testing.assert_array_equal(op(x, 1.0).numpy(), image)


def test_pixel_ops_match_numpy(image):
  x = tf.constant(image)
  np.testing.assert_array_equal(augment.invert(x).numpy(), 255 - image)
  np.testing.assert_array_equal(augment.solarize(x, 100).numpy(),
                                np.where(image < 100, image, 255 - image))
  np.testing.assert_array_equal(augment.posterize(x, 3).numpy(), image & 0b11100000)
  low = (image // 4 + 60).astype(np.uint8)  # Range [60, 123] per channel.
  lo, hi = low.min((0, 1)), low.max((0, 1))
  scale = 255.0 / (hi - lo).astype(np.float64)  # PIL's float64 formula.
  expected = np.floor(low * scale - lo * scale).astype(np.uint8)
  np.testing.assert_array_equal(augment.auto_contrast(tf.constant(low)).numpy(),
                                expected)
  np.testing.assert_array_equal(augment.brightness(x, 0.5).numpy(), image // 2)


def test_pixel_ops_match_pil(image):
  ImageOps = pytest.importorskip('PIL.ImageOps')
  ImageEnhance = pytest.importorskip('PIL.ImageEnhance')
  pil, x = _pil(image), tf.constant(image)
  low = (image // 4 + 60).astype(np.uint8)
  exact = [
      (augment.equalize(x), ImageOps.equalize(pil)),
      (augment.auto_contrast(tf.constant(low)), ImageOps.autocontrast(_pil(low))),
      (augment.solarize(x, 77.5), ImageOps.solarize(pil, 77.5)),
      (augment.posterize(x, 5), ImageOps.posterize(pil, 5)),
      (augment.invert(x), ImageOps.invert(pil)),
  ]
  for ours, theirs in exact:
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs))
  for factor in (0.1, 0.6, 1.4, 1.9):
    close = [
        (augment.contrast(x, factor), ImageEnhance.Contrast(pil).enhance(factor)),
        (augment.color(x, factor), ImageEnhance.Color(pil).enhance(factor)),
        (augment.brightness(x, factor), ImageEnhance.Brightness(pil).enhance(factor)),
        (augment.sharpness(x, factor), ImageEnhance.Sharpness(pil).enhance(factor)),
    ]
    for ours, theirs in close:
      diff = np.abs(ours.numpy().astype(int) - np.asarray(theirs).astype(int))
      assert diff.max() <= 1, diff.max()


def test_geometric_ops_known_values(image):
  x = tf.constant(image)
  # Rotating a square by 90 degrees counter-clockwise is np.rot90.
  np.testing.assert_array_equal(augment.rotate(x, 90.0).numpy(), np.rot90(image))
  # Translating by 3 pixels moves content left and fills grey.
  expected = np.full_like(image, 128)
  expected[:, :-3] = image[:, 3:]
  np.testing.assert_array_equal(augment.translate_x(x, 3.0).numpy(), expected)
  expected = np.full_like(image, 128)
  expected[3:] = image[:-3]
  np.testing.assert_array_equal(augment.translate_y(x, -3.0).numpy(), expected)
  # Shear 1: output (x, y) <- input (x + y, y).
  sheared = augment.shear_x(x, 1.0).numpy()
  for y in (0, 5, 20):
    np.testing.assert_array_equal(sheared[y, :32 - y], image[y, y:])
    assert (sheared[y, 32 - y:] == 128).all()


def test_autoaugment_policy_and_determinism(image):
  policy = augment.CIFAR10_POLICY
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  for sub in policy:
    for op, prob, level in sub:
      assert op in _OPS and 0.0 <= prob <= 1.0 and 0 <= level <= 9
  x = tf.constant(image)
  outs = [augment.autoaugment(x, tf.constant([7, k], tf.int64)).numpy()
          for k in range(12)]
  again = augment.autoaugment(x, tf.constant([7, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert sum(not np.array_equal(o, image) for o in outs) >= 4


def test_cutout_zeroes_a_square():
  ones = tf.ones((32, 32, 3), tf.float32)
  out = augment.cutout(ones, 16, None, center=(16, 10)).numpy()
  assert (out == 0).sum() == 16 * 16 * 3
  assert (out[8:24, 2:18] == 0).all()
  clipped = augment.cutout(ones, 16, None, center=(0, 31)).numpy()
  assert (clipped == 0).sum() == 8 * 9 * 3  # Rows 0..7, columns 23..31.
  assert (clipped[:8, 23:] == 0).all()
  for k in range(5):
    mask = augment.cutout(ones, 8, tf.constant([k, 1], tf.int64)).numpy()[..., 0] == 0
    rows, cols = np.where(mask)
    assert 0 < mask.sum() <= 64
    # A filled axis-aligned rectangle of side <= 8.
    assert mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert np.ptp(rows) < 8 and np.ptp(cols) < 8

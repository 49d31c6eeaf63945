"""TFDS input pipelines for training and converting QCFS networks.

Every pipeline is pure tf.data and yields NumPy batches
``{'image': float32 [B, H, W, C], 'label': int32 [B]}`` ready for JAX. Images are
normalised per channel, ``(pixel / 255 - mean) / std``, with the constants of
DESIGN.md §5 (those of the PyTorch reference).

Determinism: a training call covers exactly one epoch, and both its example order
and its augmentation are pure functions of ``(seed, epoch, shard_index)``. The
shuffle uses fixed tf.data seeds; every random augmentation op is a stateless
``tf.random.stateless_*`` op keyed on the example's position in the epoch. So a
run resumed at epoch ``e`` sees exactly what an uninterrupted run saw.

Offline Fashion-MNIST: Debian's ``dataset-fashion-mnist`` ships the four upstream
IDX ``.gz`` files re-normalised by Debian's strip-nondeterminism (the gzip header's
file name is dropped and its mtime replaced; the deflate stream is untouched), so
their SHA-256 differs from the checksums TFDS registers. :func:`get_builder` puts
the original header back (file name and the upstream mtime, recorded below), which
restores the upstream bytes exactly, and hands the files to TFDS as ``manual_dir``:
TFDS then verifies its own checksums and prepares the dataset without the network.

AutoAugment: no maintained TF2 implementation is installed (``tensorflow_models``
is not a dependency), so the CIFAR-10 policy of Cubuk et al. (2019), as used by the
reference (DeepVoltaire/AutoAugment via ANN2SNN_COS), is implemented below on uint8
images with stateless randomness.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import socket
import struct
import tempfile
import threading
import weakref
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

# Must be set before TensorFlow is first imported to silence its C++ start-up logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top


def _configure_tensorflow() -> None:
  """Quiets TF and keeps it off accelerators, whose memory belongs to JAX."""
  tf.get_logger().setLevel('ERROR')
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF already initialised its devices elsewhere; nothing we can do.
  tfds.disable_progress_bar()


_configure_tensorflow()

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012')

# Debian's `dataset-fashion-mnist` install location (tests monkeypatch this).
FMNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# Env var naming a folder with the four Fashion-MNIST IDX .gz files.
FMNIST_DIR_ENV = 'COS_JAX_FMNIST_DIR'
# Env var: when truthy, never attempt a download (it could take minutes to fail).
OFFLINE_ENV = 'COS_JAX_OFFLINE'

# Upstream gzip mtimes (seconds since the epoch) of the Fashion-MNIST files as
# registered in TFDS's checksums; Debian replaced them (see module docstring).
_FMNIST_UPSTREAM_MTIME = {
    'train-images-idx3-ubyte.gz': 1504176606,
    'train-labels-idx1-ubyte.gz': 1504176606,
    't10k-images-idx3-ubyte.gz': 1504176627,
    't10k-labels-idx1-ubyte.gz': 1504176627,
}

# Hosts the TFDS builders download from; probed before trying a download, since a
# download without network retries with back-off for minutes before failing.
_DOWNLOAD_HOSTS = {
    'fashion_mnist': ('fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80),
    'cifar10': ('www.cs.toronto.edu', 443),
    'cifar100': ('www.cs.toronto.edu', 443),
}

# Shuffle buffer (examples). Whole dataset where it fits in memory (a full
# shuffle, like PyTorch's); ImageNet holds ~110 kB JPEGs, so ~1.1 GB per host.
_SHUFFLE_BUFFER = {'fashion_mnist': 60_000, 'cifar10': 50_000,
                   'cifar100': 50_000, 'imagenet2012': 10_000}


class DatasetUnavailableError(Exception):
  """A dataset can't be prepared here; the message says what to install/pass."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset as this module serves it.

  image_shape is (H, W, C) after preprocessing; mean and std are per channel in
  [0, 1] pixel units (``image = (pixel / 255 - mean) / std``).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_split: str
  test_split: str
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def split_sizes(self) -> dict[str, int]:
    return {self.train_split: self.num_train, self.test_split: self.num_test}


_SPECS = {
    'fashion_mnist': DatasetSpec(
        'fashion_mnist', 10, (28, 28, 1), 'train', 'test', 60_000, 10_000,
        mean=(0.2860,), std=(0.3530,)),
    'cifar10': DatasetSpec(
        'cifar10', 10, (32, 32, 3), 'train', 'test', 50_000, 10_000,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    'cifar100': DatasetSpec(
        'cifar100', 100, (32, 32, 3), 'train', 'test', 50_000, 10_000,
        mean=tuple(v / 255 for v in (129.3, 124.1, 112.4)),
        std=tuple(v / 255 for v in (68.2, 65.4, 70.4))),
    'imagenet2012': DatasetSpec(
        'imagenet2012', 1000, (224, 224, 3), 'train', 'validation',
        1_281_167, 50_000,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def dataset_info(name: str) -> DatasetSpec:
  """Returns the :class:`DatasetSpec` of one of :data:`DATASETS`."""
  if name not in _SPECS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}.')
  return _SPECS[name]


# --------------------------------------------------------------------------
# Preparing datasets (offline-aware)
# --------------------------------------------------------------------------


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _is_offline() -> bool:
  return os.environ.get(OFFLINE_ENV, '').strip().lower() in ('1', 'true', 'yes')


def _can_reach(host: str, port: int, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to host opens within `timeout` seconds.

  Runs in a daemon thread because name resolution has no timeout of its own.
  """
  result = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout + 1.0)
  return bool(result)


@contextlib.contextmanager
def _preparation_lock(data_dir_root: str, name: str):
  """Serialises preparing one dataset across processes (e.g. pytest-xdist)."""
  os.makedirs(data_dir_root, exist_ok=True)
  with open(os.path.join(data_dir_root, f'.cos_jax_{name}.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download_config(**kwargs) -> tfds.download.DownloadConfig:
  # No GCS look-up (network) and no feature statistics (not needed, ~20% slower).
  return tfds.download.DownloadConfig(
      try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP, **kwargs)


def _fmnist_source_dir() -> Optional[str]:
  """First of $COS_JAX_FMNIST_DIR, FMNIST_DEBIAN_DIR holding all four files."""
  for folder in (os.environ.get(FMNIST_DIR_ENV), FMNIST_DEBIAN_DIR):
    if folder and all(os.path.isfile(os.path.join(folder, f))
                      for f in _FMNIST_UPSTREAM_MTIME):
      return folder
  return None


def restore_upstream_gzip(data: bytes, filename: str, mtime: int) -> bytes:
  """Re-creates the gzip header that strip-nondeterminism rewrote.

  Args:
    data: a gzip file whose header lacks the original file name.
    filename: the .gz file's name; the header stores it without '.gz'.
    mtime: the original header mtime (seconds since the epoch).

  Returns:
    The bytes with header ``1f 8b 08 08 <mtime> 00 03 <name> 00`` followed by the
    unchanged deflate stream and trailer; `data` itself if it already names a file.
  """
  flags = data[3]
  if data[:3] != b'\x1f\x8b\x08' or flags & 0x08:  # Not gzip, or FNAME present.
    return data
  offset = 10
  if flags & 0x04:  # FEXTRA: 2-byte length, then the field.
    offset += 2 + struct.unpack('<H', data[offset:offset + 2])[0]
  if flags & 0x10:  # FCOMMENT: zero-terminated.
    offset = data.index(b'\x00', offset) + 1
  if flags & 0x02:  # FHCRC.
    offset += 2
  name = filename[:-len('.gz')].encode() + b'\x00'
  header = b'\x1f\x8b\x08\x08' + struct.pack('<I', mtime) + b'\x00\x03'
  return header + name + data[offset:]


def _prepare_fmnist_from_files(builder, source_dir: str) -> None:
  """Prepares `builder` from local IDX .gz files, with TFDS checksum checks."""
  with tempfile.TemporaryDirectory(prefix='cos_jax_fmnist_') as tmp:
    for filename, mtime in _FMNIST_UPSTREAM_MTIME.items():
      with open(os.path.join(source_dir, filename), 'rb') as f:
        data = restore_upstream_gzip(f.read(), filename, mtime)
      with open(os.path.join(tmp, filename), 'wb') as f:
        f.write(data)
    config = _download_config(manual_dir=tmp,
                              extract_dir=os.path.join(tmp, 'extracted'))
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetUnavailableError(_one_line(
          f'Fashion-MNIST files in {source_dir} could not be prepared '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
          f'pass {FMNIST_DIR_ENV}=<folder with the four original IDX .gz files> '
          '(e.g. from `apt-get install dataset-fashion-mnist`)')) from e


def _unavailable_message(name: str, data_dir: str) -> str:
  if name == 'fashion_mnist':
    return ('Fashion-MNIST is not available offline: run `apt-get install '
            'dataset-fashion-mnist` or pass --data_dir/'
            f'{FMNIST_DIR_ENV}=<folder with the four IDX .gz files>')
  if name == 'imagenet2012':
    return (f'imagenet2012 is not prepared in {data_dir}: put '
            'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
            f'{data_dir}/downloads/manual/ (or run `tfds build imagenet2012 '
            f'--data_dir {data_dir} --manual_dir <folder with the tars>`)')
  return (f'{name} is not prepared in {data_dir} and cannot be downloaded here: '
          f'run `tfds build {name} --data_dir {data_dir}` on a machine with '
          f'internet and copy {data_dir}/{name} here (or set TFDS_DATA_DIR)')


def _download_and_prepare(builder, name: str, data_dir_root: str) -> None:
  """Normal TFDS preparation (download, or ImageNet's manual tars)."""
  host = _DOWNLOAD_HOSTS.get(name)
  if host is not None and (_is_offline() or not _can_reach(*host)):
    raise DatasetUnavailableError(_unavailable_message(name, data_dir_root))
  try:
    builder.download_and_prepare(download_config=_download_config())
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetUnavailableError(
        _unavailable_message(name, data_dir_root)) from e


def _tfds_is_mocked() -> bool:
  """Inside `tfds.testing.mock_data`: preparation is a no-op, data is fake."""
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, '__module__', '') == 'tensorflow_datasets.testing.mocking'


def get_builder(name: str, data_dir: Optional[str] = None
                ) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of `name`, preparing it if needed.

  Order: already prepared in `data_dir` -> (Fashion-MNIST only) local IDX files
  from $COS_JAX_FMNIST_DIR or FMNIST_DEBIAN_DIR -> TFDS download (skipped when
  $COS_JAX_OFFLINE is set or the download host is unreachable; for ImageNet the
  tars in <data_dir>/downloads/manual). `data_dir=None` means $TFDS_DATA_DIR or
  ~/tensorflow_datasets.

  Raises:
    DatasetUnavailableError: with a one-line message saying what to do.
  """
  dataset_info(name)  # Validates the name.
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared() or _tfds_is_mocked():
    return builder
  root = os.fspath(builder.data_dir_root)
  with _preparation_lock(root, name):
    # Another process may have prepared it while we waited for the lock.
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
    source_dir = _fmnist_source_dir() if name == 'fashion_mnist' else None
    if source_dir is not None:
      _prepare_fmnist_from_files(builder, source_dir)
    else:
      _download_and_prepare(builder, name, root)
    # Reload so that split sizes etc. are read from the prepared files.
    return tfds.builder(name, data_dir=data_dir)


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
  (tracing the naive 25-way switch takes ~10 s, and tf.data retraces per epoch).

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


# --------------------------------------------------------------------------
# Per-example preprocessing
# --------------------------------------------------------------------------


def _normalize(image: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  """[0, 255] pixels (any dtype) -> float32 (pixel / 255 - mean) / std."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(spec.mean, tf.float32)) / tf.constant(spec.std, tf.float32)


def _pad_crop_flip(image: tf.Tensor, pad: int, keys: tf.Tensor) -> tf.Tensor:
  """Zero-pads by `pad`, random-crops back to the input size, random h-flip."""
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=keys[0])
  return tf.image.stateless_random_flip_left_right(image, seed=keys[1])


def _fmnist_train(image, key, spec):
  keys = tf.random.experimental.stateless_split(key, 2)
  return _normalize(_pad_crop_flip(image, 2, keys), spec)


def _cifar_train(image, key, spec, cutout_length: int):
  keys = tf.random.experimental.stateless_split(key, 4)
  image = _pad_crop_flip(image, 4, keys[:2])
  image = autoaugment(image, keys[2])
  # Cutout comes after normalisation in the reference: the hole is 0 = the mean.
  return cutout(_normalize(image, spec), cutout_length, keys[3])


def _image_hw(image: tf.Tensor) -> tf.Tensor:
  """int32 [H, W, C] shape of a decoded image or of a JPEG string."""
  if image.dtype == tf.string:
    return tf.image.extract_jpeg_shape(image)
  return tf.shape(image)


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Crops window (y, x, h, w); decodes JPEG strings (only the window) first."""
  if image.dtype == tf.string:
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)
  y, x, h, w = tf.unstack(window)
  return image[y:y + h, x:x + w]


def _imagenet_train(image, key, spec, size: int = 224):
  """RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) + h-flip."""
  keys = tf.random.experimental.stateless_split(key, 2)
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
      _image_hw(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=keys[0],
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
  image = tf.image.resize(_crop(image, window), [size, size], antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seed=keys[1])
  return _normalize(image, spec)


def _imagenet_eval(image, spec, size: int = 224, resize: int = 256):
  """Resize shorter side to 256 + centre crop 224, done as crop-then-resize.

  The centre square of side shorter * 224 / 256 is what Resize(256) +
  CenterCrop(224) keeps; cropping first decodes only that part of the JPEG.
  """
  shape = _image_hw(image)
  h, w = shape[0], shape[1]
  side = tf.cast(tf.round(tf.cast(tf.minimum(h, w), tf.float32) * size / resize),
                 tf.int32)
  window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  image = tf.image.resize(_crop(image, window), [size, size], antialias=True)
  return _normalize(image, spec)


@functools.lru_cache(maxsize=None)
def _traced_train_fn(name: str) -> Callable:
  """The training preprocessing as one tf.function, traced once per process.

  tf.data traces map functions anew for every pipeline, i.e. every epoch; the
  AutoAugment graph takes seconds to trace, a tf.function call inside the map
  reuses its traced graph.
  """
  return tf.function(_preprocess_fn(name, True), reduce_retracing=True)


def _preprocess_fn(name: str, train: bool) -> Callable:
  """Returns fn(image, key) -> float32 [H, W, C]; key is None when not train."""
  spec = dataset_info(name)
  if name == 'imagenet2012':
    if train:
      return lambda image, key: _imagenet_train(image, key, spec)
    return lambda image, key: _imagenet_eval(image, spec)
  if not train:
    return lambda image, key: _normalize(image, spec)
  if name == 'fashion_mnist':
    return lambda image, key: _fmnist_train(image, key, spec)
  cutout_length = 16 if name == 'cifar10' else 8
  return lambda image, key: _cifar_train(image, key, spec, cutout_length)


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


def _epoch_seeds(seed: int, epoch: int, shard_index: int) -> tuple[int, int, np.ndarray]:
  """(file shuffle seed, buffer shuffle seed, augmentation key int64 [2])."""
  state = np.random.SeedSequence([seed, epoch, shard_index]).generate_state(4)
  return int(state[0]), int(state[1]), state[2:].astype(np.int64)


def _resolve_shards(shard_index, num_shards) -> tuple[int, int]:
  if shard_index is None or num_shards is None:
    import jax  # pylint: disable=g-import-not-at-top  (only for the defaults)
    shard_index = jax.process_index() if shard_index is None else shard_index
    num_shards = jax.process_count() if num_shards is None else num_shards
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index={shard_index} not in [0, {num_shards}).')
  return shard_index, num_shards


def _shard_split(split: str, shard_index: int, num_shards: int, train: bool):
  """This shard's sub-split: contiguous, near-equal (equal if train) pieces."""
  if num_shards == 1:
    return split
  # Training drops the remainder so every host runs the same number of steps.
  return tfds.even_splits(split, num_shards, drop_remainder=train)[shard_index]


def _tf_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel map/interleave keep their order.
  return options


# Iterators not yet exhausted. A tf.data iterator still alive at interpreter
# shutdown can deadlock it (seen with tfds.testing.mock_data's from_generator
# input: a prefetch thread needs the GIL while Python finalises), so they are
# closed by an atexit hook, while the interpreter is still whole.
_OPEN_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_OPEN_ITERATORS):
    iterator.close()


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict]:
  """A generator over `ds` as NumPy, registered for closing at exit."""
  def generate():
    yield from tfds.as_numpy(ds)

  iterator = generate()
  _OPEN_ITERATORS.add(iterator)
  return iterator


def make_dataset(name: str, split: str, *, batch_size: int, train: bool,
                 seed: int = 0, data_dir: Optional[str] = None,
                 num_examples: Optional[int] = None, epoch: int = 0,
                 shard_index: Optional[int] = None,
                 num_shards: Optional[int] = None,
                 drop_remainder: Optional[bool] = None) -> Iterator[dict]:
  """Iterates over one epoch of this host's shard of `split`, in batches.

  Args:
    name: one of :data:`DATASETS`.
    split: TFDS split string, e.g. 'train', 'test', 'validation', 'test[:100]'.
    batch_size: examples per batch on this host.
    train: shuffle + augment (order a pure function of (seed, epoch, shard));
      otherwise the split's order, no augmentation.
    seed: base seed of the run.
    data_dir: TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    num_examples: keep only the first N examples of this shard (before shuffle).
    epoch: which epoch's order and augmentation to produce.
    shard_index, num_shards: this host's shard; default jax.process_index() and
      jax.process_count(). Train shards have equal size (remainder dropped).
    drop_remainder: drop a last partial batch; default True iff train.

  Yields:
    {'image': float32 [B, H, W, C] normalised, 'label': int32 [B]}.

  Raises:
    DatasetUnavailableError: the dataset can't be prepared here.
  """
  shard_index, num_shards = _resolve_shards(shard_index, num_shards)
  drop_remainder = train if drop_remainder is None else drop_remainder
  builder = get_builder(name, data_dir)
  file_seed, shuffle_seed, aug_key = _epoch_seeds(seed, epoch, shard_index)

  # With num_examples the subset must be the same every epoch: no file shuffle.
  shuffle_files = train and num_examples is None
  ds = builder.as_dataset(
      split=_shard_split(split, shard_index, num_shards, train),
      shuffle_files=shuffle_files,
      decoders=({'image': tfds.decode.SkipDecoding()}
                if name == 'imagenet2012' else None),
      read_config=tfds.ReadConfig(shuffle_seed=file_seed, options=_tf_options(),
                                  try_autocache=False))
  ds = ds.map(lambda ex: (ex['image'], ex['label']))  # Drops other features.
  if num_examples is not None:
    ds = ds.take(num_examples)
  if train:
    buffer = min(_SHUFFLE_BUFFER[name], num_examples or _SHUFFLE_BUFFER[name])
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  preprocess = _traced_train_fn(name) if train else _preprocess_fn(name, False)
  key = tf.constant(aug_key, tf.int64)

  def prepare(index, image_label):
    image, label = image_label
    # Per-example key from the position in this epoch's order.
    example_key = (tf.random.experimental.stateless_fold_in(key, index)
                   if train else None)
    return {'image': preprocess(image, example_key),
            'label': tf.cast(label, tf.int32)}

  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_tf_options())
  return _numpy_batches(ds)


def _num_examples_in(split, spec: DatasetSpec) -> int:
  """Examples in a (sub-)split, from the spec's standard split sizes."""
  infos = {s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
           for s, n in spec.split_sizes.items()}
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  return sum((a.to if a.to is not None else spec.split_sizes[a.splitname])
             - (a.from_ or 0) for a in split.to_absolute(infos))


def steps_per_epoch(name: str, batch_size: int, split: str = 'train',
                    num_examples: Optional[int] = None) -> int:
  """Batches one `make_dataset(..., train=True)` call yields on this host.

  Uses the default sharding (jax.process_index/process_count) and
  drop_remainder=True; `num_examples` caps the examples of this host's shard.
  """
  spec = dataset_info(name)
  shard_index, num_shards = _resolve_shards(None, None)
  n = _num_examples_in(_shard_split(split, shard_index, num_shards, True), spec)
  if num_examples is not None:
    n = min(n, num_examples)
  return n // batch_size

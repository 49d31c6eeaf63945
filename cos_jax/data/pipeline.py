"""tf.data input pipelines: one epoch of a TFDS split as NumPy batches for JAX.

Every pipeline yields ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``,
normalised as :mod:`cos_jax.data` states.

Determinism: a training call covers exactly one epoch, and both its example order
and its augmentation are pure functions of ``(seed, epoch, shard_index)``. The
shuffle uses fixed tf.data seeds; every random augmentation op is a stateless
``tf.random.stateless_*`` op keyed on the example's position in the epoch. So a
run resumed at epoch ``e`` sees exactly what an uninterrupted run saw.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from typing import Callable, Iterator, Optional

import numpy as np

from cos_jax.data import DatasetSpec, dataset_info
from cos_jax.data._tensorflow import configure, tf, tfds
from cos_jax.data.augment import autoaugment, cutout
from cos_jax.data.prepare import get_builder

# Shuffle buffer (examples) of each preprocessing family (see DatasetSpec).
# Whole dataset where it fits in memory (a full shuffle, like PyTorch's);
# ImageNet holds ~110 kB JPEGs, so ~1.1 GB per host.
_SHUFFLE_BUFFER = {'fashion_mnist': 60_000, 'cifar10': 50_000,
                   'cifar100': 50_000, 'imagenet2012': 10_000}


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
  """Crops window (y, x, h, w); decodes JPEG strings (only the window) first.

  JPEGs are decoded with libjpeg's accurate integer IDCT, as PIL (the
  reference's loader) does; TF's default fast IDCT differs by ~1 grey level on
  average, up to ~6.
  """
  if image.dtype == tf.string:
    return tf.image.decode_and_crop_jpeg(image, window, channels=3,
                                         dct_method='INTEGER_ACCURATE')
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
  """Returns fn(image, key) -> float32 [H, W, C]; key is None when not train.

  The transform is that of the dataset's preprocessing family
  (:attr:`DatasetSpec.preprocessing`); mean and std are the dataset's own.
  """
  spec = dataset_info(name)
  family = spec.preprocessing
  if family == 'imagenet2012':
    if train:
      return lambda image, key: _imagenet_train(image, key, spec)
    return lambda image, key: _imagenet_eval(image, spec)
  if not train:
    return lambda image, key: _normalize(image, spec)
  if family == 'fashion_mnist':
    return lambda image, key: _fmnist_train(image, key, spec)
  cutout_length = 16 if family == 'cifar10' else 8
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
  # Without the autotuner AUTOTUNE means one worker per core. With it, the
  # end of a split sometimes waited for the autotuner's next wake-up, whose
  # period doubles from 10 ms up to a minute (docs/performance.md, "The input
  # pipeline").
  options.autotune.enabled = False
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
                 drop_remainder: Optional[bool] = None,
                 interleaved: bool = False) -> Iterator[dict]:
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
    interleaved: (evaluation only) instead of a contiguous piece, this shard
      takes its ``batch_size`` rows of every global batch of ``num_shards *
      batch_size`` consecutive examples, so that the global batches are the
      ones a single process reads; ``num_examples`` then caps the split.

  Yields:
    {'image': float32 [B, H, W, C] normalised, 'label': int32 [B]}.

  Raises:
    DatasetUnavailableError: the dataset can't be prepared here.
  """
  shard_index, num_shards = _resolve_shards(shard_index, num_shards)
  if interleaved and train:
    raise ValueError('interleaved shards are for evaluation (train=False)')
  interleaved = interleaved and num_shards > 1
  drop_remainder = train if drop_remainder is None else drop_remainder
  family = dataset_info(name).preprocessing
  configure()
  builder = get_builder(name, data_dir)
  file_seed, shuffle_seed, aug_key = _epoch_seeds(seed, epoch, shard_index)

  # With num_examples the subset must be the same every epoch: no file shuffle.
  shuffle_files = train and num_examples is None
  ds = builder.as_dataset(
      split=(split if interleaved
             else _shard_split(split, shard_index, num_shards, train)),
      shuffle_files=shuffle_files,
      decoders=({'image': tfds.decode.SkipDecoding()}
                if family == 'imagenet2012' else None),
      read_config=tfds.ReadConfig(shuffle_seed=file_seed, options=_tf_options(),
                                  try_autocache=False))
  ds = ds.map(lambda ex: (ex['image'], ex['label']))  # Drops other features.
  if num_examples is not None:
    ds = ds.take(num_examples)
  if interleaved:  # before preprocessing (and ImageNet's JPEG decoding)
    ds = ds.enumerate().filter(
        lambda i, _: (i // batch_size) % num_shards == shard_index).map(
            lambda _, example: example)
  if train:
    buffer = min(_SHUFFLE_BUFFER[family],
                 num_examples or _SHUFFLE_BUFFER[family])
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
                    num_examples: Optional[int] = None,
                    num_shards: Optional[int] = None) -> int:
  """Batches one `make_dataset(..., train=True)` call yields per shard.

  ``num_shards`` defaults to jax.process_count() as in `make_dataset`; train
  shards have equal sizes, so every shard yields as many. drop_remainder=True;
  `num_examples` caps the examples of a shard.
  """
  spec = dataset_info(name)
  shard_index, num_shards = _resolve_shards(0 if num_shards else None,
                                            num_shards)
  n = _num_examples_in(_shard_split(split, shard_index, num_shards, True), spec)
  if num_examples is not None:
    n = min(n, num_examples)
  return n // batch_size

"""Tests of cos_jax.data: real Fashion-MNIST, mocked CIFAR/ImageNet, preparation.

The Fashion-MNIST tests read the dataset prepared in the default TFDS data dir
($TFDS_DATA_DIR or ~/tensorflow_datasets, where training puts it too); the first
run prepares it from Debian's files (~35 s on 2 cores), later runs reuse it.
"""

import gzip
import hashlib
import os
import time

import numpy as np
import pytest

from cos_jax import data
from cos_jax.data import pipeline, prepare
from cos_jax.data._tensorflow import tf, tfds

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530

# ---------------------------------------------------------------------------
# Fashion-MNIST (real data)
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def fmnist_builder():
  if (prepare._fmnist_source_dir() is None
      and not tfds.builder('fashion_mnist').is_prepared()):
    pytest.skip('no Fashion-MNIST: apt-get install dataset-fashion-mnist')
  return prepare.get_builder('fashion_mnist')


def _collect(iterator):
  batches = list(iterator)
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]), batches)


def _raw_idx_images(filename, count):
  """First `count` images of a Debian IDX file: uint8 [count, 28, 28]."""
  path = os.path.join(prepare.FMNIST_DEBIAN_DIR, filename)
  if not os.path.exists(path):
    pytest.skip(f'{path} not installed')
  with gzip.open(path) as f:
    raw = f.read(16 + count * 784)
  return np.frombuffer(raw[16:], np.uint8).reshape(count, 28, 28)


def test_restored_debian_gzip_matches_tfds_checksums():
  if prepare._fmnist_source_dir() is None:
    pytest.skip('Fashion-MNIST IDX files not installed')
  expected = {url.rsplit('/', 1)[-1]: info.checksum for url, info in
              tfds.builder('fashion_mnist').url_infos.items()}
  assert set(expected) == set(prepare._FMNIST_UPSTREAM_MTIME)
  for filename, mtime in prepare._FMNIST_UPSTREAM_MTIME.items():
    with open(os.path.join(prepare._fmnist_source_dir(), filename), 'rb') as f:
      original = f.read()
    restored = prepare.restore_upstream_gzip(original, filename, mtime)
    assert hashlib.sha256(restored).hexdigest() == expected[filename]
    # Idempotent on an already-upstream file.
    assert prepare.restore_upstream_gzip(restored, filename, mtime) == restored


def test_fmnist_eval_batches(fmnist_builder):
  del fmnist_builder
  images, labels, batches = _collect(pipeline.make_dataset(
      'fashion_mnist', 'test[:1000]', batch_size=256, train=False))
  assert [len(b['label']) for b in batches] == [256, 256, 256, 232]
  assert images.shape == (1000, 28, 28, 1) and images.dtype == np.float32
  assert labels.dtype == np.int32 and set(labels) == set(range(10))
  assert abs(images.mean()) < 0.05 and abs(images.std() - 1.0) < 0.05
  # Exactly IDX images, normalised (TFDS stores them in its own order).
  pixels = (images[..., 0] * FMNIST_STD + FMNIST_MEAN) * 255.0
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  raw = _raw_idx_images('t10k-images-idx3-ubyte.gz', 10_000)
  raw_set = {r.tobytes() for r in raw}
  assert all(np.round(p).astype(np.uint8).tobytes() in raw_set for p in pixels)


def test_fmnist_eval_order_is_stable(fmnist_builder):
  del fmnist_builder
  first = _collect(pipeline.make_dataset('fashion_mnist', 'test[:300]',
                                     batch_size=100, train=False, seed=1))
  second = _collect(pipeline.make_dataset('fashion_mnist', 'test[:300]',
                                      batch_size=100, train=False, seed=2))
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


def _train(**kwargs):
  kwargs = {'batch_size': 64, 'train': True, 'num_examples': 256, **kwargs}
  return _collect(pipeline.make_dataset('fashion_mnist', 'train', **kwargs))


def test_fmnist_train_order_is_a_function_of_seed_and_epoch(fmnist_builder):
  del fmnist_builder
  images, labels, _ = _train(seed=0, epoch=3)
  again_images, again_labels, _ = _train(seed=0, epoch=3)
  np.testing.assert_array_equal(images, again_images)
  np.testing.assert_array_equal(labels, again_labels)
  other_epoch = _train(seed=0, epoch=4)[1]
  other_seed = _train(seed=1, epoch=3)[1]
  assert not np.array_equal(labels, other_epoch)
  assert not np.array_equal(labels, other_seed)
  # A permutation of the first 256 training examples.
  _, eval_labels, _ = _collect(pipeline.make_dataset(
      'fashion_mnist', 'train[:256]', batch_size=256, train=False))
  np.testing.assert_array_equal(np.sort(labels), np.sort(eval_labels))
  assert not np.array_equal(labels, eval_labels)


def test_fmnist_train_drops_remainder(fmnist_builder):
  del fmnist_builder
  _, labels, batches = _train(num_examples=200)
  assert [len(b['label']) for b in batches] == [64, 64, 64]
  assert pipeline.steps_per_epoch('fashion_mnist', 64, num_examples=200) == 3


def test_fmnist_train_augmentation_is_pad2_crop_and_flip(fmnist_builder):
  del fmnist_builder
  images, _, _ = _train(num_examples=64)
  raw, _, _ = _collect(pipeline.make_dataset('fashion_mnist', 'train[:64]',
                                         batch_size=64, train=False))
  raw = raw[..., 0]
  zero = (0.0 - FMNIST_MEAN) / FMNIST_STD  # A padded (black) pixel.
  padded = np.pad(raw, [(0, 0), (2, 2), (2, 2)], constant_values=zero)
  candidates = np.stack([np.flip(c, -1) if flip else c
                         for dy in range(5) for dx in range(5) for flip in (0, 1)
                         for c in [padded[:, dy:dy + 28, dx:dx + 28]]], 1)
  candidates = candidates.reshape(-1, 28 * 28)  # [64 * 50, 784]
  flat = images.reshape(64, 28 * 28)
  distance = np.abs(flat[:, None, :] - candidates[None]).max(-1).min(-1)
  np.testing.assert_array_less(distance, 1e-4)  # Each is a crop/flip of one.
  # ...and augmentation does change some of them.
  assert not np.allclose(np.sort(flat, 0), np.sort(raw.reshape(64, -1), 0))


def test_fmnist_shards_are_disjoint_and_cover(fmnist_builder):
  del fmnist_builder
  kwargs = {'batch_size': 32, 'train': False}
  full = _collect(pipeline.make_dataset('fashion_mnist', 'test[:101]',
                                    shard_index=0, num_shards=1, **kwargs))
  shard0 = _collect(pipeline.make_dataset('fashion_mnist', 'test[:101]',
                                      shard_index=0, num_shards=2, **kwargs))
  shard1 = _collect(pipeline.make_dataset('fashion_mnist', 'test[:101]',
                                      shard_index=1, num_shards=2, **kwargs))
  assert (len(shard0[1]), len(shard1[1])) == (51, 50)
  np.testing.assert_array_equal(np.concatenate([shard0[0], shard1[0]]), full[0])
  np.testing.assert_array_equal(np.concatenate([shard0[1], shard1[1]]), full[1])
  # Training shards have equal sizes (the odd example is dropped).
  train0 = _collect(pipeline.make_dataset('fashion_mnist', 'test[:101]', batch_size=1,
                                      train=True, shard_index=0, num_shards=2))
  assert len(train0[1]) == 50


def test_steps_per_epoch():
  assert pipeline.steps_per_epoch('fashion_mnist', 128) == 60_000 // 128
  assert pipeline.steps_per_epoch('cifar10', 100, split='train[:1000]') == 10
  assert pipeline.steps_per_epoch('imagenet2012', 256) == 1_281_167 // 256
  assert pipeline.steps_per_epoch('cifar100', 64, split='test[:10%]') == 1000 // 64
  # Per-shard sizes: training shards are equal, evaluation shards cover all.
  spec = data.dataset_info('cifar10')
  sizes = [pipeline._num_examples_in(pipeline._shard_split('train[:101]', i, 2, train),
                                 spec) for train in (True, False) for i in (0, 1)]
  assert sizes == [50, 50, 51, 50]


def test_dataset_info():
  assert data.dataset_info('cifar100').num_classes == 100
  assert data.dataset_info('imagenet2012').image_shape == (224, 224, 3)
  assert data.dataset_info('imagenet2012').test_split == 'validation'
  assert data.dataset_info('fashion_mnist').image_shape == (28, 28, 1)
  assert set(data.DATASETS) == {'fashion_mnist', 'cifar10', 'cifar100',
                                'imagenet2012', 'cifar10_offline'}
  with pytest.raises(ValueError):
    data.dataset_info('mnist')


# ---------------------------------------------------------------------------
# Offline errors
# ---------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  monkeypatch.setenv(data.OFFLINE_ENV, '1')
  monkeypatch.setenv(prepare.FMNIST_DIR_ENV, str(empty))
  monkeypatch.setattr(prepare, 'FMNIST_DEBIAN_DIR', str(empty))
  return str(tmp_path / 'tfds')


@pytest.mark.parametrize('name, hint', [
    ('fashion_mnist', 'apt-get install dataset-fashion-mnist'),
    ('cifar10', 'tfds build cifar10'),
    ('imagenet2012', 'ILSVRC2012_img_train.tar'),
])
def test_unavailable_dataset_raises_one_line(offline, name, hint):
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as error:
    prepare.get_builder(name, data_dir=offline)
  message = str(error.value)
  assert hint in message and '\n' not in message
  assert time.time() - start < 10  # No download attempt.
  with pytest.raises(data.DatasetUnavailableError):
    pipeline.make_dataset(name, 'train', batch_size=2, train=True, data_dir=offline)


# ---------------------------------------------------------------------------
# CIFAR / ImageNet with mock data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'imagenet2012'])
def test_mock_pipelines(name):
  spec = data.dataset_info(name)
  with tfds.testing.mock_data(num_examples=6):
    def batch(train, **kwargs):
      split = spec.train_split if train else spec.test_split
      return next(pipeline.make_dataset(name, split, batch_size=4, train=train,
                                    **kwargs))
    train = batch(True, seed=5, epoch=2)
    for b in (train, batch(False)):
      assert b['image'].shape == (4,) + spec.image_shape
      assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
      assert np.all((0 <= b['label']) & (b['label'] < spec.num_classes))
      assert np.isfinite(b['image']).all()
    again = batch(True, seed=5, epoch=2)
    np.testing.assert_array_equal(train['image'], again['image'])
    np.testing.assert_array_equal(train['label'], again['label'])


def test_imagenet_eval_is_resize_256_centre_crop_224():
  # A 256x320 image, left half 0 and right half 255: the centre 224 crop of a
  # shorter-side-256 resize spans columns 48..272, i.e. 112 dark + 112 bright.
  image = np.zeros((256, 320, 3), np.uint8)
  image[:, 160:] = 255
  out = pipeline._imagenet_eval(tf.constant(image), data.dataset_info('imagenet2012'))
  pixels = out.numpy()[..., 0] * 0.229 + 0.485
  assert out.shape == (224, 224, 3)
  np.testing.assert_allclose(pixels[:, :111], 0.0, atol=1e-3)
  np.testing.assert_allclose(pixels[:, 113:], 1.0, atol=1e-3)
  jpeg = tf.io.encode_jpeg(tf.constant(image), quality=100)
  from_jpeg = pipeline._imagenet_eval(jpeg, data.dataset_info('imagenet2012'))
  np.testing.assert_allclose(from_jpeg.numpy(), out.numpy(), atol=0.1)


# ---------------------------------------------------------------------------
# AutoAugment ops and Cutout
# ---------------------------------------------------------------------------

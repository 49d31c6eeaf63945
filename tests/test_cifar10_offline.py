"""Tests of cifar10_offline: the split rule, the builder, the pipeline, errors.

Everything runs on tests/fixtures/cifar10_offline/task.json: 40 real CIFAR-10
test images (4 per class) taken from the bigbench 1.0.0 file, in its format.
The split rule scales with the images per class (4/5 to 'train'), so the
fixture runs the same code as the real 1,000-per-class file (3/1 here).
Images are decoded with PIL here and with TensorFlow in the builder.
"""

import base64
import hashlib
import io
import json
import pathlib
import random
import shutil
import tarfile
import time

import numpy as np
import pytest

from cos_jax import data, train_config
from cos_jax.data import cifar10_offline, pipeline, prepare
from cos_jax.data._tensorflow import tf

PIL_Image = pytest.importorskip('PIL.Image')

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TASK_JSON = FIXTURES / 'cifar10_offline' / 'task.json'
# foolbox 3.3.4's CIFAR-10 test PNGs, named cifar10_<index>_<label>.png.
FOOLBOX_PNGS = sorted((FIXTURES / 'cifar10_foolbox').glob('cifar10_*.png'))
# TFDS cifar10's label names (from CIFAR-10's batches.meta.txt), in label order.
TFDS_CIFAR10_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                      'frog', 'horse', 'ship', 'truck')
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def _examples():
  with open(TASK_JSON) as f:
    return json.load(f)['examples']


def _pil_pixels(png: bytes) -> np.ndarray:
  return np.asarray(PIL_Image.open(io.BytesIO(png)).convert('RGB'))


@pytest.fixture(scope='module')
def source():
  """The fixture decoded independently: {id: (uint8 [32, 32, 3], label)}."""
  decoded = {}
  for example in _examples():
    pixels = _pil_pixels(base64.b64decode(example['input']))
    (name,) = [k for k, v in example['target_scores'].items() if v == 1]
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
    decoded[digest] = (pixels, sorted(example['target_scores']).index(name))
  return decoded


def _documented_split(ids, labels, seed, num_train):
  """The module docstring's rule, re-derived: per class, SHA-256 order."""
  splits = {'train': set(), 'test': set()}
  for label in set(labels):
    members = sorted((hashlib.sha256(f'{seed}:{i}'.encode()).hexdigest(), i)
                     for i, l in zip(ids, labels) if l == label)
    splits['train'] |= {i for _, i in members[:num_train]}
    splits['test'] |= {i for _, i in members[num_train:]}
  return splits


# ---------------------------------------------------------------------------
# Source, labels and the split rule
# ---------------------------------------------------------------------------


def test_fixture_is_real_cifar10_in_bigbench_format(source):
  examples = _examples()
  assert len(examples) == 40 and len(source) == 40  # 40 distinct images
  assert all(sorted(e['target_scores']) == list(TFDS_CIFAR10_NAMES)
             for e in examples)
  assert sorted(label for _, label in source.values()) == sorted(
      list(range(10)) * 4)


def test_decode_matches_pil_and_label_order_matches_cifar10(source):
  assert cifar10_offline.LABEL_NAMES == TFDS_CIFAR10_NAMES
  decoded = {}
  for example in _examples():
    ex = cifar10_offline.decode(example)
    assert ex.image.dtype == np.uint8 and ex.image.shape == (32, 32, 3)
    np.testing.assert_array_equal(ex.image, source[ex.id][0])
    assert ex.label == source[ex.id][1]
    decoded[ex.image.tobytes()] = ex.label
  # foolbox's PNGs carry CIFAR-10's own labels in their file names.
  assert len(FOOLBOX_PNGS) == 8
  for path in FOOLBOX_PNGS:
    label = int(path.stem.split('_')[-1])
    pixels = np.asarray(PIL_Image.open(path).convert('RGB'))
    assert decoded[pixels.tobytes()] == label, path.name


def test_split_is_balanced_disjoint_and_the_documented_rule(source):
  ids = list(source)
  labels = [source[i][1] for i in ids]
  splits = cifar10_offline.split(ids, labels)
  train, test = set(splits['train']), set(splits['test'])
  assert len(train) == 30 and len(test) == 10
  assert not train & test and train | test == set(ids)
  for label in range(10):
    assert sum(source[i][1] == label for i in train) == 3
    assert sum(source[i][1] == label for i in test) == 1
  assert {'train': train, 'test': test} == _documented_split(
      ids, labels, seed=2023, num_train=3)


def test_split_ignores_file_order_and_follows_the_seed(source):
  ids = list(source)
  labels = [source[i][1] for i in ids]
  first = cifar10_offline.split(ids, labels)
  order = list(range(len(ids)))
  random.Random(0).shuffle(order)
  shuffled = cifar10_offline.split([ids[k] for k in order],
                                   [labels[k] for k in order])
  assert shuffled == first
  # Another seed moves some image (10 classes, 1/4 chance each to stay).
  assert set(cifar10_offline.split(ids, labels, seed=1)['test']) != set(
      first['test'])


def test_split_at_full_size_is_800_200_per_class():
  rng = np.random.RandomState(0)
  ids = [f'{v:016x}' for v in rng.randint(0, 2**62, 10_000, dtype=np.int64)]
  labels = [k // 1000 for k in range(10_000)]
  splits = cifar10_offline.split(ids, labels)
  assert (len(splits['train']), len(splits['test'])) == (8000, 2000)
  label_of = dict(zip(ids, labels))
  train_labels = [label_of[i] for i in splits['train']]
  assert np.bincount(train_labels).tolist() == [800] * 10
  assert data.dataset_info('cifar10_offline').split_sizes == {'train': 8000,
                                                              'test': 2000}


def test_split_rejects_unbalanced_or_duplicate_images():
  with pytest.raises(ValueError, match='not balanced'):
    cifar10_offline.split(['a', 'b', 'c'], [0, 0, 1])
  with pytest.raises(ValueError, match='duplicate'):
    cifar10_offline.split(['a', 'a'], [0, 1])


def test_read_task_from_the_sdist_tarball(tmp_path):
  sdist = tmp_path / cifar10_offline.SDIST_NAME
  with tarfile.open(sdist, 'w:gz') as tar:
    tar.add(TASK_JSON, arcname=cifar10_offline.TASK_MEMBER)
  assert cifar10_offline.read_task(str(sdist)) == _examples()
  assert cifar10_offline.find_source(tmp_path) == str(sdist)


# ---------------------------------------------------------------------------
# The builder and the pipeline on the fixture
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data dir whose manual dir holds the fixture task.json."""
  root = tmp_path_factory.mktemp('tfds')
  manual = root / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  shutil.copy(TASK_JSON, manual / 'task.json')
  return str(root)


@pytest.fixture(scope='module')
def builder(data_dir):
  return prepare.get_builder('cifar10_offline', data_dir)


def test_builder_prepares_the_split_from_the_manual_dir(builder, source):
  assert builder.is_prepared()
  features = builder.info.features
  assert features['image'].shape == (32, 32, 3)
  assert features['image'].dtype == np.uint8
  assert tuple(features['label'].names) == TFDS_CIFAR10_NAMES
  ids = list(source)
  expected = _documented_split(ids, [source[i][1] for i in ids], 2023, 3)
  for split, size in (('train', 30), ('test', 10)):
    assert builder.info.splits[split].num_examples == size
    seen = set()
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      example_id = ex['id'].decode()
      np.testing.assert_array_equal(ex['image'], source[example_id][0])
      assert ex['label'] == source[example_id][1]
      seen.add(example_id)
    assert seen == expected[split]


def _unnormalise(images):
  return images * STD + MEAN


def test_pipeline_eval_batches_are_normalised_source_images(builder, data_dir,
                                                            source):
  del builder
  batches = list(pipeline.make_dataset('cifar10_offline', 'test', batch_size=4,
                                       train=False, data_dir=data_dir))
  assert [len(b['label']) for b in batches] == [4, 4, 2]
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert images.dtype == np.float32 and images.shape == (10, 32, 32, 3)
  assert labels.dtype == np.int32 and sorted(labels) == list(range(10))
  pixels = _unnormalise(images) * 255.0
  by_pixels = {p.tobytes(): label for p, label in source.values()}
  for p, label in zip(pixels, labels):
    np.testing.assert_allclose(p, np.round(p), atol=1e-3)
    assert by_pixels[np.round(p).astype(np.uint8).tobytes()] == label


def test_pipeline_train_batches_get_cifar10_augmentation(builder, data_dir):
  del builder
  batches = list(pipeline.make_dataset('cifar10_offline', 'train', batch_size=10,
                                       train=True, seed=3, data_dir=data_dir))
  assert [b['image'].shape for b in batches] == [(10, 32, 32, 3)] * 3
  images = np.concatenate([b['image'] for b in batches])
  assert np.isfinite(images).all() and sorted(
      np.concatenate([b['label'] for b in batches])) == sorted(
          list(range(10)) * 3)
  # Cutout after normalisation zeroes a square of side 16 cut by the border:
  # 8..16 rows and columns. A real pixel is never exactly 0 in all channels
  # (mean * 255 is not an integer), so the zeros are the hole.
  sides = []
  for image in images:
    hole = np.all(image == 0.0, axis=-1)
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    assert hole.sum() == len(rows) * len(cols)  # one rectangle
    assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
    assert rows[-1] - rows[0] == len(rows) - 1
    sides += [len(rows), len(cols)]
  assert max(sides) > 8  # Cutout 16 (CIFAR-100's 8 never exceeds 8).


def test_preprocessing_is_cifar10s(source):
  assert data.dataset_info('cifar10_offline').preprocessing == 'cifar10'
  image = tf.constant(next(iter(source.values()))[0])
  for seed in range(3):
    key = tf.constant([seed, 7], tf.int64)
    ours = pipeline._preprocess_fn('cifar10_offline', True)(image, key)
    cifar = pipeline._preprocess_fn('cifar10', True)(image, key)
    np.testing.assert_array_equal(ours.numpy(), cifar.numpy())
  np.testing.assert_array_equal(
      pipeline._preprocess_fn('cifar10_offline', False)(image, None).numpy(),
      pipeline._preprocess_fn('cifar10', False)(image, None).numpy())


# ---------------------------------------------------------------------------
# Errors and the config
# ---------------------------------------------------------------------------


def test_missing_source_raises_one_line_with_the_make_target(tmp_path,
                                                             monkeypatch):
  monkeypatch.setenv(data.OFFLINE_ENV, '1')
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as error:
    prepare.get_builder('cifar10_offline', data_dir=str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'make cifar10-offline' in message
  assert str(tmp_path) in message
  with pytest.raises(data.DatasetUnavailableError) as error:
    prepare.get_builder('cifar10', data_dir=str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'tfds build cifar10' in message
  assert 'make cifar10-offline' in message
  assert '--config.dataset=cifar10_offline' in message
  assert time.time() - start < 10  # No download attempt.


def test_config_is_the_paper_cifar10_resnet20_recipe():
  # pylint: disable-next=g-import-not-at-top
  from configs import cifar10_offline_resnet20, paper
  config = cifar10_offline_resnet20.get_config()
  train_config.validate_config(config)
  reference = paper.paper_config('cifar10', 'resnet20')
  assert config.dataset == 'cifar10_offline'
  # Only the length and its batch-scaled learning rate differ (the docstring).
  scaled = {'dataset': 'cifar10_offline', 'epochs': 150, 'batch_size': 64,
            'learning_rate': 0.05, 'checkpoint_every_steps': 1000,
            'log_every_steps': 50}
  assert config.to_dict() == {**reference.to_dict(), **scaled}
  assert (reference.epochs, reference.batch_size,
          reference.learning_rate) == (300, 128, 0.1)
  assert config.learning_rate / config.batch_size == pytest.approx(
      reference.learning_rate / reference.batch_size)
  assert (config.model, config.momentum, config.weight_decay,
          config.levels) == ('resnet20', 0.9, 5e-4, 4)
  assert 'threshold_init' not in config.model_kwargs  # the zoo's λ = 8

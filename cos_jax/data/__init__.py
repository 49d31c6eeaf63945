"""Datasets as this project serves them: names, shapes, splits, normalisation.

This module holds facts only and imports no TensorFlow, so configs and
checkpoints can be validated in well under a second. The TensorFlow parts live
beside it:

* :mod:`cos_jax.data.prepare`  - getting a TFDS dataset ready offline;
* :mod:`cos_jax.data.cifar10_offline` - the ``cifar10_offline`` TFDS builder
  (the real CIFAR-10 test set re-split 8,000/2,000, preparable offline);
* :mod:`cos_jax.data.augment`  - AutoAugment (CIFAR-10 policy) and Cutout;
* :mod:`cos_jax.data.pipeline` - the tf.data input pipelines (``make_dataset``).

Images are normalised per channel, ``(pixel / 255 - mean) / std``, with the
constants of the PyTorch reference code (hzc1208/ANN2SNN_COS).
"""

from __future__ import annotations

import dataclasses

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012',
            'cifar10_offline')

# Env var: when truthy, never attempt a download (it could take minutes to fail).
OFFLINE_ENV = 'COS_JAX_OFFLINE'


class DatasetUnavailableError(Exception):
  """A dataset can't be prepared here; the message says what to install/pass."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset as this package serves it.

  ``image_shape`` is (H, W, C) after preprocessing; ``mean`` and ``std`` are per
  channel in [0, 1] pixel units (``image = (pixel / 255 - mean) / std``).
  ``preprocessing`` names the dataset whose input pipeline this one gets
  (augmentation, evaluation transform, shuffle buffer): itself for the TFDS
  originals, 'cifar10' for ``cifar10_offline``.
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
  preprocessing: str

  @property
  def split_sizes(self) -> dict[str, int]:
    return {self.train_split: self.num_train, self.test_split: self.num_test}


_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_SPECS = {
    'fashion_mnist': DatasetSpec(
        'fashion_mnist', 10, (28, 28, 1), 'train', 'test', 60_000, 10_000,
        mean=(0.2860,), std=(0.3530,), preprocessing='fashion_mnist'),
    'cifar10': DatasetSpec(
        'cifar10', 10, (32, 32, 3), 'train', 'test', 50_000, 10_000,
        mean=_CIFAR10_MEAN, std=_CIFAR10_STD, preprocessing='cifar10'),
    'cifar100': DatasetSpec(
        'cifar100', 100, (32, 32, 3), 'train', 'test', 50_000, 10_000,
        mean=tuple(v / 255 for v in (129.3, 124.1, 112.4)),
        std=tuple(v / 255 for v in (68.2, 65.4, 70.4)),
        preprocessing='cifar100'),
    'imagenet2012': DatasetSpec(
        'imagenet2012', 1000, (224, 224, 3), 'train', 'validation',
        1_281_167, 50_000,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        preprocessing='imagenet2012'),
    # The real CIFAR-10 test set, re-split (cos_jax.data.cifar10_offline);
    # served exactly as CIFAR-10 is.
    'cifar10_offline': DatasetSpec(
        'cifar10_offline', 10, (32, 32, 3), 'train', 'test', 8_000, 2_000,
        mean=_CIFAR10_MEAN, std=_CIFAR10_STD, preprocessing='cifar10'),
}


def dataset_info(name: str) -> DatasetSpec:
  """Returns the :class:`DatasetSpec` of one of :data:`DATASETS`."""
  if name not in _SPECS:
    raise ValueError(f'unknown dataset {name!r}: choose one of '
                     f'{", ".join(DATASETS)}')
  return _SPECS[name]

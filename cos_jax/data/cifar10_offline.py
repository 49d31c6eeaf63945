"""``cifar10_offline``: the real CIFAR-10 test set as TFDS dataset, 8,000/2,000.

CIFAR-10 cannot be downloaded on a machine that reaches only package registries,
but the PyPI source distribution of ``bigbench==1.0.0`` carries the complete
CIFAR-10 **test** set (10,000 images, 1,000 per class) in :data:`TASK_MEMBER`:
``{"examples": [{"input": <base64 32x32 RGB PNG>, "target_scores": {class: 0/1}},
...]}``. This builder re-splits it, class-balanced, into 'train' (800 per class)
and 'test' (200 per class). ``make cifar10-offline`` fetches the sdist (never
installed, only read) and prepares the dataset; :mod:`cos_jax.data.prepare` does
the preparation whenever the source is in the manual dir.

Features are those of TFDS ``cifar10``: ``image`` uint8 [32, 32, 3], ``label``
ClassLabel over :data:`LABEL_NAMES`, ``id`` text. The label order is CIFAR-10's
(``batches.meta.txt``), which is the alphabetical order of the class names; it
was checked against foolbox 3.3.4's 20 labelled CIFAR-10 test PNGs, each of which
appears in the bigbench file under the class of that label.

Split rule (:func:`split`; seed :data:`SPLIT_SEED` = 2023):

1. Each PNG is decoded to uint8 [32, 32, 3]; its ``id`` is the first 16 hex
   digits of SHA-256 of those pixel bytes (row-major H, W, C).
2. Its label is the position in :data:`LABEL_NAMES` of the one class whose
   target score is 1.
3. Within each class, images are ordered by the hex digest
   ``SHA-256(f'{SPLIT_SEED}:{id}')``, ascending: a seeded permutation that does
   not depend on the order of the file.
4. The first ``n * 4 // 5`` of each class's n images go to 'train', the rest to
   'test' (800/200 of 1,000; 3/1 for the 4-per-class test fixture).

So anyone with the same file gets the same ids in each split, whatever order the
examples come in. Every class must have the same number of images.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import tarfile
from typing import Iterable, Optional, Sequence

import numpy as np

from cos_jax.data._tensorflow import tf, tfds

# CIFAR-10's label names in label order (TFDS cifar10 reads them from the
# dataset's batches.meta.txt; they happen to be sorted).
LABEL_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
               'horse', 'ship', 'truck')
SPLIT_SEED = 2023
# 'train' gets TRAIN_PARTS / SPLIT_PARTS of every class (rounded down).
TRAIN_PARTS, SPLIT_PARTS = 4, 5

# The sdist and the file in it that holds the CIFAR-10 test set.
SDIST_NAME = 'bigbench-1.0.0.tar.gz'
TASK_MEMBER = ('bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/'
               'base64/task.json')
# Names the builder looks for in its manual dir, in this order.
SOURCE_NAMES = ('task.json', SDIST_NAME)


@dataclasses.dataclass(frozen=True)
class Example:
  """One decoded image: ``id`` (16 hex digits), uint8 [32, 32, 3], label."""
  id: str
  image: np.ndarray
  label: int


def find_source(manual_dir: os.PathLike | str) -> Optional[str]:
  """The first of :data:`SOURCE_NAMES` present in `manual_dir`, or None."""
  for name in SOURCE_NAMES:
    path = os.path.join(os.fspath(manual_dir), name)
    if os.path.isfile(path):
      return path
  return None


def read_task(path: str) -> list[dict]:
  """The ``examples`` of a bigbench task.json, or of the one inside the sdist.

  Args:
    path: a task.json, or the bigbench sdist (only :data:`TASK_MEMBER` is read).
  """
  if path.endswith('.json'):
    with open(path, 'rb') as f:
      return json.load(f)['examples']
  with tarfile.open(path, 'r:gz') as sdist:
    member = sdist.extractfile(TASK_MEMBER)
    if member is None:
      raise ValueError(f'{path} has no regular file {TASK_MEMBER}')
    return json.load(member)['examples']


def image_id(image: np.ndarray) -> str:
  """First 16 hex digits of SHA-256 of uint8 [H, W, C] pixels (row-major)."""
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def decode(example: dict) -> Example:
  """Decodes one task example into an :class:`Example`."""
  classes = [name for name, score in example['target_scores'].items() if score]
  if len(classes) != 1 or classes[0] not in LABEL_NAMES:
    raise ValueError(f'expected one CIFAR-10 class with target score 1, got '
                     f'{example["target_scores"]}')
  png = base64.b64decode(example['input'])
  image = tf.io.decode_png(png, channels=3).numpy()
  if image.shape != (32, 32, 3):
    raise ValueError(f'expected a 32x32 RGB image, got shape {image.shape}')
  return Example(image_id(image), image, LABEL_NAMES.index(classes[0]))


def _split_order(example_id: str, seed: int) -> str:
  return hashlib.sha256(f'{seed}:{example_id}'.encode()).hexdigest()


def split(ids: Sequence[str], labels: Sequence[int], seed: int = SPLIT_SEED,
          train_parts: int = TRAIN_PARTS, parts: int = SPLIT_PARTS
          ) -> dict[str, list[str]]:
  """Assigns ids to 'train' and 'test' by the rule of the module docstring.

  Args:
    ids: [N] distinct example ids.
    labels: [N] their labels; every label must occur equally often (n times).
    seed: seed of the per-class permutation.
    train_parts, parts: 'train' gets ``n * train_parts // parts`` per class.

  Returns:
    {'train': ids, 'test': ids}, each sorted by (label, seeded order).

  Raises:
    ValueError: duplicate ids, unequal classes, or a split left empty.
  """
  if len(set(ids)) != len(ids):
    raise ValueError('duplicate images in the source (ids must be distinct)')
  by_label: dict[int, list[str]] = {}
  for example_id, label in zip(ids, labels, strict=True):
    by_label.setdefault(int(label), []).append(example_id)
  counts = {label: len(members) for label, members in by_label.items()}
  if not counts:
    raise ValueError('no images to split')
  if len(set(counts.values())) != 1:
    raise ValueError(f'classes are not balanced: images per label {counts}')
  per_class = next(iter(counts.values()))
  num_train = per_class * train_parts // parts
  if not 0 < num_train < per_class:
    raise ValueError(f'{per_class} images per class leave a split empty')
  splits = {'train': [], 'test': []}
  for label in sorted(by_label):
    ordered = sorted(by_label[label], key=lambda i: _split_order(i, seed))
    splits['train'] += ordered[:num_train]
    splits['test'] += ordered[num_train:]
  return splits


def split_examples(examples: Iterable[Example], **split_kwargs
                   ) -> dict[str, list[Example]]:
  """:func:`split` applied to decoded examples; same keys, Examples as values."""
  examples = list(examples)
  by_id = {example.id: example for example in examples}
  if len(by_id) != len(examples):
    raise ValueError('duplicate images in the source (ids must be distinct)')
  ids = split(list(by_id), [e.label for e in by_id.values()], **split_kwargs)
  return {name: [by_id[i] for i in members] for name, members in ids.items()}


class Cifar10Offline(tfds.core.GeneratorBasedBuilder):
  """The real CIFAR-10 test set, re-split 8,000 train / 2,000 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Split by SHA-256 order with seed 2023, 4/5 train.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Run `make cifar10-offline`, or put {SDIST_NAME} (the PyPI sdist of '
      'bigbench==1.0.0, read, never installed) or its cifar10 task.json in '
      'the manual dir.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('The 10,000 CIFAR-10 test images (from the bigbench 1.0.0 '
                     'sdist), re-split class-balanced into 8,000 train and '
                     '2,000 test images.'),
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=(32, 32, 3)),
            'label': tfds.features.ClassLabel(names=LABEL_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.cs.toronto.edu/~kriz/cifar.html')

  def _split_generators(self, dl_manager):
    source = find_source(dl_manager.manual_dir)
    if source is None:
      raise FileNotFoundError(f'none of {", ".join(SOURCE_NAMES)} in '
                              f'{dl_manager.manual_dir}')
    splits = split_examples(decode(e) for e in read_task(source))
    return {name: self._generate_examples(members)
            for name, members in splits.items()}

  def _generate_examples(self, examples: list[Example]):
    for example in examples:
      yield example.id, {'id': example.id, 'image': example.image,
                         'label': example.label}

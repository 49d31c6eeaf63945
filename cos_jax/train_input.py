"""The training run's input: how the data splits over processes, and batches.

Epoch ``e``'s batches are ``pipeline.make_dataset(..., epoch=e)``, a pure
function of (seed, epoch, shard); a run restarted at step ``s`` re-opens epoch
``s // steps_per_epoch`` and skips the batches already done. Multi-host: each
process reads its own shard (``shard_index = process_index``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator

import numpy as np

from cos_jax import data, runtime
from cos_jax.data import pipeline
from cos_jax.train_config import ConfigError


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """How the (possibly multi-host) input is split.

  Attributes:
    spec: the dataset's facts.
    local_batch, local_eval_batch: this process's rows of a global batch.
    steps_per_epoch: SGD steps of one epoch (every process runs as many).
    eval_steps: test batches every process runs (short shards are padded).
    num_test: test examples in all (known when single-process).
    process_index, process_count: this process and how many there are.
  """
  spec: data.DatasetSpec
  local_batch: int
  local_eval_batch: int
  steps_per_epoch: int
  eval_steps: int
  num_test: int | None
  process_index: int
  process_count: int

  def shard(self) -> dict:
    if self.process_count == 1:
      return {}
    return {'shard_index': self.process_index,
            'num_shards': self.process_count}


def plan_data(config, process_index: int, process_count: int) -> DataPlan:
  """The :class:`DataPlan` of ``config`` (raises ConfigError if it is empty)."""
  spec = data.dataset_info(config.dataset)
  local_batch = config.batch_size // process_count
  local_eval = config.eval_batch_size // process_count
  # Training shards are equal-sized (the pipeline drops the remainder), so every
  # host runs the same number of steps; num_*_examples caps each host's shard.
  steps = pipeline.steps_per_epoch(config.dataset, local_batch,
                                   split=spec.train_split,
                                   num_examples=config.num_train_examples)
  if steps < 1:
    raise ConfigError(
        f'batch_size {config.batch_size} is larger than the training set '
        f'({config.num_train_examples or spec.num_train} examples): lower '
        f'--config.batch_size')
  # Test shards are near-equal; the largest has ceil(n / processes) examples.
  largest = math.ceil(spec.num_test / process_count)
  if config.num_test_examples:
    largest = min(largest, config.num_test_examples)
  num_test = (min(spec.num_test, config.num_test_examples or spec.num_test)
              if process_count == 1 else None)
  return DataPlan(spec, local_batch, local_eval, steps,
                  math.ceil(largest / local_eval), num_test, process_index,
                  process_count)


def train_batches(config, plan: DataPlan, epoch: int,
                  skip: int = 0) -> Iterator[dict]:
  """This host's training batches of ``epoch``, after skipping ``skip``."""
  it = pipeline.make_dataset(
      config.dataset, plan.spec.train_split, batch_size=plan.local_batch,
      train=True, seed=config.seed, data_dir=config.data_dir,
      num_examples=config.num_train_examples, epoch=epoch,
      drop_remainder=True, **plan.shard())
  return itertools.islice(it, skip, plan.steps_per_epoch)


def eval_batches(config, plan: DataPlan) -> Iterator[dict]:
  """Test batches padded to the eval batch size, with a 0/1 'mask'.

  Always yields ``plan.eval_steps`` batches (fully masked ones at the end of a
  short shard), so every host runs the same computations and every test
  example is counted exactly once with one compiled eval step.
  """
  it = pipeline.make_dataset(
      config.dataset, plan.spec.test_split, batch_size=plan.local_eval_batch,
      train=False, seed=config.seed, data_dir=config.data_dir,
      num_examples=config.num_test_examples, drop_remainder=False,
      **plan.shard())
  size = plan.local_eval_batch
  n = 0
  for batch in it:
    n += 1
    if n > plan.eval_steps:
      raise RuntimeError('the test split yielded more batches than expected')
    yield runtime.pad_batch(batch, size)
  empty = runtime.pad_batch(
      {'image': np.zeros((0,) + plan.spec.image_shape, np.float32),
       'label': np.zeros((0,), np.int32)}, size)
  for _ in range(plan.eval_steps - n):
    yield empty

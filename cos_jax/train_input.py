"""The training run's input: how the data splits over processes, and batches.

The data order is a function of (seed, epoch) and of ``data_shards``, K: the
split is cut into K equal shards, each shuffled and augmented by its own
seeded pipeline, and row block k of every global batch comes from shard k.
Process p of P reads only its K/P shards (those of its rows) and stacks their
batches; the global batch is the same for any P that divides K, so one
process with K = 2 reproduces two processes exactly. K = 1 is one pipeline
over the whole split. Epoch ``e``'s batches are a pure function of
(seed, e, shard); a run restarted at step ``s`` re-opens epoch
``s // steps_per_epoch`` and skips the batches already done.
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
  """How the input is split over data shards and processes.

  Attributes:
    spec: the dataset's facts.
    data_shards: K, the shards of the data order (a multiple of P).
    shards: the shards this process reads, in row order.
    shard_batch, shard_eval_batch: rows of a global batch from one shard.
    steps_per_epoch: SGD steps of one epoch (every process runs as many).
    eval_steps: test batches every process runs (short shards are padded).
    num_test: test examples in all.
    process_index, process_count: this process and how many there are.
  """
  spec: data.DatasetSpec
  data_shards: int
  shards: tuple[int, ...]
  shard_batch: int
  shard_eval_batch: int
  steps_per_epoch: int
  eval_steps: int
  num_test: int
  process_index: int
  process_count: int


def _cap(total: int | None, shards: int) -> int | None:
  return None if total is None else total // shards


def plan_data(config, process_index: int, process_count: int) -> DataPlan:
  """The :class:`DataPlan` of ``config`` (ConfigError if it cannot be)."""
  spec = data.dataset_info(config.dataset)
  shards = config.get('data_shards') or process_count
  if shards % process_count:
    raise ConfigError(f'data_shards {shards} is not a multiple of the '
                      f'{process_count} processes: set --config.data_shards '
                      f'to a multiple of {process_count}')
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % shards:
      raise ConfigError(f'{name} {config[name]} is not divisible by the '
                        f'{shards} data shards: use a multiple of {shards}')
  shard_batch = config.batch_size // shards
  shard_eval = config.eval_batch_size // shards
  steps = pipeline.steps_per_epoch(
      config.dataset, shard_batch, split=spec.train_split,
      num_examples=_cap(config.num_train_examples, shards), num_shards=shards)
  if steps < 1:
    raise ConfigError(
        f'batch_size {config.batch_size} is larger than the training set '
        f'({config.num_train_examples or spec.num_train} examples): lower '
        f'--config.batch_size')
  # Test shards are near-equal; the largest has ceil(n / shards) examples.
  num_test = min(spec.num_test, config.num_test_examples or spec.num_test)
  largest = math.ceil(spec.num_test / shards)
  if config.num_test_examples:
    largest = min(largest, _cap(config.num_test_examples, shards))
    num_test = _cap(config.num_test_examples, shards) * shards
  per_process = shards // process_count
  return DataPlan(
      spec, shards,
      tuple(range(process_index * per_process,
                  (process_index + 1) * per_process)),
      shard_batch, shard_eval, steps, math.ceil(largest / shard_eval),
      num_test, process_index, process_count)


def _stack(batches: tuple[dict, ...]) -> dict:
  """This process's rows of a global batch: its shards' batches, in order."""
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def train_batches(config, plan: DataPlan, epoch: int,
                  skip: int = 0) -> Iterator[dict]:
  """This process's rows of the training batches of ``epoch``, after
  skipping ``skip``."""
  streams = [pipeline.make_dataset(
      config.dataset, plan.spec.train_split, batch_size=plan.shard_batch,
      train=True, seed=config.seed, data_dir=config.data_dir,
      num_examples=_cap(config.num_train_examples, plan.data_shards),
      epoch=epoch, shard_index=k, num_shards=plan.data_shards,
      drop_remainder=True) for k in plan.shards]
  return itertools.islice(map(_stack, zip(*streams)), skip,
                          plan.steps_per_epoch)


def _padded_eval_stream(config, plan: DataPlan, shard: int) -> Iterator[dict]:
  """One shard's test batches, padded (with a mask) to ``eval_steps``."""
  size = plan.shard_eval_batch
  n = 0
  for batch in pipeline.make_dataset(
      config.dataset, plan.spec.test_split, batch_size=size, train=False,
      seed=config.seed, data_dir=config.data_dir,
      num_examples=_cap(config.num_test_examples, plan.data_shards),
      drop_remainder=False, shard_index=shard, num_shards=plan.data_shards):
    n += 1
    if n > plan.eval_steps:
      raise RuntimeError('the test split yielded more batches than expected')
    yield runtime.pad_batch(batch, size)
  empty = runtime.pad_batch(
      {'image': np.zeros((0,) + plan.spec.image_shape, np.float32),
       'label': np.zeros((0,), np.int32)}, size)
  for _ in range(plan.eval_steps - n):
    yield empty


def eval_batches(config, plan: DataPlan) -> Iterator[dict]:
  """This process's rows of the test batches, with a 0/1 'mask'.

  Always yields ``plan.eval_steps`` batches (fully masked rows at the end of
  a short shard), so every process runs the same computations and every test
  example is counted exactly once with one compiled eval step.
  """
  return map(_stack, zip(*[_padded_eval_stream(config, plan, k)
                           for k in plan.shards]))

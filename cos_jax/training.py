"""Training the source QCFS ANN: train state, steps, sharding, Orbax checkpoints.

The entry point is :func:`train_and_evaluate` (``train.py`` is a thin CLI around
it); :func:`load_checkpoint` is what ``convert.py`` uses to get a trained model.

Layout of a workdir::

  workdir/config.json        the run's config (written atomically)
  workdir/checkpoints/<step>  latest checkpoints (Orbax; items 'variables' =
                              {params, batch_stats} and 'train' = {step,
                              opt_state, progress}; host NumPy arrays)
  workdir/best/<step>         best-by-test-accuracy checkpoint (items 'variables'
                              and 'metadata' = {step, epoch, test_accuracy, ...})
  workdir/log.jsonl           one JSON object per logged step / epoch
  workdir/events.out.*        TensorBoard summaries (clu.metric_writers)

Data parallelism: one ``jax.sharding.Mesh`` over all devices with axis
``'data'``; batches are sharded along it, parameters and optimizer state are
replicated, and ``jax.jit`` inserts the gradient (and BatchNorm-statistics)
all-reductions, so a step computes exactly the global-batch update whatever
the device count. Multi-host: each process feeds its own shard of the data
(``shard_index=process_index``) and ``jax.make_array_from_process_local_data``
assembles the global batch.

Resume: epoch ``e``'s batches are ``cos_jax.data.make_dataset(..., epoch=e)``, a
pure function of (seed, epoch, shard); a run restarted from a checkpoint at
step ``s`` re-opens epoch ``s // steps_per_epoch`` and skips the batches already
done, so it ends with the same parameters (and log) as an uninterrupted run.
Orbax writes a checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save resumes from the previous checkpoint.

Dispatch depth: the loop keeps at most two steps in flight (it fetches step
k's metrics after dispatching step k+1). With several XLA CPU devices, queueing
many sharded steps asynchronously deadlocks in XLA's all-reduce rendezvous
(jax 0.10.2: the process aborts after 40 s), so do not "optimise" this away.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Iterator, Mapping

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from cos_jax import models

# Config fields that fix the parameter tree: a workdir's checkpoints can only
# be resumed / loaded by a config that agrees on them.
ARCHITECTURE_FIELDS = ('dataset', 'model', 'levels', 'stem', 'model_kwargs')
STEMS = ('cifar', 'imagenet')
# cos_jax.data.DATASETS, repeated so that a bad config fails without importing
# TensorFlow (seconds); tests check that the two agree.
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012')
CONFIG_FILE = 'config.json'
INIT_RNG_IMPL = 'rbg'
CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'
LOG_FILE = 'log.jsonl'


class ConfigError(ValueError):
  """A config (or its combination with a workdir/devices) that cannot run."""


class CheckpointError(RuntimeError):
  """A workdir without a usable checkpoint (missing, corrupted, mismatched)."""


def _data():
  # cos_jax.data pulls in TensorFlow; import it only when data is needed.
  from cos_jax import data  # pylint: disable=g-import-not-at-top
  return data


# --------------------------------------------------------------------------
# Devices.


def use_all_host_cores(count: int = 0) -> int | None:
  """Makes the XLA CPU backend expose one device per core (or ``count``).

  A single XLA CPU device runs convolutions on one core; with one device per
  core and the batch sharded over them a CPU trains ~2x faster (measured
  1.99x on 2 cores for the default config). Call this
  right after ``import jax``, before any computation. It only configures the
  CPU client, so it is harmless when a GPU/TPU is the default backend.

  Args:
    count: number of CPU devices; 0 means the number of usable cores, unless
      ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``
      (an explicit choice that is then kept).

  Returns:
    The CPU device count that was configured, or None when nothing was changed
    (backends already initialised, or XLA_FLAGS decides).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if count < 0:
    raise ValueError(f'host device count must be >= 0, got {count}')
  if (not count and '--xla_force_host_platform_device_count'
      in os.environ.get('XLA_FLAGS', '')):
    return None
  if not count:
    try:
      count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
      count = os.cpu_count() or 1
  if xla_bridge.backends_are_initialized():
    current = jax.config.jax_num_cpu_devices
    if current != count:
      logging.warning(
          'use_all_host_cores(%d): JAX backends are already initialised; '
          'keeping the current CPU device count. Call it right after '
          '`import jax`.', count)
    return None
  jax.config.update('jax_num_cpu_devices', count)
  return count


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over ``devices`` (default: all devices)."""
  devices = np.asarray(list(jax.devices() if devices is None else devices))
  return Mesh(devices, ('data',))


# --------------------------------------------------------------------------
# Config checks.


def _plain(value):
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one-line message) for a config that cannot train."""
  datasets = DATASETS
  if config.dataset not in datasets:
    raise ConfigError(
        f'unknown dataset {config.dataset!r}: set --config.dataset to one of '
        f'{", ".join(datasets)}')
  if config.model not in models.NAMES:
    raise ConfigError(
        f'unknown architecture {config.model!r}: set --config.model to one of '
        f'{", ".join(models.NAMES)}')
  if (not isinstance(config.levels, int) or isinstance(config.levels, bool)
      or config.levels <= 0):
    raise ConfigError(
        f'levels must be a positive integer (QCFS quantisation steps L), got '
        f'{config.levels!r}: set e.g. --config.levels=4')
  if config.stem not in STEMS:
    raise ConfigError(f'unknown stem {config.stem!r}: set --config.stem to '
                      f'one of {", ".join(STEMS)}')
  for name in ('batch_size', 'eval_batch_size', 'epochs',
               'checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps',
               'eval_every_epochs'):
    value = config[name]
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f'{name} must be a positive integer, got {value!r}: '
                        f'fix --config.{name}')
  for name in ('num_train_examples', 'num_test_examples', 'stop_after_steps'):
    value = config.get(name)
    if value is not None and (not isinstance(value, int) or value <= 0):
      raise ConfigError(f'{name} must be None or a positive integer, got '
                        f'{value!r}: fix --config.{name}')
  if not config.learning_rate > 0:
    raise ConfigError(f'learning_rate must be > 0, got {config.learning_rate}')
  if config.weight_decay < 0 or not 0 <= config.momentum < 1:
    raise ConfigError('weight_decay must be >= 0 and momentum in [0, 1)')


def check_devices(config: ml_collections.ConfigDict,
                  num_devices: int | None = None,
                  num_processes: int | None = None) -> None:
  """Raises ConfigError unless both batch sizes split evenly over devices."""
  num_devices = num_devices or jax.device_count()
  num_processes = num_processes or jax.process_count()
  for name in ('batch_size', 'eval_batch_size'):
    size = config[name]
    if size % num_devices:
      lower = max(num_devices, size // num_devices * num_devices)
      raise ConfigError(
          f'{name} {size} is not divisible by the {num_devices} devices: use '
          f'a multiple of {num_devices} (e.g. --config.{name}={lower}) or set '
          f'--host_devices to a divisor of {size}')
    if size % num_processes:
      raise ConfigError(f'{name} {size} is not divisible by the '
                        f'{num_processes} processes')


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config.json of ``workdir`` as a ConfigDict, or None if absent."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} is unreadable ({e}); it is not a config '
                          f'written by train.py') from None


def _architecture(config) -> dict[str, Any]:
  return {k: _plain(config.get(k)) for k in ARCHITECTURE_FIELDS}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Checks that ``workdir`` is new or holds a run of the same architecture.

  Returns:
    True if the workdir holds checkpoints (the run will resume).

  Raises:
    ConfigError: the saved config.json disagrees on dataset/model/levels/
      stem/model_kwargs, or checkpoints exist without a config.json.
  """
  saved = read_config(workdir)
  has_ckpt = any(
      _finalized_steps(os.path.join(workdir, d)) for d in (CHECKPOINT_DIR,
                                                           BEST_DIR))
  if saved is None:
    if has_ckpt:
      raise ConfigError(
          f'{workdir} holds checkpoints but no {CONFIG_FILE}: use a new '
          f'--workdir')
    return False
  old, new = _architecture(saved), _architecture(config)
  diff = [k for k in ARCHITECTURE_FIELDS if old[k] != new[k]]
  if diff:
    have = ', '.join(f'{k}={old[k]!r}' for k in diff)
    want = ', '.join(f'{k}={new[k]!r}' for k in diff)
    raise ConfigError(
        f'{workdir} holds a run with {have} but the config asks for {want}: '
        f'use a new --workdir, or the config it was trained with')
  return has_ckpt


def _finalized_steps(directory: str) -> list[int]:
  """Steps of finalized Orbax checkpoints in ``directory`` (tmp dirs skipped)."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
      steps.append(int(name))
  return sorted(steps)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path`` via a temp file in the same dir + os.replace."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# --------------------------------------------------------------------------
# Model, state, steps (pure pieces).


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def _tuples(value):
  """JSON lists back to (nested) tuples: hashable module attributes."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The zoo model named by ``config`` (architecture fields only).

  Raises:
    ConfigError: ``model_kwargs`` that the architecture does not have.
  """
  kwargs = {k: _tuples(v)
            for k, v in _plain(config.get('model_kwargs') or {}).items()}
  if config.model != 'small':
    kwargs['stem'] = config.stem
  try:
    return models.get(config.model, num_classes=num_classes,
                      levels=config.levels, **kwargs)
  except TypeError as e:
    raise ConfigError(
        f'model_kwargs {sorted(config.model_kwargs)} do not fit '
        f'{config.model} ({_first_line(e)}): start from that model\'s config '
        f'(e.g. --config=configs/cifar10_{config.model}.py) or from a config '
        f'with empty model_kwargs') from None


def _check_model(config, model, image_shape) -> None:
  """Raises ConfigError if the model can't be built for these images."""
  try:
    jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f'{config.model} (model_kwargs {_plain(config.model_kwargs)}) cannot '
        f'take {config.dataset} images of shape {tuple(image_shape)} '
        f'({type(e).__name__}: {_first_line(e)}): choose another model or '
        f'dataset') from None


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay to 0 over all steps (optional linear warmup)."""
  total = config.epochs * steps_per_epoch
  warmup = int(round(config.get('warmup_epochs', 0) * steps_per_epoch))
  if warmup:
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total, warmup + 1))
  return optax.cosine_decay_schedule(config.learning_rate, total)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay on every parameter.

  ``add_decayed_weights`` before ``sgd`` adds wd·p to the gradient before the
  momentum, which is exactly torch.optim.SGD(weight_decay=wd) as the reference
  uses it (thresholds λ and BatchNorm scales/biases are decayed too).
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                momentum=config.momentum or None,
                nesterov=config.get('nesterov', False)))


def create_train_state(model, rng, image_shape,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initial train state (params, batch_stats, optimizer state, step 0)."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape),
                                        jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def cross_entropy_loss(logits, labels, weights=None):
  """Mean (or ``weights``-weighted sum) softmax cross-entropy."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum()


def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
  """One SGD step on a (global) batch; returns the new state and metrics."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    return cross_entropy_loss(logits, batch['label']), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates['batch_stats'])
  accuracy = (jnp.argmax(logits, -1) == batch['label']).mean()
  return state, {'loss': loss, 'accuracy': accuracy}


def eval_step(state: TrainState, batch) -> dict:
  """Sums of loss / correct / count over the examples with ``mask`` = 1."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss': cross_entropy_loss(logits, batch['label'], mask),
          'correct': (correct * mask).sum(), 'count': mask.sum()}


# --------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class _DataPlan:
  """How the (possibly multi-host) input is split."""
  name: str
  info: Any
  num_classes: int
  image_shape: tuple[int, ...]
  local_batch: int
  local_eval_batch: int
  steps_per_epoch: int
  eval_steps: int
  num_test: int | None  # known when single-process
  process_index: int
  process_count: int


def _plan_data(config, process_index: int, process_count: int) -> _DataPlan:
  data = _data()
  info = data.dataset_info(config.dataset)
  local_batch = config.batch_size // process_count
  local_eval = config.eval_batch_size // process_count
  # Training shards are equal-sized (cos_jax.data drops the remainder), so every
  # host runs the same number of steps; num_*_examples caps each host's shard.
  steps = data.steps_per_epoch(config.dataset, local_batch,
                               split=info.train_split,
                               num_examples=config.num_train_examples)
  if steps < 1:
    raise ConfigError(
        f'batch_size {config.batch_size} is larger than the training set '
        f'({config.num_train_examples or info.num_train} examples): lower '
        f'--config.batch_size')
  # Test shards are near-equal; the largest has ceil(n / processes) examples.
  largest = math.ceil(info.num_test / process_count)
  if config.num_test_examples:
    largest = min(largest, config.num_test_examples)
  eval_steps = math.ceil(largest / local_eval)
  num_test = (min(info.num_test, config.num_test_examples or info.num_test)
              if process_count == 1 else None)
  return _DataPlan(config.dataset, info, info.num_classes,
                   tuple(info.image_shape), local_batch, local_eval, steps,
                   eval_steps, num_test, process_index, process_count)


def _shard_kwargs(plan: _DataPlan) -> dict:
  if plan.process_count == 1:
    return {}
  return {'shard_index': plan.process_index, 'num_shards': plan.process_count}


def train_batches(config, plan: _DataPlan, epoch: int,
                  skip: int = 0) -> Iterator[dict]:
  """This host's training batches of ``epoch``, after skipping ``skip``."""
  data = _data()
  it = data.make_dataset(
      config.dataset, plan.info.train_split, batch_size=plan.local_batch,
      train=True, seed=config.seed, data_dir=config.data_dir,
      num_examples=config.num_train_examples, epoch=epoch,
      drop_remainder=True, **_shard_kwargs(plan))
  return itertools.islice(it, skip, plan.steps_per_epoch)


def eval_batches(config, plan: _DataPlan) -> Iterator[dict]:
  """Test batches padded to the eval batch size, with a 0/1 'mask'.

  Always yields ``plan.eval_steps`` batches (fully masked ones at the end of a
  short shard), so every host runs the same computations and every test
  example is counted exactly once with one compiled eval step.
  """
  data = _data()
  it = data.make_dataset(
      config.dataset, plan.info.test_split, batch_size=plan.local_eval_batch,
      train=False, seed=config.seed, data_dir=config.data_dir,
      num_examples=config.num_test_examples, drop_remainder=False,
      **_shard_kwargs(plan))
  size = plan.local_eval_batch
  shape = (size,) + plan.image_shape
  n = 0
  for batch in it:
    n += 1
    if n > plan.eval_steps:
      raise RuntimeError('the test split yielded more batches than expected')
    yield _pad(batch, size)
  empty = {'image': np.zeros(shape, np.float32),
           'label': np.zeros((size,), np.int32),
           'mask': np.zeros((size,), np.float32)}
  for _ in range(plan.eval_steps - n):
    yield empty


def _pad(batch, size):
  b = len(batch['label'])
  mask = np.zeros((size,), np.float32)
  mask[:b] = 1
  if b == size:
    return {'image': batch['image'], 'label': batch['label'], 'mask': mask}
  pad = size - b
  image = np.concatenate(
      [batch['image'],
       np.zeros((pad,) + batch['image'].shape[1:], batch['image'].dtype)])
  label = np.concatenate([batch['label'], np.zeros((pad,), np.int32)])
  return {'image': image, 'label': label, 'mask': mask}


def _to_global(batch, sharding: NamedSharding):
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# --------------------------------------------------------------------------
# Checkpoints.


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _manager(directory: str, *, max_to_keep: int, create: bool,
             async_save: bool = True):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create,
      enable_async_checkpointing=async_save)
  handlers = {'variables': ocp.StandardCheckpointHandler(),
              'train': ocp.StandardCheckpointHandler(),
              'metadata': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=handlers)


_TMP_MARK = '.orbax-checkpoint-tmp'


def remove_unfinished_checkpoints(directory: str) -> list[str]:
  """Deletes the temporary dirs of saves that were killed before finalizing.

  Orbax writes a checkpoint to ``<step>.orbax-checkpoint-tmp*`` and renames it
  to ``<step>`` only when complete, so such leftovers are never read; this just
  reclaims their space. (Orbax's own ``cleanup_tmp_directories`` runs in a
  background thread that can race with the first saves, so it is not used.)
  Call it only while no save into ``directory`` is in flight.
  """
  removed = []
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if _TMP_MARK in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
  return removed


def _variables(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _train_part(state: TrainState) -> dict:
  return {'step': state.step, 'opt_state': state.opt_state}


def _host_zeros(tree):
  """NumPy zeros shaped like ``tree`` (a restore target: NumPy out)."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def _replicate(tree, sharding: NamedSharding):
  """Host NumPy tree (identical on every process) -> replicated jax.Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def _tree_mismatch(stored, expected) -> str | None:
  """First difference between a stored metadata tree and an expected tree."""
  flat_s = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(stored)[0]}
  flat_e = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
  for key in sorted(set(flat_s) | set(flat_e)):
    if key not in flat_s:
      return f'{key} expected but not stored'
    if key not in flat_e:
      return f'{key} stored but not in the model'
    s, e = tuple(flat_s[key].shape), tuple(flat_e[key].shape)
    if s != e:
      return f'{key} stored with shape {s}, the model has {e}'
  return None


def _restore_variables(manager, step, abstract_variables, where: str):
  """Validates and restores the 'variables' item of a checkpoint (NumPy).

  Checkpoints hold host (NumPy) copies of the replicated state: no per-shape
  slicing programs to compile when saving, no dependence on the device count,
  and a save can never see a buffer that a later (donating) step reuses.
  """
  ocp = _ocp()
  try:
    meta = manager.item_metadata(step)['variables']
    stored = meta.tree if hasattr(meta, 'tree') else meta
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'checkpoint {where} is corrupted or unreadable '
        f'({type(e).__name__}: {_first_line(e)}): delete it or use another '
        f'workdir') from None
  if stored is None:
    raise CheckpointError(f'checkpoint {where} is corrupted (no variables '
                          f'metadata): delete it or use another workdir')
  mismatch = _tree_mismatch(stored, abstract_variables)
  if mismatch:
    raise CheckpointError(
        f'checkpoint {where} does not match the config\'s architecture '
        f'({mismatch}): use the config it was trained with')
  try:
    return manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(_host_zeros(abstract_variables))
    ))['variables']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'checkpoint {where} is corrupted or unreadable '
        f'({type(e).__name__}: {_first_line(e)}): delete it or use another '
        f'workdir') from None


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ''
  return line if len(line) <= limit else line[:limit - 3] + '...'


def load_checkpoint(workdir: str, *, which: str = 'best'):
  """Loads a trained model for conversion.

  Args:
    workdir: a directory written by :func:`train_and_evaluate`.
    which: 'best' (highest test accuracy) or 'latest'.

  Returns:
    ``(config, model, variables)`` with ``variables = {'params',
    'batch_stats'}`` on the default device and ``model`` the zoo module.

  Raises:
    CheckpointError: (one-line message) no such workdir / checkpoint, a
      corrupted checkpoint, or one whose parameter tree does not match the
      architecture in the workdir's config.json.
  """
  if which not in ('best', 'latest'):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = os.path.abspath(workdir)  # Orbax requires absolute paths
  if not os.path.isdir(workdir):
    raise CheckpointError(f'no workdir {workdir}: train one with '
                          f'python train.py --workdir {workdir}')
  config = read_config(workdir)
  if config is None:
    raise CheckpointError(
        f'{workdir} has no {CONFIG_FILE}, so it is not a training run: train '
        f'with python train.py --workdir {workdir}')
  directory = os.path.join(workdir, BEST_DIR if which == 'best' else
                           CHECKPOINT_DIR)
  steps = _finalized_steps(directory)
  if not steps:
    raise CheckpointError(
        f'no {which} checkpoint in {directory}: train (or resume) with '
        f'python train.py --workdir {workdir}')
  try:
    info = _data().dataset_info(config.dataset)
    model = create_model(config, info.num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0),
                           jnp.zeros((1,) + tuple(info.image_shape)),
                           train=False))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise CheckpointError(f'{workdir}/{CONFIG_FILE} describes no valid model '
                          f'({_first_line(e)})') from None
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  manager = _manager(directory, max_to_keep=10**6, create=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f'no {which} checkpoint in {directory}')
    variables = _restore_variables(manager, step, abstract,
                                   os.path.join(directory, str(step)))
  finally:
    manager.close()
  return config, model, jax.tree.map(jnp.asarray, variables)


# --------------------------------------------------------------------------
# Logging.


class _JsonLog:
  """Appends one JSON object per line to workdir/log.jsonl (process 0)."""

  def __init__(self, path: str, enabled: bool, resume_step: int | None):
    self.path, self.enabled = path, enabled
    if enabled and resume_step is not None and os.path.exists(path):
      # Drop lines of steps after the checkpoint we resume from: they will be
      # recomputed (identically) and logged again.
      with open(path) as f:
        lines = [l for l in f if l.strip()]
      keep = []
      for line in lines:
        try:
          if json.loads(line).get('step', 0) <= resume_step:
            keep.append(line)
        except ValueError:
          pass
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, path)

  def write(self, **record):
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')


def _progress(total, initial, enabled):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, unit='img', unit_scale=True,
                   dynamic_ncols=True, disable=not enabled, mininterval=0.5,
                   smoothing=0.05, desc='train')


def _say(bar, text):
  if bar is not None and not bar.disable:
    bar.write(text)
  elif jax.process_index() == 0:
    print(text, flush=True)


class _Sums:
  """Running train-metric sums of the current epoch and logging interval."""
  KEYS = ('loss', 'accuracy')

  def __init__(self):
    self.epoch = dict.fromkeys(self.KEYS, 0.0)
    self.interval = dict.fromkeys(self.KEYS, 0.0)
    self.epoch_steps = self.interval_steps = 0

  @staticmethod
  def zeros() -> np.ndarray:
    return np.zeros((6,), np.float64)

  def to_array(self) -> np.ndarray:
    return np.array([self.epoch['loss'], self.epoch['accuracy'],
                     self.epoch_steps, self.interval['loss'],
                     self.interval['accuracy'], self.interval_steps],
                    np.float64)

  @classmethod
  def from_array(cls, array, step: int, steps_per_epoch: int,
                 log_every: int) -> '_Sums':
    sums = cls()
    if array is None:
      return sums
    a = [float(x) for x in np.asarray(array)]
    if step % steps_per_epoch:  # saved inside an epoch: continue its sums
      sums.epoch = {'loss': a[0], 'accuracy': a[1]}
      sums.epoch_steps = int(a[2])
    if step % log_every and step % steps_per_epoch:
      sums.interval = {'loss': a[3], 'accuracy': a[4]}
      sums.interval_steps = int(a[5])
    return sums

  def add(self, metrics):
    for k in self.KEYS:
      value = float(metrics[k])
      self.epoch[k] += value
      self.interval[k] += value
    self.epoch_steps += 1
    self.interval_steps += 1

  def take_interval(self) -> dict:
    n = max(self.interval_steps, 1)
    means = {f'train_{k}': v / n for k, v in self.interval.items()}
    self.interval = dict.fromkeys(self.KEYS, 0.0)
    self.interval_steps = 0
    return means

  def epoch_means(self) -> dict:
    n = max(self.epoch_steps, 1)
    return {f'train_{k}': v / n for k, v in self.epoch.items()}

  def new_epoch(self):
    self.epoch = dict.fromkeys(self.KEYS, 0.0)
    self.epoch_steps = 0


# --------------------------------------------------------------------------
# The training loop.


def evaluate(p_eval_step, state, config, plan, data_sharding) -> dict:
  """Test loss/accuracy of ``state`` over the whole (possibly capped) split."""
  totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}

  def add(sums):
    if sums is not None:
      for k, v in jax.device_get(sums).items():
        totals[k] += float(v)

  pending = None
  for batch in eval_batches(config, plan):
    sums = p_eval_step(state, _to_global(batch, data_sharding))
    add(pending)  # fetch one batch late: keeps the device busy
    pending = sums
  add(pending)
  count = float(totals['count'])
  if plan.num_test is not None and int(round(count)) != plan.num_test:
    logging.warning('evaluated %d test examples, expected %d', count,
                    plan.num_test)
  return {'test_loss': float(totals['loss']) / max(count, 1),
          'test_accuracy': float(totals['correct']) / max(count, 1),
          'test_examples': int(round(count))}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains the QCFS ANN of ``config``; resumes from ``workdir`` if possible.

  Args:
    config: see ``configs/default.py`` for the fields.
    workdir: where checkpoints, config.json, log.jsonl and summaries go.

  Returns:
    Final metrics: step, epoch, train_loss, train_accuracy, test_loss,
    test_accuracy, best_test_accuracy, best_step, ... (test metrics of the
    last evaluation; ``stopped_early`` if ``stop_after_steps`` ended the run).

  Raises:
    ConfigError / CheckpointError / cos_jax.data.DatasetUnavailableError
    (one-line messages) before anything in ``workdir`` is written.
  """
  # ---- Checks, before touching the workdir.
  validate_config(config)
  resuming = check_workdir(config, workdir)
  check_devices(config)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  ocp = _ocp()
  pid, nproc = jax.process_index(), jax.process_count()
  plan = _plan_data(config, pid, nproc)
  model = create_model(config, plan.num_classes)
  _check_model(config, model, plan.image_shape)
  # Prepare the data (raises DatasetUnavailableError if it can't be had).
  _data().get_builder(config.dataset, config.data_dir)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  tx = create_optimizer(config, plan.steps_per_epoch)
  # Initialise on one device, then replicate: the initial parameters cannot
  # depend on the device count. The 'rbg' PRNG compiles ~5x faster than the
  # (partitionable) threefry default on CPU, where init otherwise dominates
  # the start-up of a run.
  init = jax.jit(functools.partial(create_train_state, model,
                                   image_shape=plan.image_shape, tx=tx))
  state = init(jax.random.key(config.seed, impl=INIT_RNG_IMPL))
  state = _replicate(jax.device_get(state), replicated)

  # ---- Workdir.
  is_main = pid == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), _plain(config))
  ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  best_dir = os.path.join(os.path.abspath(workdir), BEST_DIR)
  async_save = config.get('async_checkpointing', True)
  if is_main:
    for directory in (ckpt_dir, best_dir):
      for name in remove_unfinished_checkpoints(directory):
        _say(None, f'removed the unfinished checkpoint {directory}/{name}')
  manager = _manager(ckpt_dir, max_to_keep=config.keep_checkpoints,
                     create=True, async_save=async_save)
  best_manager = _manager(best_dir, max_to_keep=1, create=True,
                          async_save=async_save)

  start_step = 0
  progress = None
  latest = manager.latest_step() if resuming else None
  if latest is not None:
    where = os.path.join(ckpt_dir, str(latest))
    variables = _restore_variables(manager, latest, _variables(state), where)
    try:
      target = _host_zeros(_train_part(state))
      target['progress'] = _Sums.zeros()
      train = manager.restore(latest, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(target)))['train']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {where} is corrupted or unreadable '
          f'({type(e).__name__}: {_first_line(e)}): delete it to resume from '
          f'an earlier one') from None
    progress = np.asarray(train.pop('progress'))
    train, variables = _replicate((train, variables), replicated)
    state = state.replace(step=train['step'], opt_state=train['opt_state'],
                          params=variables['params'],
                          batch_stats=variables['batch_stats'])
    start_step = int(jax.device_get(state.step))

  best = {'test_accuracy': -1.0, 'step': None}
  best_step = best_manager.latest_step()
  if best_step is not None:
    best = best_manager.restore(best_step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))['metadata']

  steps_per_epoch = plan.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  stop_step = min(total_steps, config.stop_after_steps or total_steps)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=not is_main, asynchronous=True)
  log = _JsonLog(os.path.join(workdir, LOG_FILE), is_main, start_step)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _plain(config).items()
                          if isinstance(v, (int, float, str, bool))})
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _say(None, f'{config.model} (L={config.levels}) on {config.dataset}: '
         f'{num_params:,} parameters, {jax.device_count()} '
         f'{jax.devices()[0].platform} device(s), global batch '
         f'{config.batch_size}, {steps_per_epoch} steps/epoch, '
         f'{config.epochs} epochs')
  else:
    _say(None, f'resuming {workdir} from step {start_step} '
         f'(epoch {start_step // steps_per_epoch}, batch '
         f'{start_step % steps_per_epoch} of {steps_per_epoch})')

  p_train_step = jax.jit(train_step, in_shardings=(replicated, data_sharding),
                         out_shardings=(replicated, replicated),
                         donate_argnums=(0,))
  p_eval_step = jax.jit(eval_step, in_shardings=(replicated, data_sharding),
                        out_shardings=replicated)

  last_saved = start_step if latest is not None else None

  final = {'step': start_step, 'epoch': start_step / steps_per_epoch}
  # Running sums of the train metrics over the current epoch and the current
  # logging interval; checkpointed with the state, so a resumed run logs
  # exactly what an uninterrupted one would.
  sums = _Sums.from_array(progress, start_step, steps_per_epoch,
                          config.log_every_steps)
  pending = None  # the last step's metrics, fetched one step late

  def drain():
    nonlocal pending
    if pending is not None:
      sums.add(jax.device_get(pending))
      bar.update(config.batch_size)
      pending = None

  def save(step):
    nonlocal last_saved
    if step == last_saved:
      return
    drain()
    variables, train = jax.device_get((_variables(state), _train_part(state)))
    train['progress'] = sums.to_array()
    manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        train=ocp.args.StandardSave(train)))
    last_saved = step

  test_metrics = None
  bar = _progress(stop_step * config.batch_size,
                  start_step * config.batch_size, is_main)
  t_start = time.time()
  step = start_step
  try:
    while step < stop_step:
      epoch, offset = divmod(step, steps_per_epoch)
      epoch_start = interval_start = time.time()
      interval_steps = 0
      stop_in_epoch = min(steps_per_epoch, stop_step - epoch * steps_per_epoch)
      batches = itertools.islice(train_batches(config, plan, epoch, offset),
                                 stop_in_epoch - offset)
      for batch in batches:
        batch = _to_global(batch, data_sharding)
        state, metrics = p_train_step(state, batch)
        step += 1
        interval_steps += 1
        # Wait for the previous step only: keeps one step in flight and the
        # progress bar honest.
        drain()
        pending = metrics
        if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
          drain()
          summary = sums.take_interval()
          seconds = time.time() - interval_start
          summary['images_per_second'] = (interval_steps * config.batch_size
                                          / max(seconds, 1e-9))
          summary['learning_rate'] = float(schedule(step - 1))
          writer.write_scalars(step, summary)
          log.write(step=step, epoch=step / steps_per_epoch, **summary)
          bar.set_postfix(loss=f'{summary["train_loss"]:.3f}',
                          acc=f'{summary["train_accuracy"]:.3f}',
                          epoch=epoch + 1, refresh=False)
          interval_start, interval_steps = time.time(), 0
        if step % config.checkpoint_every_steps == 0:
          save(step)
      drain()
      if step != epoch * steps_per_epoch + stop_in_epoch:
        raise RuntimeError(
            f'the training data of epoch {epoch} ended after '
            f'{step - epoch * steps_per_epoch} batches; expected '
            f'{steps_per_epoch} (is num_train_examples larger than the split?)')
      if step % steps_per_epoch:  # stopped inside the epoch
        final.update(step=step, epoch=step / steps_per_epoch,
                     **sums.epoch_means())
        save(step)
        continue
      train_metrics = sums.epoch_means()
      sums.new_epoch()
      final.update(step=step, epoch=step / steps_per_epoch, **train_metrics)
      completed = step // steps_per_epoch
      if completed % config.eval_every_epochs == 0 or step == total_steps:
        test_metrics = evaluate(p_eval_step, state, config, plan,
                                data_sharding)
        final.update(test_metrics)
        if test_metrics['test_accuracy'] > best['test_accuracy']:
          best = {'step': step, 'epoch': completed, **test_metrics}
          best_manager.save(step, args=ocp.args.Composite(
              variables=ocp.args.StandardSave(
                  jax.device_get(_variables(state))),
              metadata=ocp.args.JsonSave(best)))
      save(step)
      seconds = time.time() - epoch_start
      record = dict(step=step, epoch=completed, epoch_seconds=seconds,
                    **train_metrics, **(test_metrics or {}))
      if test_metrics is not None:
        record['best_test_accuracy'] = best['test_accuracy']
      writer.write_scalars(step, {k: v for k, v in record.items()
                                  if k not in ('step', 'epoch')})
      writer.flush()
      log.write(**record)
      text = (f'epoch {completed}/{config.epochs}  train loss '
              f'{train_metrics["train_loss"]:.4f} acc '
              f'{100 * train_metrics["train_accuracy"]:.2f}%')
      if test_metrics is not None:
        text += (f'  test loss {test_metrics["test_loss"]:.4f} acc '
                 f'{100 * test_metrics["test_accuracy"]:.2f}% (best '
                 f'{100 * best["test_accuracy"]:.2f}%)')
      _say(bar, text + f'  [{seconds:.0f}s]')
      test_metrics = None
  finally:
    bar.close()
    manager.wait_until_finished()
    best_manager.wait_until_finished()

  if step >= total_steps and 'test_accuracy' not in final:
    # Nothing left to train (a finished run restarted): report its state.
    final.update(evaluate(p_eval_step, state, config, plan, data_sharding))
  if step < total_steps:
    final['stopped_early'] = True
  final['best_test_accuracy'] = best['test_accuracy']
  final['best_step'] = best['step']
  final['wall_seconds'] = time.time() - t_start
  writer.flush()
  writer.close()
  manager.close()
  best_manager.close()
  if 'test_accuracy' in final:
    _say(None, f'final test accuracy {100 * final["test_accuracy"]:.2f}% '
         f'(best {100 * best["test_accuracy"]:.2f}% at step {best["step"]}), '
         f'step {step}/{total_steps}')
  else:
    _say(None, f'stopped at step {step}/{total_steps}; rerun the same command '
         f'to resume')
  return final

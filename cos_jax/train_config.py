"""What a training config means: its checks and the model it describes.

Everything here runs in well under a second and imports no TensorFlow, so a bad
config is refused before any data or device work starts. The fields are those
of ``configs/default.py``.
"""

from __future__ import annotations

import numbers
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from cos_jax import data, models
from cos_jax.settings import (SettingsError, check_choice, check_number,
                              check_optional_positive_int, check_positive_int)

class ConfigError(ValueError):
  """A config (or its combination with a workdir/devices) that cannot run."""


def first_line(e: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message, shortened to ``limit``."""
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  return line if len(line) <= limit else line[:limit - 3] + '...'


def plain(value):
  """A ConfigDict (or nested mapping/sequence) as plain, key-sorted JSON data."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def _tuples(value):
  """JSON lists back to (nested) tuples: hashable module attributes."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


# Fields a resumed run may change: they do not alter the trajectory (the
# parameters, the data order or the learning-rate schedule), only where the
# data is read from, when the run stops, and how it saves.
RESUMABLE_FIELDS = ('data_dir', 'stop_after_steps', 'async_checkpointing',
                    'keep_checkpoints')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises SettingsError (one line, naming the field) for a config that
  cannot train; the checks are :mod:`cos_jax.settings`' helpers, shared with
  convert.py."""
  check_choice('dataset', config.dataset, data.DATASETS, 'dataset')
  check_choice('model', config.model, models.NAMES, 'architecture')
  check_positive_int('levels', config.levels)  # QCFS quantisation steps L
  check_choice('stem', config.stem, models.STEMS, 'stem')
  for name in ('batch_size', 'eval_batch_size', 'epochs',
               'checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps',
               'eval_every_epochs'):
    check_positive_int(name, config[name])
  for name in ('num_train_examples', 'num_test_examples', 'stop_after_steps',
               'data_shards'):
    check_optional_positive_int(name, config.get(name))
  if (isinstance(config.seed, bool)
      or not isinstance(config.seed, numbers.Integral)):
    raise SettingsError('seed', f'must be an integer, got {config.seed!r}')
  check_number('learning_rate', config.learning_rate, 'a finite number > 0',
               lambda v: v > 0)
  check_number('weight_decay', config.weight_decay, 'a finite number >= 0',
               lambda v: v >= 0)
  check_number('momentum', config.momentum, 'in [0, 1)', lambda v: 0 <= v < 1)
  check_number('warmup_epochs', config.get('warmup_epochs', 0),
               'a finite number in [0, epochs]',
               lambda v: 0 <= v <= config.epochs)
  init_from = config.get('init_from_torch')
  if init_from is not None and not os.path.isfile(init_from):
    raise SettingsError('init_from_torch', f'{init_from!r} is not a file: '
                        'pass the path of a PyTorch .pth checkpoint')
  init_workdir = config.get('init_from_workdir')
  if init_workdir is not None:
    if init_from is not None:
      raise SettingsError('init_from_workdir', 'and init_from_torch are both '
                          'set: start from one of them')
    if not os.path.isfile(os.path.join(init_workdir, 'config.json')):
      raise SettingsError('init_from_workdir', f'{init_workdir!r} is not a '
                          'train.py workdir (no config.json): pass one')
  check_number('model_kwargs.threshold_init',
               (config.get('model_kwargs') or {}).get('threshold_init', 8.0),
               'a finite number > 0 (the initial λ)', lambda v: v > 0)


def with_data_shards(config: ml_collections.ConfigDict,
                     process_count: int) -> ml_collections.ConfigDict:
  """``config`` with ``data_shards`` resolved (None: one per process)."""
  if config.get('data_shards'):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.data_shards = process_count
  return config


def check_resume(saved: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run whose trajectory the new config would change.

  Only :data:`RESUMABLE_FIELDS` may differ from the workdir's config.json:
  a changed batch size, learning rate, seed, number of epochs (the cosine
  schedule spans them) or architecture would silently continue a different
  run.
  """
  old, new = plain(saved), plain(config)
  old.setdefault('data_shards', 1)  # what one process did before the field
  diff = [k for k in sorted(set(old) | set(new))
          if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
  if diff:
    have = ', '.join(f'{k}={old.get(k)!r}' for k in diff[:3])
    want = ', '.join(f'{k}={new.get(k)!r}' for k in diff[:3])
    raise ConfigError(
        f'{workdir} holds a run with {have} but the config asks for {want}: '
        'resume with the settings it was trained with (only '
        f'{", ".join(RESUMABLE_FIELDS)} may change), or use a new --workdir')


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


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The config's ``model_kwargs`` (tuples, hashable) plus its ``stem``."""
  kwargs = {k: _tuples(v)
            for k, v in plain(config.get('model_kwargs') or {}).items()}
  if config.model != 'small':
    kwargs['stem'] = config.stem
  return kwargs


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The zoo model named by ``config`` (architecture fields only).

  Raises:
    ConfigError: ``model_kwargs`` that the architecture does not have.
  """
  try:
    return models.get(config.model, num_classes=num_classes,
                      levels=config.levels, **model_kwargs(config))
  except TypeError as e:
    raise ConfigError(
        f'model_kwargs {sorted(config.model_kwargs)} do not fit '
        f'{config.model} ({first_line(e)}): start from that model\'s config '
        f'(e.g. --config=configs/cifar10_{config.model}.py) or from a config '
        f'with empty model_kwargs') from None


def abstract_variables(config, model) -> dict:
  """Shapes of ``{'params', 'batch_stats'}`` for the config's dataset images.

  Raises:
    ConfigError: the model cannot take those images.
  """
  shape = (1,) + tuple(data.dataset_info(config.dataset).image_shape)
  try:
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros(shape), train=False))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f'{config.model} (model_kwargs {plain(config.model_kwargs)}) cannot '
        f'take {config.dataset} images of shape {shape[1:]} '
        f'({type(e).__name__}: {first_line(e)}): choose another model or '
        f'dataset') from None
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


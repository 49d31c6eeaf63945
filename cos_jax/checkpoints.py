"""A training workdir on disk: its layout, Orbax checkpoints, and loading them.

Layout::

  workdir/config.json         the run's config (written atomically)
  workdir/checkpoints/<step>  latest checkpoints (Orbax; items 'variables' =
                              {params, batch_stats} and 'train' = {step,
                              opt_state, progress}; host NumPy arrays)
  workdir/best/<step>         best-by-test-accuracy checkpoint (items 'variables'
                              and 'metadata' = {step, epoch, test_accuracy, ...})
  workdir/log.jsonl           one JSON object per logged step / epoch
  workdir/events.out.*        TensorBoard summaries (clu.metric_writers)

Orbax writes a checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.
Checkpoints hold host (NumPy) copies of the replicated state: no per-shape
slicing programs to compile when saving, no dependence on the device count,
and a save can never see a buffer that a later (donating) step reuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cos_jax import data, ownership
from cos_jax.train_config import (ConfigError, abstract_variables,
                                  check_resume, create_model, first_line)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'
LOG_FILE = 'log.jsonl'
LOCK_FILE = '.lock'  # held by the run training in the workdir
_TMP_MARK = '.orbax-checkpoint-tmp'
# Every name train.py writes in a workdir (a trailing '/' marks a directory;
# '.*.tmp' are runtime.write_atomic's partial files): anything else is a
# user's, and such a workdir is refused.
TRAIN_NAMES = (CONFIG_FILE, LOG_FILE, LOCK_FILE, CHECKPOINT_DIR + '/',
               BEST_DIR + '/', 'events.out.tfevents.*', '.*.tmp')


class CheckpointError(RuntimeError):
  """A workdir without a usable checkpoint (missing, corrupted, mismatched)."""


def tree_digests(tree) -> dict[str, str]:
  """SHA-256 of every array of ``tree`` (its dtype, shape and bytes), by path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out


def combined_digest(digests: dict[str, str]) -> str:
  """One SHA-256 over all the (path, digest) pairs of :func:`tree_digests`."""
  return hashlib.sha256(json.dumps(sorted(digests.items())).encode()
                        ).hexdigest()


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config.json of ``workdir`` as a ConfigDict, or None if absent."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} is unreadable ({first_line(e)}); it is not '
                          'a config written by train.py') from None
  if not isinstance(saved, dict):
    raise CheckpointError(f'{path} holds a {type(saved).__name__}, not a '
                          'config written by train.py')
  return ml_collections.ConfigDict(saved)


def finalized_steps(directory: str) -> list[int]:
  """Steps of finalized Orbax checkpoints in ``directory`` (tmp dirs skipped)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit()
                and os.path.isdir(os.path.join(directory, name)))


def enclosing_workdir(path: str) -> str | None:
  """The train.py workdir that ``path`` is in or is (a folder with
  config.json and a best/ or checkpoints/ directory), or None."""
  path = os.path.realpath(path)
  while True:
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
        os.path.isdir(os.path.join(path, d)) for d in (BEST_DIR,
                                                       CHECKPOINT_DIR)):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  restart: bool = False) -> bool:
  """Checks that ``workdir`` is new, or holds only what train.py wrote.

  A run is resumed from its latest step checkpoint. A workdir with a best
  checkpoint but no ``checkpoints/`` (a copy of a shipped run) is trained
  again from step 0 only with ``restart``.

  Returns:
    True if the run resumes from a step checkpoint.

  Raises:
    ConfigError: the workdir is a file, a symlink or not writable, holds a
      file train.py did not write, holds train.py's files but no
      config.json, holds a run the config would change
      (:func:`cos_jax.train_config.check_resume`), or holds a best checkpoint
      but no ``checkpoints/``.
    CheckpointError: its config.json is unreadable.
  """
  if os.path.islink(workdir):
    raise ConfigError(f'--workdir {workdir} is a symlink: pass the directory '
                      'it points to')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file: pass a directory')
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    raise ConfigError(f'--workdir {workdir} is not writable ({existing} is '
                      'read-only to this user): pass another --workdir')
  if not os.path.exists(workdir):
    return False
  foreign = ownership.foreign_entries(workdir, TRAIN_NAMES)
  if foreign:
    raise ConfigError(f'--workdir {workdir} holds {foreign[0]!r}, which '
                      'train.py did not write: use a new or empty --workdir')
  saved = read_config(workdir)
  if saved is None:
    written = [n for n in sorted(os.listdir(workdir)) if n != LOCK_FILE]
    if written:
      raise ConfigError(f'--workdir {workdir} holds {written[0]!r} but no '
                        f'{CONFIG_FILE}, so train.py did not write it: use a '
                        'new --workdir')
    return False
  if restart:
    return False
  steps = finalized_steps(os.path.join(workdir, CHECKPOINT_DIR))
  # A run creates checkpoints/ before its first step; a best checkpoint
  # without it is a shipped or exported run, not one killed early.
  if (finalized_steps(os.path.join(workdir, BEST_DIR))
      and not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))):
    raise ConfigError(f'--workdir {workdir} holds a best checkpoint but no '
                      f'{CHECKPOINT_DIR}/ to resume from: pass --restart to '
                      'train it again from step 0 (its checkpoints and log '
                      'are deleted), or use a new --workdir')
  if steps:
    check_resume(saved, config, workdir)
  return bool(steps)


def clear_workdir(workdir: str) -> None:
  """Deletes a run's files from ``workdir`` (``train.py --restart``).

  Only a directory :func:`check_workdir` accepted is cleared: its config.json
  proves train.py wrote it, and every entry is a name train.py writes.
  """
  if (os.path.islink(workdir) or read_config(workdir) is None
      or ownership.foreign_entries(workdir, TRAIN_NAMES)):
    raise ConfigError(f'--workdir {workdir} is not a run train.py wrote: '
                      'nothing was deleted')
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name == LOCK_FILE:
      continue
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.unlink(path)


def remove_unfinished_checkpoints(directory: str) -> list[str]:
  """Deletes the temporary dirs of saves that were killed before finalizing.

  Such leftovers are never read; this only reclaims their space. (Orbax's own
  ``cleanup_tmp_directories`` runs in a background thread that can race with
  the first saves, so it is not used.) Call it only while no save into
  ``directory`` is in flight.
  """
  removed = []
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if _TMP_MARK in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
  return removed


def host_zeros(tree):
  """NumPy zeros shaped like ``tree`` (a restore target: NumPy out)."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def _tree_mismatch(stored, expected) -> str | None:
  """First difference between a stored metadata tree and an expected tree."""
  flatten = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                          jax.tree_util.tree_flatten_with_path(tree)[0]}
  flat_s, flat_e = flatten(stored), flatten(expected)
  for key in sorted(set(flat_s) | set(flat_e)):
    if key not in flat_s:
      return f'{key} expected but not stored'
    if key not in flat_e:
      return f'{key} stored but not in the model'
    s, e = tuple(flat_s[key].shape), tuple(flat_e[key].shape)
    if s != e:
      return f'{key} stored with shape {s}, the model has {e}'
  return None


def _corrupted(where: str, e: BaseException, hint: str) -> CheckpointError:
  return CheckpointError(f'checkpoint {where} is corrupted or unreadable '
                         f'({type(e).__name__}: {first_line(e)}): {hint}')


class Manager:
  """One Orbax CheckpointManager over a directory of step checkpoints.

  Items: 'variables' and 'train' (StandardCheckpointHandler, host NumPy
  trees), 'metadata' (JSON), and 'digests': the SHA-256 of every saved array
  (:func:`tree_digests`), written with the arrays and checked on every
  restore, so a corrupted file is refused instead of loaded. Checkpoints
  written before digests existed restore unverified.
  """

  def __init__(self, directory: str, *, max_to_keep: int, create: bool,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)  # Orbax requires it
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers={
            'variables': ocp.StandardCheckpointHandler(),
            'train': ocp.StandardCheckpointHandler(),
            'metadata': ocp.JsonCheckpointHandler(),
            'digests': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def where(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, **items) -> None:
    """Saves host trees (``variables``, ``train``), JSON ``metadata``, and
    the digests of the trees."""
    digests = {name: tree_digests(value) for name, value in items.items()
               if name != 'metadata'}
    args = {name: (ocp.args.JsonSave(value) if name == 'metadata'
                   else ocp.args.StandardSave(value))
            for name, value in items.items()}
    args['digests'] = ocp.args.JsonSave(digests)
    self._manager.save(step, args=ocp.args.Composite(**args))

  def restore_variables(self, step: int, abstract: dict) -> dict:
    """The 'variables' item of ``step`` after checking its tree (NumPy)."""
    where = self.where(step)
    try:
      meta = self._manager.item_metadata(step)['variables']
      stored = meta.tree if hasattr(meta, 'tree') else meta
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupted(where, e, 'delete it or use another workdir') from None
    if stored is None:
      raise CheckpointError(f'checkpoint {where} is corrupted (no variables '
                            f'metadata): delete it or use another workdir')
    mismatch = _tree_mismatch(stored, abstract)
    if mismatch:
      raise CheckpointError(
          f'checkpoint {where} does not match the config\'s architecture '
          f'({mismatch}): use the config it was trained with')
    return self._restore(step, variables=host_zeros(abstract))['variables']

  def restore_train(self, step: int, target: dict) -> dict:
    """The 'train' item of ``step`` into a host ``target`` tree."""
    return self._restore(step, train=target)['train']

  def restore_metadata(self, step: int) -> dict:
    return self._restore_json(step, 'metadata')

  def stored_digests(self, step: int) -> dict | None:
    """The digests saved with ``step`` (None for a checkpoint without)."""
    if not os.path.isdir(os.path.join(self.where(step), 'digests')):
      return None
    return self._restore_json(step, 'digests')

  def _restore_json(self, step: int, item: str):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupted(self.where(step), e,
                       'delete it to use an earlier one') from None

  def _restore(self, step: int, **targets) -> dict:
    stored = self.stored_digests(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          name: ocp.args.StandardRestore(target)
          for name, target in targets.items()}))
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupted(self.where(step), e,
                       'delete it to use an earlier one') from None
    for name in targets if stored is not None else ():
      actual = tree_digests(restored[name])
      if actual != stored.get(name):
        key = next((k for k in sorted(set(actual) | set(stored.get(name, {})))
                    if actual.get(k) != stored.get(name, {}).get(k)), name)
        raise CheckpointError(
            f'checkpoint {self.where(step)} failed its integrity check '
            f'({name}{key} differs from the digest saved with it): the file '
            'is corrupted; delete it to use an earlier one')
    return restored

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class Restored(NamedTuple):
  """A loaded checkpoint: what :func:`restore` returns.

  Attributes:
    config: the workdir's training config.
    model: the zoo module it describes.
    variables: ``{'params', 'batch_stats'}`` (jax.Arrays).
    step: the training step the checkpoint was saved at (None for a
      PyTorch checkpoint, :func:`cos_jax.interop.restore`).
    digest: :func:`combined_digest` of the variables.
    verified: whether digests were saved with it and matched.
  """
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  step: int | None
  digest: str
  verified: bool


def check_variables(variables: dict, where: str, hint: str = '') -> None:
  """Refuses variables no IF network can run: a non-finite value, a BN
  variance < 0, or a threshold <= 0. Every loader (native, PyTorch) calls it.

  A variance of exactly 0 is a channel that was constant in training (e.g.
  always 0 after a dead ReLU): BatchNorm divides by sqrt(var + ε), so it is
  valid and kept.

  Raises:
    CheckpointError: one line naming ``where`` and the first bad leaf.
  """
  hint = f': {hint}' if hint else ''
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    name, value = jax.tree_util.keystr(path), np.asarray(leaf)
    if not np.all(np.isfinite(value)):
      raise CheckpointError(f'{where} holds non-finite values (first in '
                            f'{name}){hint}')
    if name.endswith("['var']") and np.any(value < 0):
      raise CheckpointError(f'{where} has a negative BatchNorm variance in '
                            f'{name} ({value.min()}){hint}')
    if name.endswith("['threshold']") and np.any(value <= 0):
      raise CheckpointError(f'{where} has a threshold <= 0 in {name} '
                            f'({value.min()}), which no IF neuron can use')


def load_checkpoint(workdir: str, *, which: str = 'best'):
  """Loads a trained model for conversion.

  Args:
    workdir: a directory written by :func:`cos_jax.training.train_and_evaluate`.
    which: 'best' (highest test accuracy) or 'latest'.

  Returns:
    ``(config, model, variables)`` with ``variables = {'params',
    'batch_stats'}`` (jax.Arrays) and ``model`` the zoo module.

  Raises:
    CheckpointError: (one-line message) no such workdir / checkpoint, a
      corrupted checkpoint (unreadable, or arrays that differ from the digests
      saved with them), non-finite parameters, or a parameter tree that does
      not match the architecture in the workdir's config.json.
  """
  return restore(workdir, which=which)[:3]


def restore(workdir: str, *, which: str = 'best') -> Restored:
  """:func:`load_checkpoint` with the step, digest and verification."""
  if which not in ('best', 'latest'):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = os.path.abspath(workdir)
  if os.path.isfile(workdir):
    raise CheckpointError(f'--workdir {workdir} is a file, not a train.py '
                          'workdir')
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
  if not finalized_steps(directory):
    raise CheckpointError(
        f'no {which} checkpoint in {directory}: train (or resume) with '
        f'python train.py --workdir {workdir}')
  try:
    model = create_model(config, data.dataset_info(config.dataset).num_classes)
    abstract = abstract_variables(config, model)
  except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise CheckpointError(f'{workdir}/{CONFIG_FILE} describes no valid model '
                          f'({first_line(e)})') from None
  manager = Manager(directory, max_to_keep=10**6, create=False)
  try:
    step = manager.latest_step()
    variables = manager.restore_variables(step, abstract)
    verified = manager.stored_digests(step) is not None
  finally:
    manager.close()
  check_variables(variables, f'checkpoint {manager.where(step)}',
                  'the run that wrote it diverged; use an earlier checkpoint')
  return Restored(config, model, jax.tree.map(jnp.asarray, variables), step,
                  combined_digest(tree_digests(variables)), verified)

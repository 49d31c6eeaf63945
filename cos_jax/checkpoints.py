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

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cos_jax import data
from cos_jax.train_config import (ARCHITECTURE_FIELDS, ConfigError,
                                  abstract_variables, architecture,
                                  create_model, first_line)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'
LOG_FILE = 'log.jsonl'
_TMP_MARK = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
  """A workdir without a usable checkpoint (missing, corrupted, mismatched)."""


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


def finalized_steps(directory: str) -> list[int]:
  """Steps of finalized Orbax checkpoints in ``directory`` (tmp dirs skipped)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit()
                and os.path.isdir(os.path.join(directory, name)))


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Checks that ``workdir`` is new or holds a run of the same architecture.

  Returns:
    True if the workdir holds checkpoints (the run will resume).

  Raises:
    ConfigError: the saved config.json disagrees on an architecture field,
      or checkpoints exist without a config.json.
  """
  saved = read_config(workdir)
  has_checkpoints = any(finalized_steps(os.path.join(workdir, d))
                        for d in (CHECKPOINT_DIR, BEST_DIR))
  if saved is None:
    if has_checkpoints:
      raise ConfigError(f'{workdir} holds checkpoints but no {CONFIG_FILE}: '
                        f'use a new --workdir')
    return False
  old, new = architecture(saved), architecture(config)
  diff = [k for k in ARCHITECTURE_FIELDS if old[k] != new[k]]
  if diff:
    have = ', '.join(f'{k}={old[k]!r}' for k in diff)
    want = ', '.join(f'{k}={new[k]!r}' for k in diff)
    raise ConfigError(
        f'{workdir} holds a run with {have} but the config asks for {want}: '
        f'use a new --workdir, or the config it was trained with')
  return has_checkpoints


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
  trees) and 'metadata' (JSON).
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
            'metadata': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def where(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, **items) -> None:
    """Saves host trees (``variables``, ``train``) and JSON ``metadata``."""
    args = {name: (ocp.args.JsonSave(value) if name == 'metadata'
                   else ocp.args.StandardSave(value))
            for name, value in items.items()}
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
    return self._manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))['metadata']

  def _restore(self, step: int, **targets) -> dict:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{
          name: ocp.args.StandardRestore(target)
          for name, target in targets.items()}))
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupted(self.where(step), e,
                       'delete it to use an earlier one') from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
      corrupted checkpoint, or one whose parameter tree does not match the
      architecture in the workdir's config.json.
  """
  if which not in ('best', 'latest'):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = os.path.abspath(workdir)
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
    variables = manager.restore_variables(manager.latest_step(), abstract)
  finally:
    manager.close()
  return config, model, jax.tree.map(jnp.asarray, variables)


"""What a training run reports: log.jsonl, TensorBoard scalars, progress.

:class:`MetricsLog` appends one JSON record per logged step or epoch to
``workdir/log.jsonl`` and the same scalars to TensorBoard (process 0 only).
:class:`RunningSums` holds the train-metric sums of the current epoch and
logging interval; they are checkpointed with the state, so a resumed run logs
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from cos_jax import runtime


class DivergedError(RuntimeError):
  """A training step produced a non-finite loss (one-line message)."""


class MetricsLog:
  """log.jsonl + TensorBoard summaries of a workdir (written by process 0).

  Args:
    workdir: the run's directory.
    enabled: False on processes other than 0 (they only log to the console).
    resume_step: the step the run starts from; records of later steps (left
      by a run that was killed) are dropped: they will be recomputed,
      identically, and written again.
  """

  def __init__(self, workdir: str, enabled: bool, resume_step: int):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, 'log.jsonl')
    self.enabled = enabled
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not enabled, asynchronous=True)
    if enabled and os.path.exists(self.path):
      self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line).get('step', 0) <= step:
            keep.append(line)
        except ValueError:
          pass  # a line cut short by a kill
    runtime.write_atomic(self.path, ''.join(keep))

  def hparams(self, values: dict[str, Any]) -> None:
    self._writer.write_hparams(values)

  def write(self, step: int, **record) -> None:
    """Appends ``{'step': step, **record}`` and its scalars to TensorBoard."""
    self._writer.write_scalars(step, {k: v for k, v in record.items()
                                      if k != 'epoch'})
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **record}, sort_keys=True) + '\n')

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


class RunningSums:
  """Train loss/accuracy sums of the current epoch and logging interval.

  :meth:`push` takes a step's metrics while they are still on the device and
  fetches the previous step's. The loop thus keeps at most two steps in
  flight: with several XLA CPU devices, queueing many sharded steps
  asynchronously deadlocks in XLA's all-reduce rendezvous (jax 0.10.2 aborts
  the process), so do not "optimise" this away.
  """
  KEYS = ('loss', 'accuracy')

  def __init__(self, on_step=lambda: None):
    self.epoch = dict.fromkeys(self.KEYS, 0.0)
    self.interval = dict.fromkeys(self.KEYS, 0.0)
    self.epoch_steps = self.interval_steps = 0
    self._pending = None
    self._on_step = on_step

  def push(self, metrics, step: int) -> None:
    """Records step ``step``'s (device) metrics; fetches the previous step's."""
    self.settle()
    self._pending = (metrics, step)

  def settle(self) -> None:
    """Waits for the pending step and adds its metrics.

    Raises:
      DivergedError: the step's loss is not finite.
    """
    if self._pending is None:
      return
    (metrics, step), self._pending = runtime.to_host(self._pending), None
    if not math.isfinite(float(metrics['loss'])):
      raise DivergedError(
          f'training diverged: the loss is {float(metrics["loss"])} at step '
          f'{step}; nothing from that step on was saved. Lower '
          '--config.learning_rate (or check the data), then rerun: it resumes '
          'from the last checkpoint')
    for k in self.KEYS:
      value = float(metrics[k])
      self.epoch[k] += value
      self.interval[k] += value
    self.epoch_steps += 1
    self.interval_steps += 1
    self._on_step()

  def take_interval(self) -> dict[str, float]:
    """Means over the logging interval, which then starts anew."""
    self.settle()
    n = max(self.interval_steps, 1)
    means = {f'train_{k}': v / n for k, v in self.interval.items()}
    self.interval = dict.fromkeys(self.KEYS, 0.0)
    self.interval_steps = 0
    return means

  def epoch_means(self) -> dict[str, float]:
    """Means over the epoch so far."""
    self.settle()
    n = max(self.epoch_steps, 1)
    return {f'train_{k}': v / n for k, v in self.epoch.items()}

  def take_epoch(self) -> dict[str, float]:
    """Means over the epoch, which then starts anew."""
    means = self.epoch_means()
    self.epoch = dict.fromkeys(self.KEYS, 0.0)
    self.epoch_steps = 0
    return means

  def to_array(self) -> np.ndarray:
    """The sums as a float64 [6] array (saved with a checkpoint)."""
    self.settle()
    return np.array([self.epoch['loss'], self.epoch['accuracy'],
                     self.epoch_steps, self.interval['loss'],
                     self.interval['accuracy'], self.interval_steps],
                    np.float64)

  @classmethod
  def zeros(cls) -> np.ndarray:
    return cls().to_array()

  def restore(self, array, step: int, steps_per_epoch: int,
              log_every: int) -> None:
    """Continues the sums saved at ``step`` (only those still running)."""
    a = [float(x) for x in np.asarray(array)]
    if step % steps_per_epoch:  # saved inside an epoch: continue its sums
      self.epoch = {'loss': a[0], 'accuracy': a[1]}
      self.epoch_steps = int(a[2])
      if step % log_every:
        self.interval = {'loss': a[3], 'accuracy': a[4]}
        self.interval_steps = int(a[5])


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar in images (disabled on processes other than 0)."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, unit='img', unit_scale=True,
                   dynamic_ncols=True, disable=not enabled, mininterval=0.5,
                   smoothing=0.05, desc='train')


def say(text: str, bar=None) -> None:
  """Prints a line on process 0, above the progress bar if there is one."""
  if bar is not None and not bar.disable:
    bar.write(text)
  elif jax.process_index() == 0:
    print(text, flush=True)

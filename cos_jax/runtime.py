"""The host runtime: devices, the data mesh, padded batches, atomic files.

Small helpers that training, conversion and the benchmarks share. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'
_FORCED_DEVICES_FLAG = '--xla_force_host_platform_device_count'


def usable_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def use_all_host_cores(count: int = 0) -> int | None:
  """Makes the XLA CPU backend expose one device per core (or ``count``).

  A single XLA CPU device runs a convolution on one core; with one device per
  core and the batch sharded over them a CPU runs about twice as fast on two
  cores (README, benchmarks). Call this right after ``import jax``, before any
  computation. It only configures the CPU client, so it is harmless when a
  GPU/TPU is the default backend.

  Args:
    count: number of CPU devices; 0 means the number of usable cores, unless
      ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``
      (an explicit choice that is then kept).

  Returns:
    The CPU device count that was configured, or None when nothing was changed
    (JAX's backends already running, or XLA_FLAGS decides).
  """
  if count < 0:
    raise ValueError(f'host device count must be >= 0, got {count}')
  if not count and _FORCED_DEVICES_FLAG in os.environ.get('XLA_FLAGS', ''):
    return None
  count = count or usable_cores()
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # backends already initialised with another count
    logging.warning(
        'use_all_host_cores(%d): JAX is already running; keeping its CPU '
        'device count. Call it right after `import jax`.', count)
    return None
  return count


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices)."""
  devices = np.asarray(list(jax.devices() if devices is None else devices))
  return Mesh(devices, (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) shardings of ``mesh``."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))


def pad_batch(batch: dict[str, Any], size: int) -> dict[str, np.ndarray]:
  """Pads every array of ``batch`` with zeros to ``size`` rows; adds 'mask'.

  Args:
    batch: arrays with a common leading dimension ``n ≤ size`` (one of them
      named 'label' or any other: only the leading size matters).
    size: rows after padding.

  Returns:
    The padded arrays plus ``'mask'``: float32 [size], 1 for the n real rows.
  """
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f'batch of {n} does not fit in {size} rows')
  mask = np.zeros(size, np.float32)
  mask[:n] = 1
  pad = lambda x: np.concatenate(
      [x, np.zeros((size - n,) + x.shape[1:], x.dtype)]) if n < size else x
  return {**{k: pad(np.asarray(v)) for k, v in batch.items()}, 'mask': mask}


def to_global(tree, sharding: NamedSharding):
  """Host arrays (this process's rows) -> global jax.Arrays on ``sharding``.

  With one process this is ``device_put``; with several, each process passes
  its own shard and the result spans all of them.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename.

  A reader (or a crash) sees the old file or the new one, never a mix; the
  data is fsync'ed before the rename. Permissions follow the umask (not
  mkstemp's 0600).
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory,
                             prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def json_text(obj: Any) -> str:
  """``obj`` as indented, key-sorted JSON text (one trailing newline)."""
  return json.dumps(obj, indent=2, sort_keys=True) + '\n'


def write_json_atomic(path: str, obj: Any) -> None:
  """:func:`write_atomic` of ``obj`` as :func:`json_text`."""
  write_atomic(path, json_text(obj))

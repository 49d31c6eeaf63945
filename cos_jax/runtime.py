"""The host runtime: devices, the data mesh, padded batches, atomic files.

Small helpers that training, conversion and the benchmarks share. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Iterable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


class BusyError(RuntimeError):
  """Another process holds the lock of a workdir or output directory."""


class Terminated(BaseException):
  """SIGTERM arrived (raised in the main thread, like KeyboardInterrupt)."""


# The stop signals received so far (see stop_on_signals).
_STOP_SIGNALS: list[int] = []


def stop_on_signals() -> None:
  """Makes SIGINT (unless ignored) and SIGTERM stop this process: the
  handler raises KeyboardInterrupt or :class:`Terminated` and remembers the
  signal. Python drops an exception raised while it runs a garbage-collection
  callback or a ``__del__``, so the stop is raised again by
  :func:`raise_if_stopped`, which the commit points (:func:`write_atomic`,
  :func:`replace_directory`) and the batch loops call. Main thread only."""
  def handler(signum, frame):
    del frame
    _STOP_SIGNALS.append(signum)
    raise_if_stopped()
  unraisable = sys.unraisablehook
  def quiet_stops(report):
    # A dropped stop is raised again; its "Exception ignored" text is noise.
    if not (_STOP_SIGNALS and isinstance(
        report.exc_value, (KeyboardInterrupt, Terminated))):
      unraisable(report)
  if getattr(unraisable, '__name__', '') != 'quiet_stops':  # once
    sys.unraisablehook = quiet_stops
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, handler)
  signal.signal(signal.SIGTERM, handler)


def stop_signal() -> int | None:
  """The first stop signal :func:`stop_on_signals`' handler has seen, or
  None."""
  return _STOP_SIGNALS[0] if _STOP_SIGNALS else None


def raise_if_stopped() -> None:
  """Raises KeyboardInterrupt (SIGINT) or :class:`Terminated` (SIGTERM) if
  :func:`stop_on_signals`' handler has seen that signal; else nothing."""
  if _STOP_SIGNALS:
    raise (KeyboardInterrupt() if stop_signal() == signal.SIGINT
           else Terminated())
_FORCED_DEVICES_FLAG = '--xla_force_host_platform_device_count'


def usable_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def use_all_host_cores(count: int = 0) -> int | None:
  """Makes the XLA CPU backend expose one device per core (or ``count``).

  A single XLA CPU device already keeps part of a second core busy (XLA's
  intra-op threads); with one device per core and the batch sharded over them,
  training on two cores runs 2.06x faster and the zoo's models 0.97-1.48x
  (docs/performance.md). Call this right after ``import jax``, before any
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


def memory_budget() -> int | None:
  """Bytes this process's devices may hold in all: the accelerators' limits
  summed, or, on a CPU host (whose devices share its RAM), the memory
  available now. None where it cannot be known."""
  devices = jax.local_devices()
  if devices[0].platform != 'cpu':
    limits = [(d.memory_stats() or {}).get('bytes_limit') for d in devices]
    return sum(limits) if all(limits) else None
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices)."""
  devices = np.asarray(list(jax.devices() if devices is None else devices))
  return Mesh(devices, (DATA_AXIS,))


def to_host(tree):
  """Host (NumPy) copies of a tree of arrays, in any process.

  ``jax.device_get`` needs every shard on this process. With several
  processes a replicated global array has only some here, and any one of them
  is the whole value; a sharded one is gathered from all processes, so every
  process must then call this in the same order (it is a collective).
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def aligned_batches(batches: Iterable[dict], rows: int,
                    empty: dict[str, np.ndarray]) -> Iterator[dict]:
  """This process's ``batches``, each padded to ``rows`` rows with a 0/1
  'mask' (:func:`pad_batch`), continued with fully masked copies of ``empty``
  (arrays with 0 rows) until every process's stream has ended.

  With several processes, streams of unequal length (a split that does not
  divide by the process count) would leave some processes waiting in a
  collective; one all-gather of a flag per batch keeps them in step.
  """
  batches = iter(batches)
  while True:
    batch = next(batches, None)
    if not any_process(batch is not None):
      return
    yield pad_batch(empty if batch is None else batch, rows)


def any_process(flag: bool) -> bool:
  """Whether ``flag`` holds in any process (a collective with several)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


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
    os.chmod(tmp, _default_mode(0o666))
    raise_if_stopped()  # a stopped run keeps the old file
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def json_text(obj: Any) -> str:
  """``obj`` as indented, key-sorted JSON text (one trailing newline)."""
  return json.dumps(obj, indent=2, sort_keys=True) + '\n'


def _default_mode(mode: int) -> int:
  """``mode`` masked by the umask: what open()/mkdir() would have given (the
  temp-file helpers create 0600/0700 instead)."""
  umask = os.umask(0)
  os.umask(umask)
  return mode & ~umask


def write_json_atomic(path: str, obj: Any) -> None:
  """:func:`write_atomic` of ``obj`` as :func:`json_text`."""
  write_atomic(path, json_text(obj))


@contextlib.contextmanager
def exclusive_lock(path: str, what: str) -> Iterator[None]:
  """Holds an exclusive lock on file ``path`` for the duration of the block.

  The kernel releases the lock when the process dies (flock), so a killed run
  never leaves a stale lock behind. ``what`` names the locked thing in the
  one-line :class:`BusyError` raised when another process holds it.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise BusyError(f'{what} is in use by {holder}: wait for it to finish, '
                      'or use another directory') from None
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()}')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE).

  Returns False where the kernel or file system cannot (the caller falls
  back to two renames).
  """
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
               rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False
  raise OSError(code, os.strerror(code), b)


def replace_directory(build: str, target: str) -> None:
  """Puts the complete directory ``build`` at ``target``, as a whole.

  Where ``target`` exists, the two are exchanged atomically (a reader or a
  kill sees the old set of files or the new one, never a mix) and the old set
  is then deleted. ``build`` must be on the same file system (a sibling).
  """
  raise_if_stopped()  # a stopped run keeps the old set
  if not os.path.exists(target):
    os.rename(build, target)
    return
  if not _exchange(build, target):
    # No atomic exchange here: the old set moves aside first, so a kill
    # between the renames leaves it complete under `build`.
    aside = build + '.old'
    os.rename(target, aside)
    os.rename(build, target)
    build = aside
  shutil.rmtree(build)


def sibling_tempdir(target: str) -> str:
  """A new empty directory next to ``target`` (same file system)."""
  parent = os.path.dirname(os.path.abspath(target))
  os.makedirs(parent, exist_ok=True)
  path = tempfile.mkdtemp(dir=parent,
                          prefix=f'.{os.path.basename(target)}.tmp-')
  os.chmod(path, _default_mode(0o777))
  return path

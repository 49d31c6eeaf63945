"""Reading a ``torch.save`` file without PyTorch, and without running it.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` pickles the object
(for a checkpoint, a state_dict) and each tensor storage is the raw file
``<name>/data/<key>``. Unpickling an arbitrary file can run any code, so the
unpickler here knows only the globals a state_dict names (OrderedDict,
torch's tensor rebuild functions and storage types) and refuses every other
one. Tensors become NumPy arrays. Hand-written because PyTorch itself is not
a dependency; ``use_torch=True`` defers to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import zipfile
from typing import Mapping, NamedTuple

import ml_dtypes
import numpy as np

from cos_jax.checkpoints import CheckpointError

# torch storage classes by name -> the NumPy dtype of their elements.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')


class _StorageType(NamedTuple):
  """Stands for a torch storage class in the pickle (a tuple: immutable)."""
  dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
  """torch._utils._rebuild_tensor_v2 for a NumPy storage: a strided copy."""
  size, stride = tuple(size), tuple(stride)
  if (not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))
      or len(size) != len(stride)):
    raise CheckpointError(f'malformed tensor: offset {offset!r}, size {size!r}'
                          f', stride {stride!r}')
  if not math.prod(size):
    return np.zeros(size, storage.dtype)
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise CheckpointError(f'tensor of size {size} reads past its storage of '
                          f'{storage.size} elements')
  return np.array(np.lib.stride_tricks.as_strided(
      storage[offset:], size, [s * storage.itemsize for s in stride],
      writeable=False))


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save ``data.pkl`` into NumPy arrays; refuses any global
  a state_dict does not need (so no reduce can reach os.system & co)."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(archive.read(prefix + 'data.pkl')))
    self._archive, self._prefix = archive, prefix
    self._byteorder = '<' if byteorder == 'little' else '>'
    self._storages = {}

  def find_class(self, module, name):
    # Fresh objects or immutable types: nothing a pickle's BUILD opcode could
    # alter outlives this file.
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return lambda *args: _rebuild_tensor(*args)
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, *_: data
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise CheckpointError(
        f'refusing to load {module}.{name}: only a state_dict (tensors in '
        'dicts) is read; save model.state_dict() rather than the model')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise CheckpointError(f'unsupported storage reference {pid!r:.80}')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      try:
        raw = self._archive.read(f'{self._prefix}data/{key}')
      except KeyError:
        raise CheckpointError(f'storage {key!r} is missing') from None
      if len(raw) < numel * dtype.itemsize:
        raise CheckpointError(f'storage {key!r} is truncated')
      array = np.frombuffer(raw, dtype, count=numel)
      self._storages[key] = (array if array.dtype.isnative
                             else array.astype(array.dtype.newbyteorder('=')))
    return self._storages[key]


def _unpickle_zip(path: str):
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f'{path} is not a PyTorch checkpoint (a torch.save '
                          f'zip archive: {e}; re-save files from torch < 1.6 '
                          'with a current torch)') from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if re.fullmatch(r'[^/]*/data\.pkl', n)]
    if len(pickles) != 1:
      raise CheckpointError(f'{path} is not a PyTorch checkpoint: no single '
                            '<name>/data.pkl in the archive')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = (archive.read(prefix + 'byteorder').decode().strip()
                 if prefix + 'byteorder' in names else 'little')
    try:
      return _StateDictUnpickler(archive, prefix, byteorder).load()
    except CheckpointError as e:
      raise CheckpointError(f'{path}: {e}') from None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{path}: unreadable pickle: {e!r:.200}') from None


def _torch_load(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError('use_torch=True needs PyTorch installed; drop it to use '
                     'the built-in reader') from None
  return _as_numpy(torch.load(path, map_location='cpu', weights_only=True))


def _as_numpy(obj):
  """Array-likes (NumPy, JAX, torch tensors) in nested mappings as NumPy."""
  if isinstance(obj, Mapping):
    return {k: _as_numpy(v) for k, v in obj.items()}
  if type(obj).__module__.startswith('torch') and hasattr(obj, 'detach'):
    obj = obj.detach().cpu()
    return (obj.float() if 'bfloat16' in str(obj.dtype) else obj).numpy()
  return np.asarray(obj) if hasattr(obj, '__array__') else obj


def _find_state_dict(obj, source: str) -> dict[str, np.ndarray]:
  """The tensor dict inside ``obj``: itself, or under a wrapper key."""
  candidates = [obj] + [obj[k] for k in _WRAPPER_KEYS
                        if isinstance(obj, Mapping) and k in obj]
  for d in candidates:
    if (isinstance(d, Mapping) and all(isinstance(k, str) for k in d)
        and any(isinstance(v, np.ndarray) for v in d.values())):
      return {re.sub(r'^module\.', '', k): v for k, v in d.items()
              if isinstance(v, np.ndarray)}
  raise CheckpointError(f'{source} holds no state_dict (no tensors at the top '
                        f'level or under {"/".join(_WRAPPER_KEYS)})')


def read_torch_state_dict(path_or_state_dict, *,
                          use_torch: bool = False) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint's state_dict as NumPy arrays.

  Args:
    path_or_state_dict: a ``torch.save`` file, or a mapping (a state_dict of
      arrays / tensors, or a checkpoint dict wrapping one).
    use_torch: read the file with ``torch.load(weights_only=True)`` (needs
      PyTorch) instead of the built-in restricted reader.

  Returns:
    ``{key: array}`` in the file's order, without ``module.`` (DataParallel)
    prefixes and non-tensor entries; taken from under a 'state_dict',
    'model_state_dict', 'model' or 'net' entry when the top level has none.

  Raises:
    CheckpointError: no such file, not a torch.save archive, a refused global
      in its pickle, or no state_dict inside.
  """
  if isinstance(path_or_state_dict, Mapping):
    return _find_state_dict(_as_numpy(path_or_state_dict), 'the state_dict')
  path = os.fspath(path_or_state_dict)
  if not os.path.isfile(path):
    raise CheckpointError(f'no checkpoint file at {path}')
  obj = _torch_load(path) if use_torch else _unpickle_zip(path)
  return _find_state_dict(obj, path)

"""Loading the PyTorch reference's QCFS/COS checkpoints, without PyTorch.

The COS reference (hzc1208/ANN2SNN_COS) and the QCFS code it builds on
(putshua/SNN_conversion_QCFS) save ``torch.save(model.state_dict(), path)``.
:func:`load_torch_checkpoint` turns such a file into a zoo model and its
``{'params', 'batch_stats'}`` variables.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` pickles the
state_dict, each tensor storage is the raw file ``<name>/data/<key>``. The
pickle is read by a restricted unpickler that knows the handful of globals a
state_dict uses (``collections.OrderedDict``, torch's tensor rebuild functions
and storage types) and refuses every other one, so a crafted file cannot run
code; tensors become NumPy arrays.

Layer correspondence: the model is traced abstractly and its leaf layers (Conv,
BatchNorm, Activation, Dense) are listed in call order; the reference names
them by its module tree (``layer{b}.{i}`` and ``classifier.{i}`` in VGG,
``conv1.{i}``, ``conv{s}_x.{b}.residual_function.{i}``, ``.shortcut.{i}``,
``.relu`` and ``fc`` in the ResNets), which a walk along the same order
reproduces. Layout differences: OIHW conv weights become HWIO, ``[out, in]``
linear weights ``[in, out]``, ``up`` (λ, shape [1]) the scalar
``Activation_k/threshold``, and the rows of a VGG's first classifier layer go
from the reference's NCHW flatten order to ours (NHWC); ``num_batches_tracked``
and the reference's Dropout(p=0) layers carry nothing.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cos_jax import models
from cos_jax.activation import Activation
from cos_jax.checkpoints import CheckpointError

ARCHS = ('vgg16', 'resnet18', 'resnet20', 'resnet34')
_RESNET_STAGES = {(3, 3, 3): 'resnet20', (2, 2, 2, 2): 'resnet18',
                  (3, 4, 6, 3): 'resnet34'}
# torch storage classes by name -> the NumPy dtype of their elements.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')


# ---------------------------------------------------------------- reading --

class _StorageType(NamedTuple):
  dtype: Any


def _rebuild_tensor(storage, offset, size, stride, *_):
  """torch._utils._rebuild_tensor_v2 for a NumPy storage: a strided copy."""
  size, stride = tuple(size), tuple(stride)
  if (not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))
      or len(size) != len(stride)):
    raise CheckpointError(f'malformed tensor: offset {offset!r}, size {size!r}'
                          f', stride {stride!r}')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if math.prod(size) and last >= storage.size:
    raise CheckpointError(f'tensor of size {size} reads past its storage of '
                          f'{storage.size} elements')
  if not math.prod(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], size, [s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *_):
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save ``data.pkl`` into NumPy arrays; refuses any global
  a state_dict does not need (so no reduce can reach os.system & co)."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str,
               byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise CheckpointError(
        f'refusing to load {module}.{name}: a state_dict holds only tensors '
        'and containers (load it with use_torch=True if you trust the file)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f'unsupported storage reference {pid!r:.80}')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = storage_type.dtype.newbyteorder(
          '<' if self._byteorder == 'little' else '>')
      try:
        raw = self._archive.read(f'{self._prefix}data/{key}')
      except KeyError:
        raise CheckpointError(f'storage {key!r} is missing from the archive'
                              ) from None
      if len(raw) < numel * dtype.itemsize:
        raise CheckpointError(f'storage {key!r} is truncated')
      array = np.frombuffer(raw, dtype, count=numel)
      self._storages[key] = array.astype(array.dtype.newbyteorder('='))
    return self._storages[key]


def _unpickle_zip(path: str):
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f'{path} is not a PyTorch checkpoint (torch.save '
                          f'zip archive): {e}') from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl')
               and n.count('/') <= 1]
    if len(pickles) != 1:
      raise CheckpointError(f'{path} is not a PyTorch checkpoint: no single '
                            '<name>/data.pkl in the archive')
    prefix = pickles[0][:-len('data.pkl')]
    names = set(archive.namelist())
    byteorder = (archive.read(prefix + 'byteorder').decode().strip()
                 if prefix + 'byteorder' in names else 'little')
    unpickler = _StateDictUnpickler(archive.read(pickles[0]), archive, prefix,
                                    byteorder)
    try:
      return unpickler.load()
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
  obj = torch.load(path, map_location='cpu', weights_only=True)

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      x = x.detach()
      return (x.float() if x.dtype == torch.bfloat16 else x).numpy().copy()
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    return x
  return to_numpy(obj)


def _as_numpy(obj):
  """Array-likes (NumPy, JAX, torch CPU tensors) in nested mappings as NumPy."""
  if isinstance(obj, Mapping):
    return {k: _as_numpy(v) if isinstance(v, Mapping) else
            (np.asarray(v) if hasattr(v, '__array__') else v)
            for k, v in obj.items()}
  return obj


def _find_state_dict(obj, source: str) -> dict[str, np.ndarray]:
  """The tensor dict inside ``obj``: itself, or under a wrapper key."""
  def is_state_dict(d):
    return (isinstance(d, Mapping) and all(isinstance(k, str) for k in d) and
            any(isinstance(v, np.ndarray) for v in d.values()))
  wrapped = [obj[k] for k in _WRAPPER_KEYS
             if isinstance(obj, Mapping) and k in obj]
  for d in [obj] + wrapped:
    if is_state_dict(d):
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
    ``{key: array}`` in the file's order, ``module.`` (DataParallel) prefixes
    removed, non-tensor entries dropped; unwrapped from a ``'state_dict'``,
    ``'model_state_dict'``, ``'model'`` or ``'net'`` entry if needed.

  Raises:
    CheckpointError: not a torch.save archive, a refused global in its pickle,
      or no state_dict inside.
  """
  if isinstance(path_or_state_dict, Mapping):
    return _find_state_dict(_as_numpy(path_or_state_dict), 'the given mapping')
  path = os.fspath(path_or_state_dict)
  if not os.path.isfile(path):
    raise CheckpointError(f'no checkpoint file at {path}')
  obj = _torch_load(path) if use_torch else _unpickle_zip(path)
  return _find_state_dict(obj, path)


# ---------------------------------------------------------------- mapping --

class _Layer(NamedTuple):
  """One leaf layer of the zoo model and its reference module's key prefix."""
  path: tuple[str, ...]  # module path in our variables, e.g. ('Conv_3',)
  kind: str              # 'conv' | 'norm' | 'act' | 'dense'
  torch: str = ''        # reference prefix, e.g. 'layer2.4'


_KINDS = ((nn.Conv, 'conv'), (nn.BatchNorm, 'norm'), (Activation, 'act'),
          (nn.Dense, 'dense'))
_TORCH_LEAVES = {'conv': ('weight', 'bias'), 'dense': ('weight', 'bias'),
                 'norm': ('weight', 'bias', 'running_mean', 'running_var'),
                 'act': ('up',)}


def _traced_layers(model: nn.Module, image_side: int):
  """The model's leaf layers in call order, and its abstract variables."""
  layers = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      kind = next((k for cls, k in _KINDS if isinstance(context.module, cls)),
                  None)
      if kind:
        layers.append(_Layer(tuple(context.module.path), kind))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract = jax.eval_shape(
        model.init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, image_side, image_side, 3), jnp.float32))
  return layers, abstract


def _vgg_prefixes(model) -> list[tuple[str, str]]:
  # Reference: layer{b}.{4i + 0..3} = conv, BN, act, Dropout(0) per conv of
  # block b; classifier = Flatten, Linear, act, Dropout, Linear, act,
  # Dropout, Linear.
  out = []
  for b, block in enumerate(model.blocks, 1):
    for i in range(len(block)):
      out += [(f'layer{b}.{4 * i + j}', k)
              for j, k in enumerate(('conv', 'norm', 'act'))]
  return out + [(f'classifier.{i}', k) for i, k in
                ((1, 'dense'), (2, 'act'), (4, 'dense'), (5, 'act'),
                 (7, 'dense'))]


def _resnet_prefixes(model, layers) -> list[tuple[str, str]]:
  # Reference: conv1.{0,1,2} stem; conv{s+2}_x.{b}.residual_function.{0..4},
  # .shortcut.{0,1} (on a shape change), .relu (after the addition); fc.
  stage_of_block = [(s, b) for s, n in enumerate(model.stage_sizes)
                    for b in range(n)]
  per_block = collections.defaultdict(list)
  for layer in layers:
    if len(layer.path) == 2:
      per_block[layer.path[0]].append(layer.kind)
  out = [('conv1.0', 'conv'), ('conv1.1', 'norm'), ('conv1.2', 'act')]
  for k, (s, b) in enumerate(stage_of_block):
    kinds = per_block[f'BasicBlock_{k}']
    block = f'conv{s + 2}_x.{b}'
    names = [f'residual_function.{i}' for i in range(5)]
    names += [f'shortcut.{i}' for i in range(len(kinds) - 6)] + ['relu']
    out += [(f'{block}.{n}', kind) for n, kind in zip(names, kinds)]
  return out + [('fc', 'dense')]


def _named_layers(model, arch, image_side) -> tuple[list[_Layer], Any]:
  layers, abstract = _traced_layers(model, image_side)
  prefixes = (_vgg_prefixes(model) if arch == 'vgg16'
              else _resnet_prefixes(model, layers))
  if [k for _, k in prefixes] != [layer.kind for layer in layers]:
    raise ValueError(f'{arch} with these model arguments does not have the '
                     'reference layout; load it without extra model_kwargs')
  return [layer._replace(torch=p) for layer, (p, _) in
          zip(layers, prefixes)], abstract


def _leaf(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _expected(layer: _Layer, abstract) -> dict[str, tuple[int, ...]]:
  """``{torch key: torch shape}`` the layer needs."""
  params = _leaf(abstract['params'], layer.path)
  if layer.kind == 'act':
    return {f'{layer.torch}.up': (1,)}
  if layer.kind == 'norm':
    c = params['scale'].shape
    return {f'{layer.torch}.{n}': c for n in _TORCH_LEAVES['norm']}
  kernel = params['kernel'].shape
  out = {f'{layer.torch}.weight': (
      kernel[::-1] if layer.kind == 'dense'
      else (kernel[3], kernel[2], kernel[0], kernel[1]))}
  if 'bias' in params:
    out[f'{layer.torch}.bias'] = params['bias'].shape
  return out


def _convert(layer: _Layer, state, flatten_channels: int | None) -> dict:
  """The layer's ``{collection: {leaf: array}}`` from its torch tensors."""
  get = lambda leaf: state[f'{layer.torch}.{leaf}']
  if layer.kind == 'act':
    return {'params': {'threshold': get('up').reshape(())}}
  if layer.kind == 'norm':
    return {'params': {'scale': get('weight'), 'bias': get('bias')},
            'batch_stats': {'mean': get('running_mean'),
                            'var': get('running_var')}}
  w = get('weight')
  if layer.kind == 'conv':
    kernel = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif flatten_channels and w.shape[1] != flatten_channels:
    # Reference flattens NCHW (row c·HW + hw), ours NHWC (row hw·C + c).
    kernel = (w.reshape(w.shape[0], flatten_channels, -1)
              .transpose(2, 1, 0).reshape(w.shape[1], w.shape[0]))
  else:
    kernel = w.T
  params = {'kernel': kernel}
  if f'{layer.torch}.bias' in state:
    params['bias'] = get('bias')
  return {'params': params}


def _normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # MPLayer (the reference's SNN wrapper) keeps λ under '<act>.act.up';
  # BN's num_batches_tracked is a counter we do not need.
  return {re.sub(r'\.act\.up$', '.up', k): v for k, v in state.items()
          if not k.endswith('.num_batches_tracked')}


def _image_side(arch, model, state) -> int:
  """Input side whose flattened VGG features match the checkpoint's."""
  w = state.get('classifier.1.weight')
  if arch != 'vgg16' or w is None or w.ndim != 2:
    return 32
  cells, rem = divmod(w.shape[1], model.blocks[-1][-1])
  side = math.isqrt(cells)
  return 32 * side if not rem and side * side == cells else 32


def _assign(tree: dict, path, leaves: dict, dtype) -> None:
  for name in path:
    tree = tree.setdefault(name, {})
  tree.update({k: jnp.asarray(np.asarray(v, dtype)) for k, v in
               leaves.items()})


# ----------------------------------------------------------- public edges --

class TorchCheckpointInfo(NamedTuple):
  """What a reference state_dict says about its network.

  Attributes:
    arch: 'vgg16', 'resnet18', 'resnet20' or 'resnet34'.
    num_classes: outputs of its last linear layer.
    levels: L from the reference's file name ``..._L<L>.pth`` (its state_dict
      does not store L), or None.
    model_kwargs: zoo attributes that differ from ``models.get``'s defaults
      (narrower widths, ``stem='imagenet'``); ``{}`` for the paper's nets.
  """
  arch: str
  num_classes: int
  levels: int | None
  model_kwargs: dict


def _guess(state) -> TorchCheckpointInfo | None:
  """Architecture, classes and widths from the reference's key names."""
  out_channels = lambda key: int(state[key].shape[0])
  if 'classifier.7.weight' in state:
    blocks = collections.defaultdict(dict)
    for key, w in state.items():
      m = re.fullmatch(r'layer(\d+)\.(\d+)\.weight', key)
      if m and w.ndim == 4:
        blocks[int(m[1])][int(m[2])] = int(w.shape[0])
    blocks = tuple(tuple(b[i] for i in sorted(b)) for _, b in
                   sorted(blocks.items()))
    if tuple(map(len, blocks)) != tuple(map(len, models.VGG16_BLOCKS)):
      return None
    kwargs = {'blocks': blocks, 'hidden': out_channels('classifier.1.weight')}
    default = {'blocks': models.VGG16_BLOCKS, 'hidden': 4096}
    return TorchCheckpointInfo(
        'vgg16', out_channels('classifier.7.weight'), None,
        {k: v for k, v in kwargs.items() if v != default[k]})
  if 'fc.weight' in state and 'conv1.0.weight' in state:
    stages = collections.defaultdict(set)
    for key in state:
      m = re.match(r'conv(\d+)_x\.(\d+)\.', key)
      if m:
        stages[int(m[1])].add(int(m[2]))
    sizes = tuple(len(stages[s]) for s in sorted(stages))
    arch = _RESNET_STAGES.get(sizes)
    if arch is None:
      return None
    kwargs = {
        'stage_features': tuple(
            out_channels(f'conv{s}_x.0.residual_function.0.weight')
            for s in sorted(stages)),
        'stem': 'imagenet' if state['conv1.0.weight'].shape[-1] == 7
                else 'cifar'}
    default = {'stage_features': models.get(
        arch, num_classes=1, levels=1).stage_features, 'stem': 'cifar'}
    return TorchCheckpointInfo(
        arch, out_channels('fc.weight'), None,
        {k: v for k, v in kwargs.items() if v != default[k]})
  return None


def inspect_torch_checkpoint(path_or_state_dict, *,
                             use_torch: bool = False) -> TorchCheckpointInfo:
  """Which zoo network a reference checkpoint holds (for CLIs: fill
  ``load_torch_checkpoint``'s arguments from the file).

  Raises:
    CheckpointError: unreadable, or keys of no zoo architecture.
  """
  state = _normalise_keys(read_torch_state_dict(path_or_state_dict,
                                                use_torch=use_torch))
  info = _guess(state)
  if info is None:
    raise CheckpointError(
        f'the keys of {_source(path_or_state_dict)} match none of '
        f'{", ".join(ARCHS)} as the COS/QCFS reference names them (first key '
        f'{next(iter(state), None)!r})')
  if not isinstance(path_or_state_dict, Mapping):
    m = re.search(r'_L(\d+)\.pth?$', os.fspath(path_or_state_dict))
    info = info._replace(levels=int(m[1]) if m else None)
  return info


def _source(path_or_state_dict) -> str:
  return ('the state_dict' if isinstance(path_or_state_dict, Mapping)
          else os.fspath(path_or_state_dict))


def _check_keys(state, expected: dict, arch: str, source: str) -> None:
  missing = next((k for k in expected if k not in state), None)
  unexpected = next((k for k in state if k not in expected), None)
  if missing is None and unexpected is None:
    return
  guess = _guess(state)
  hint = (f'; the file looks like {guess.arch}' if guess and guess.arch != arch
          else '')
  if missing is not None:
    extra = (f' (first unexpected key: {unexpected!r})' if unexpected else '')
    raise CheckpointError(f'{source} has no key {missing!r} that {arch} needs'
                          f'{extra}{hint}')
  raise CheckpointError(f'{source} has unexpected key {unexpected!r} for '
                        f'{arch}{hint}')


def _check_shapes(state, expected: dict, arch: str, source: str) -> None:
  for key, shape in expected.items():
    got = state[key].shape
    if key.endswith('.up') and math.prod(got) == 1:
      continue
    if tuple(got) != tuple(shape):
      raise CheckpointError(
          f'{source}: key {key!r} has shape {tuple(got)}, {arch} with these '
          f'arguments needs {tuple(shape)} (check num_classes and the widths;'
          ' inspect_torch_checkpoint reads them from the file)')


def load_torch_checkpoint(path_or_state_dict, *, arch: str, num_classes: int,
                          levels: int, use_torch: bool = False,
                          **model_kwargs) -> tuple[nn.Module, dict]:
  """A zoo model and its variables from a COS/QCFS reference checkpoint.

  Args:
    path_or_state_dict: a ``torch.save(model.state_dict())`` file of
      hzc1208/ANN2SNN_COS or putshua/SNN_conversion_QCFS (also wrapped in a
      checkpoint dict, or saved from DataParallel), or such a mapping.
    arch: 'vgg16', 'resnet18', 'resnet20' or 'resnet34'.
    num_classes: classifier outputs (the file's last linear layer).
    levels: the QCFS L the network was trained with (not stored in the file).
    use_torch: read with ``torch.load(weights_only=True)`` (needs PyTorch)
      instead of the built-in restricted reader.
    **model_kwargs: zoo attributes, e.g. ``stem='imagenet'`` or the widths of
      a narrowed net (``blocks``/``hidden``, ``stage_features``).

  Returns:
    ``(model, variables)``: ``models.get(arch, ...)`` and ``{'params',
    'batch_stats'}`` of float32 arrays (float64 when x64 is enabled).

  Raises:
    CheckpointError: not a checkpoint, a refused pickle global, or keys or
      shapes that do not fit ``arch`` (the message names the first key).
    ValueError: an unknown ``arch`` or bad ``levels``.

  Example:
    >>> model, variables = load_torch_checkpoint(
    ...     'QCFS_CIFAR10_vgg16_L4.pth', arch='vgg16', num_classes=10, levels=4)
    >>> run = cos_jax.evaluate_snn(model, variables, images, T=8, rho=4)
  """
  if arch not in ARCHS:
    raise ValueError(f'arch must be one of {", ".join(ARCHS)}, got {arch!r}')
  model = models.get(arch, num_classes=num_classes, levels=levels,
                     **model_kwargs)
  source = _source(path_or_state_dict)
  state = _normalise_keys(read_torch_state_dict(path_or_state_dict,
                                                use_torch=use_torch))
  layers, abstract = _named_layers(model, arch, _image_side(arch, model,
                                                            state))
  expected = {}
  for layer in layers:
    expected.update(_expected(layer, abstract))
  _check_keys(state, expected, arch, source)
  _check_shapes(state, expected, arch, source)
  dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
  flatten_channels = model.blocks[-1][-1] if arch == 'vgg16' else None
  variables = {}
  for layer in layers:
    converted = _convert(layer, state, flatten_channels
                         if layer.torch == 'classifier.1' else None)
    for collection, leaves in converted.items():
      _assign(variables.setdefault(collection, {}), layer.path, leaves, dtype)
  return model, variables

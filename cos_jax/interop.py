"""Loading the PyTorch reference's QCFS/COS checkpoints, without PyTorch.

The COS reference (hzc1208/ANN2SNN_COS) and the QCFS code it builds on
(putshua/SNN_conversion_QCFS) save ``torch.save(model.state_dict(), path)``;
:mod:`cos_jax.torch_reader` reads such a file without PyTorch and without
running it (a restricted unpickler).

Layer correspondence: the zoo model is traced abstractly and its leaf layers
(Conv, BatchNorm, Activation, Dense) listed in call order; the reference's
names (``layer{b}.{i}`` / ``classifier.{i}`` in VGG; ``conv1.{i}``,
``conv{s}_x.{b}.residual_function.{i}`` / ``.shortcut.{i}`` / ``.relu`` and
``fc`` in the ResNets) follow the same order. Layouts: OIHW conv weights become
HWIO, ``[out, in]`` linear weights ``[in, out]``, ``up`` (λ, shape [1]) the
scalar ``Activation_k/threshold`` (one per channel, e.g. ``[1, C, 1, 1]``, a
``[C]`` one); the rows of VGG's first classifier layer go
from the reference's NCHW flatten order to ours (NHWC). ``num_batches_tracked``
and the reference's Dropout(p=0) layers carry nothing.
"""

from __future__ import annotations

import collections
import functools
import math
import operator
import os
import re
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cos_jax import checkpoints, models
from cos_jax.activation import Activation
from cos_jax.checkpoints import CheckpointError
from cos_jax.settings import SettingsError
from cos_jax.torch_reader import read_torch_state_dict

ARCHS = ('vgg16', 'resnet18', 'resnet20', 'resnet34')
_RESNET_STAGES = {(3, 3, 3): 'resnet20', (2, 2, 2, 2): 'resnet18',
                  (3, 4, 6, 3): 'resnet34'}
# ---------------------------------------------------------------- mapping --

class _Layer(NamedTuple):
  path: tuple[str, ...]  # module path in our variables, e.g. ('Conv_3',)
  kind: str              # 'conv' | 'norm' | 'act' | 'dense'
  torch: str = ''        # the reference module's key prefix, e.g. 'layer2.4'


def _traced_layers(model: nn.Module, image_side: int):
  """The model's leaf layers in call order, and its abstract variables."""
  layers = []

  def record(next_fun, args, kwargs, context):
    kind = next((k for cls, k in ((nn.Conv, 'conv'), (nn.BatchNorm, 'norm'),
                                  (Activation, 'act'), (nn.Dense, 'dense'))
                 if isinstance(context.module, cls)), None)
    if kind and context.method_name == '__call__':
      layers.append(_Layer(tuple(context.module.path), kind))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract = jax.eval_shape(
        model.init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, image_side, image_side, 3), jnp.float32))
  return layers, abstract


def _vgg_prefixes(model, _) -> list[str]:
  # Per conv i of block b: layer{b}.{4i + 0..3} = conv, BN, act, Dropout(0).
  # classifier: Flatten, Linear, act, Dropout, Linear, act, Dropout, Linear.
  return [f'layer{b}.{4 * i + j}' for b, block in enumerate(model.blocks, 1)
          for i in range(len(block)) for j in range(3)] + [
              f'classifier.{i}' for i in (1, 2, 4, 5, 7)]


def _resnet_prefixes(model, layers) -> list[str]:
  # Stem conv1.{0,1,2}; per block conv{s+2}_x.{b}: residual_function.{0..4},
  # shortcut.{0,1} (only on a shape change), relu (after the addition); fc.
  per_block = collections.Counter(layer.path[0] for layer in layers
                                  if len(layer.path) == 2)
  out = ['conv1.0', 'conv1.1', 'conv1.2']
  blocks = [(s, b) for s, n in enumerate(model.stage_sizes) for b in range(n)]
  for k, (s, b) in enumerate(blocks):
    shortcut = per_block[f'BasicBlock_{k}'] - 6  # 6 layers without one
    out += [f'conv{s + 2}_x.{b}.{name}' for name in
            [f'residual_function.{i}' for i in range(5)]
            + [f'shortcut.{i}' for i in range(shortcut)] + ['relu']]
  return out + ['fc']


def _named_layers(model, arch, image_side) -> tuple[list[_Layer], Any]:
  layers, abstract = _traced_layers(model, image_side)
  prefixes = (_vgg_prefixes if arch == 'vgg16' else _resnet_prefixes)(
      model, layers)
  if len(prefixes) != len(layers):
    raise ValueError(f'{arch} with these model arguments does not have the '
                     'reference layout')
  return [layer._replace(torch=p) for layer, p in zip(layers, prefixes)
          ], abstract


def _slots(layer: _Layer, abstract) -> list[tuple[str, str, str, tuple]]:
  """(torch key, collection, our leaf, torch shape) of each tensor it takes."""
  params = functools.reduce(operator.getitem, layer.path, abstract['params'])
  key = lambda leaf: f'{layer.torch}.{leaf}'
  if layer.kind == 'act':
    return [(key('up'), 'params', 'threshold', (1,))]
  if layer.kind == 'norm':
    c = params['scale'].shape
    return [(key('weight'), 'params', 'scale', c),
            (key('bias'), 'params', 'bias', c),
            (key('running_mean'), 'batch_stats', 'mean', c),
            (key('running_var'), 'batch_stats', 'var', c)]
  k = params['kernel'].shape
  out = [(key('weight'), 'params', 'kernel',
          k[::-1] if layer.kind == 'dense' else (k[3], k[2], k[0], k[1]))]
  if 'bias' in params:
    out.append((key('bias'), 'params', 'bias', params['bias'].shape))
  return out


def _to_zoo_layout(layer: _Layer, leaf: str, w: np.ndarray,
                   flatten_channels: int | None) -> np.ndarray:
  if leaf == 'threshold':
    return w.reshape(() if w.size == 1 else (-1,))
  if leaf != 'kernel':
    return w
  if layer.kind == 'conv':
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if flatten_channels and w.shape[1] != flatten_channels:
    # The reference flattens NCHW (row c·HW + hw), the zoo NHWC (hw·C + c).
    return (w.reshape(w.shape[0], flatten_channels, -1).transpose(2, 1, 0)
            .reshape(w.shape[1], w.shape[0]))
  return w.T


def _normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # MPLayer (the reference's SNN wrapper) keeps λ under '<act>.act.up';
  # BN's num_batches_tracked is a counter the zoo does not need.
  return {re.sub(r'\.act\.up$', '.up', k): v for k, v in state.items()
          if not k.endswith('.num_batches_tracked')}


def _image_side(arch, model, state) -> int:
  """Input side whose flattened VGG features fit the checkpoint's classifier
  (224 for the reference's ImageNet VGG; a misfit fails the shape check)."""
  w = state.get('classifier.1.weight')
  if arch != 'vgg16' or w is None:
    return 32
  return 32 * max(1, math.isqrt(w.shape[-1] // model.blocks[-1][-1]))


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
  width = lambda key: int(state[key].shape[0])
  numbered = lambda pattern: sorted(
      tuple(map(int, m.groups())) for m in map(re.compile(pattern).match, state)
      if m)
  try:
    if 'classifier.7.weight' in state:  # VGG: layer{b}.{i}, classifier.{i}
      convs = [(b, i) for b, i in numbered(r'layer(\d+)\.(\d+)\.weight$')
               if state[f'layer{b}.{i}.weight'].ndim == 4]
      blocks = tuple(tuple(width(f'layer{b}.{i}.weight') for b2, i in convs
                           if b2 == b) for b in sorted({b for b, _ in convs}))
      if tuple(map(len, blocks)) != tuple(map(len, models.VGG16_BLOCKS)):
        return None
      arch, classes = 'vgg16', width('classifier.7.weight')
      kwargs = {'blocks': blocks, 'hidden': width('classifier.1.weight')}
    else:  # ResNet: conv1.{i}, conv{s}_x.{b}.*, fc
      blocks = set(numbered(r'conv(\d+)_x\.(\d+)\.'))
      stages = sorted({s for s, _ in blocks})
      arch = _RESNET_STAGES.get(tuple(
          sum(1 for s2, _ in blocks if s2 == s) for s in stages))
      if arch is None:
        return None
      classes = width('fc.weight')
      kwargs = {'stage_features': tuple(
          width(f'conv{s}_x.0.residual_function.0.weight') for s in stages),
                'stem': ('imagenet' if state['conv1.0.weight'].shape[-1] == 7
                         else 'cifar')}
  except KeyError:
    return None
  default = models.get(arch, num_classes=classes, levels=1)
  return TorchCheckpointInfo(arch, classes, None, {
      k: v for k, v in kwargs.items() if v != getattr(default, k)})


def _source(path_or_state_dict) -> str:
  return ('the state_dict' if isinstance(path_or_state_dict, Mapping)
          else os.fspath(path_or_state_dict))


def inspect_torch_checkpoint(path_or_state_dict, *,
                             use_torch: bool = False) -> TorchCheckpointInfo:
  """Which zoo network a reference checkpoint holds (for CLIs: fill
  :func:`load_torch_checkpoint`'s arguments from the file).

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


def _check(state, slots, arch: str, source: str) -> None:
  """One line naming the first missing, unexpected or misshapen key."""
  expected = {key: shape for key, _, _, shape in slots}
  missing = next((k for k in expected if k not in state), None)
  unexpected = next((k for k in state if k not in expected), None)
  guess = _guess(state) if missing or unexpected else None
  hint = (f'; the file looks like {guess.arch}' if guess and guess.arch != arch
          else '')
  if missing:
    extra = f' (first unexpected key: {unexpected!r})' if unexpected else ''
    raise CheckpointError(f'{source} has no key {missing!r} that {arch} needs'
                          f'{extra}{hint}')
  if unexpected:
    raise CheckpointError(f'{source} has unexpected key {unexpected!r} for '
                          f'{arch}{hint}')
  for key, shape in expected.items():
    got = tuple(state[key].shape)
    # λ may be one value or one per channel (any [1, C, 1, 1]-like layout;
    # the slot checks C against its input when it runs).
    if got != shape and not (key.endswith('.up') and (
        math.prod(got) == 1 or sum(d > 1 for d in got) == 1)):
      raise CheckpointError(
          f'{source}: key {key!r} has shape {got}, {arch} with these '
          f'arguments needs {shape} (check num_classes and the widths; '
          'inspect_torch_checkpoint reads them from the file)')


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
    CheckpointError: not a checkpoint, a refused pickle global, keys or
      shapes that do not fit ``arch`` (the message names the first key), or
      values no IF network can run (:func:`cos_jax.checkpoints.check_variables`:
      non-finite, a negative variance, a threshold <= 0).
    ValueError: an unknown ``arch`` or bad ``levels``.

  Example:
    >>> net, weights = cos_jax.interop.load_torch_checkpoint(  # narrow widths
    ...     'tests/fixtures/torch/QCFS_CIFAR10_resnet20_L4.pth',
    ...     arch='resnet20', num_classes=10, levels=4, stage_features=(4, 6, 8))
    >>> jax.eval_shape(net.apply, weights, jnp.zeros((1, 32, 32, 3))).shape
    (1, 10)
  """
  if arch not in ARCHS:
    raise ValueError(f'arch must be one of {", ".join(ARCHS)}, got {arch!r}')
  model = models.get(arch, num_classes=num_classes, levels=levels,
                     **model_kwargs)
  state = _normalise_keys(read_torch_state_dict(path_or_state_dict,
                                                use_torch=use_torch))
  layers, abstract = _named_layers(model, arch,
                                   _image_side(arch, model, state))
  _check(state, [s for layer in layers for s in _slots(layer, abstract)],
         arch, _source(path_or_state_dict))
  dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64
  variables = {}
  for layer in layers:
    flatten = (model.blocks[-1][-1] if layer.torch == 'classifier.1'
               else None)
    for key, collection, leaf, _ in _slots(layer, abstract):
      tree = variables.setdefault(collection, {})
      for name in layer.path:
        tree = tree.setdefault(name, {})
      tree[leaf] = jnp.asarray(np.asarray(
          _to_zoo_layout(layer, leaf, state[key], flatten), dtype))
  checkpoints.check_variables(variables, _source(path_or_state_dict))
  return model, variables


# Dataset a reference checkpoint is evaluated on, by its number of classes
# (the file does not say; --dataset overrides).
DATASET_BY_CLASSES = {10: 'cifar10', 100: 'cifar100', 1000: 'imagenet2012'}


def restore(path: str, *, arch: str | None = None,
            num_classes: int | None = None, levels: int | None = None,
            dataset: str | None = None) -> checkpoints.Restored:
  """A reference checkpoint as :func:`cos_jax.checkpoints.restore` gives a
  native one (what ``convert.py --torch_checkpoint`` loads).

  ``arch``, ``num_classes`` and the widths come from the file's keys unless
  given; ``levels`` from a ``..._L<L>.pth`` file name unless given;
  ``dataset`` from the number of classes unless given.

  Raises:
    CheckpointError: unreadable file or keys that fit no zoo network.
    SettingsError: L, or the dataset, cannot be inferred and was not given.
  """
  info = inspect_torch_checkpoint(path)
  arch = arch or info.arch
  num_classes = num_classes or info.num_classes
  levels = levels or info.levels
  if levels is None:
    raise SettingsError('levels', f'is needed: {path} does not record the '
                        'QCFS L it was trained with; pass e.g. --levels 4')
  dataset = dataset or DATASET_BY_CLASSES.get(num_classes)
  if dataset is None:
    raise SettingsError('dataset', f'is needed for a {num_classes}-class '
                        'network: pass e.g. --dataset cifar10')
  kwargs = info.model_kwargs if arch == info.arch else {}
  model, variables = load_torch_checkpoint(
      path, arch=arch, num_classes=num_classes, levels=levels, **kwargs)
  config = ml_collections.ConfigDict({
      'dataset': dataset, 'model': arch, 'levels': levels,
      'stem': kwargs.get('stem', 'cifar'),
      'model_kwargs': {k: v for k, v in kwargs.items() if k != 'stem'}})
  return checkpoints.Restored(
      config, model, variables, step=None,
      digest=checkpoints.combined_digest(checkpoints.tree_digests(variables)),
      verified=False)

"""``convert.py --model FILE.py:NAME``: a user's own network, traced.

The contract: ``FILE.py`` is a Python file and ``NAME`` a function in it that
takes no arguments and returns a mapping with

* ``'fn'``: ``fn(variables, images) -> logits [B, C]``, the inference
  function (any JAX code; each ``jax.nn.relu`` call is a site);
* ``'variables'``: its trained variables, any pytree of arrays;
* ``'levels'``: the QCFS L it was trained with;
* ``'thresholds'`` (optional): the trained thresholds, a sequence in site
  order or a mapping by site name (``cos_jax.with_qcfs`` names them);
  absent or None: every site gets ``'threshold_init'`` (default 8.0);
* ``'balance'`` (optional): True for a plain-ReLU network trained without
  QCFS (``'levels'`` is then only the L of the analyses): its thresholds are
  balanced per channel on the training split of ``--dataset``
  (``cos_jax.balance_thresholds``; docs/plain_relu.md) and its ANN is the
  function itself.

The dataset comes from ``--dataset`` (its images' shape is what the function
is traced on). The result is what a checkpoint loader returns, so the rest of
convert.py (table, files, plots, energy) is the same as for a zoo net.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import jax
import ml_collections
import numpy as np

from cos_jax import checkpoints, data, traced
from cos_jax.jaxpr_walk import NotConvertible
from cos_jax.settings import SettingsError

REQUIRED = ('fn', 'variables', 'levels')
OPTIONAL = ('thresholds', 'threshold_init', 'balance')


def _import(path: str):
  """The module at ``path`` (a .py file), imported under its file name."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'cos_jax_user_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str) -> tuple[str, str]:
  """``'FILE.py:NAME'`` -> (FILE.py, NAME), checked to exist."""
  path, sep, name = spec.rpartition(':')
  if not sep or not path.endswith('.py') or not name.isidentifier():
    raise SettingsError('model', f'must be FILE.py:NAME (a function in a '
                        f'Python file), got {spec!r}')
  if not os.path.isfile(path):
    raise SettingsError('model', f'{path} is not a file')
  return path, name


def _finite(variables) -> None:
  for key, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise SettingsError('model', 'returned variables with non-finite '
                          f'values at {jax.tree_util.keystr(key)}')


def restore(spec: str, *, dataset: str | None) -> checkpoints.Restored:
  """The network ``NAME()`` of ``FILE.py`` describes, traced on
  ``dataset``'s image shape, as a :class:`~cos_jax.checkpoints.Restored`.

  Raises:
    SettingsError: a bad spec, no dataset, a return value outside the
      contract, or a network that cannot convert (one line each).
  """
  path, name = split_spec(spec)
  if not dataset:
    raise SettingsError('dataset', 'is needed with --model: pass e.g. '
                        '--dataset fashion_mnist')
  image_shape = data.dataset_info(dataset).image_shape
  function = getattr(_import(path), name, None)
  if not callable(function):
    raise SettingsError('model', f'{path} has no function {name!r}')
  described = function()
  if not isinstance(described, Mapping) or any(k not in described
                                               for k in REQUIRED):
    raise SettingsError('model', f'{name}() must return a mapping with keys '
                        f'{", ".join(REQUIRED)} (and optionally '
                        f'{", ".join(OPTIONAL)}); see cos_jax/user_model.py')
  unknown = sorted(set(described) - set(REQUIRED + OPTIONAL))
  if unknown:
    raise SettingsError('model', f'{name}() returned unknown keys {unknown}')
  _finite(described['variables'])
  images = np.zeros((1,) + tuple(image_shape), np.float32)
  try:
    model, variables = traced.trace(
        described['fn'], described['variables'], images,
        levels=described['levels'],
        thresholds=described.get('thresholds'),
        threshold_init=described.get('threshold_init', 8.0))
  except (NotConvertible, ValueError) as e:
    raise SettingsError('model', f'{spec}: {e}') from None
  balance = described.get('balance', False)
  if not isinstance(balance, bool):
    raise SettingsError('model', f"{name}()'s 'balance' must be True or "
                        f'False, got {balance!r}')
  model = model.clone(plain_relu=balance)
  digests = checkpoints.tree_digests(variables)
  config = ml_collections.ConfigDict({
      'dataset': dataset, 'model': f'{os.path.basename(path)}:{name}',
      'levels': model.levels})
  return checkpoints.Restored(config, model, variables, None,
                              checkpoints.combined_digest(digests), False)

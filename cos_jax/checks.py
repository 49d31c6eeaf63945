"""The library's argument checks, where the values are concrete (outside jit).

:func:`check_inputs` calls these at the top of every public
function (``init_v0``, ``calibrate``, ``simulate``, ``evaluate_snn``) and
``analysis.layer_statistics`` through it, so that a wrong argument is a
``ValueError`` (or :class:`~cos_jax.settings.SettingsError`) of one line that
names it, instead of a Flax shape error, a silent broadcast or an XLA
allocation of a terabyte. Shapes are checked on tracers too (they are static);
values only where they are concrete.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from cos_jax import blocks, neuron, runtime
from cos_jax.activation import SpikingConfig, model_variables
from cos_jax.blocks import block_steps
from cos_jax.settings import Calibration, SettingsError

# Simulated time-steps per image above which a call is refused: the paper's
# runs need a few hundred (T ≤ 256 plus ρ·iterations), and one compiled run
# cannot be interrupted, so a mistyped T of 10⁶ would hold the machine for
# hours. The variable overrides it.
MAX_STEPS_ENV = 'COS_JAX_MAX_STEPS'
DEFAULT_MAX_STEPS = 100_000
# Part of the available memory a block may ask for (the rest: the variables,
# the data pipeline, XLA's own buffers).
MEMORY_SHARE = 0.9


def max_steps() -> int:
  """The bound on simulated time-steps per image (``$COS_JAX_MAX_STEPS``)."""
  text = os.environ.get(MAX_STEPS_ENV, '')
  return int(text) if text.strip().isdigit() else DEFAULT_MAX_STEPS


def check_steps(field: str, value, steps: int) -> None:
  """Refuses ``field = value`` when it makes ``steps`` simulated time-steps per
  image, more than :func:`max_steps` (one line, bound and override named)."""
  bound = max_steps()
  if steps > bound:
    raise SettingsError(
        field, f'{value} makes {steps} simulated time-steps per image, above '
        f'the bound of {bound} (hours of compiled work that Ctrl-C cannot '
        f'stop): lower it, or set {MAX_STEPS_ENV}={steps} to allow it')


def check_memory(field: str, value, need: int) -> None:
  """Refuses ``field = value`` when its longest block needs ``need`` bytes,
  more than :data:`MEMORY_SHARE` of :func:`cos_jax.runtime.memory_budget`."""
  budget = runtime.memory_budget()
  if budget is not None and need > MEMORY_SHARE * budget:
    raise SettingsError(
        field, f'{value} makes a block that needs up to {need / 2**30:.1f} '
        f'GiB, more than the {MEMORY_SHARE * budget / 2**30:.1f} GiB '
        'available: lower it, the batch, or time_chunk')


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _concrete(x) -> bool:
  return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


@functools.partial(jax.jit, static_argnames='allow_inf')
def _all_valid(tree, allow_inf: bool) -> jax.Array:
  test = (lambda x: ~jnp.isnan(x)) if allow_inf else jnp.isfinite
  return jnp.all(jnp.array([jnp.all(test(x)) for x in jax.tree.leaves(tree)]
                           or [True]))


def check_finite(name: str, tree, allow_inf: bool = False) -> None:
  """ValueError if a concrete ``tree`` holds NaN, or ±inf unless
  ``allow_inf`` (tracers pass)."""
  leaves = [x for x in jax.tree.leaves(tree) if _concrete(x)]
  if leaves and not bool(runtime.to_host(_all_valid(leaves, allow_inf))):
    raise ValueError(
        f'{name} holds NaN' + ('' if allow_inf else ' or inf') + ': the IF '
        'network would silently turn it into spikes or none')


def check_images(images) -> None:
  """ValueError unless ``images`` is an array with a batch axis of B ≥ 1."""
  if not _is_array(images):
    raise ValueError(f'images must be an array [B, H, W, C], got '
                     f'{type(images).__name__}: pass np.asarray(images)')
  if images.ndim < 2 or images.shape[0] == 0:
    raise ValueError(f'images must be a batch [B, ...] with B >= 1, got shape '
                     f'{images.shape}')


def check_variables(variables) -> None:
  """ValueError unless ``variables`` is a mapping with 'params'."""
  if not hasattr(variables, 'keys') or 'params' not in variables:
    keys = (sorted(variables.keys()) if hasattr(variables, 'keys')
            else type(variables).__name__)
    raise ValueError("variables must hold 'params' (and 'batch_stats'), as "
                     f"model.init gives them; got {keys}")


class ModelFacts(NamedTuple):
  """What a model with these variables makes of one image (from shapes).

  Attributes:
    v0: ``{path: shape}`` of every IF layer's v0 leaf for a batch of 1.
    step_bytes: bytes of all module outputs of one image at one time-step.
  """
  v0: dict[str, tuple[int, ...]]
  step_bytes: int


def model_facts(model: nn.Module, variables, image_shape,
                batch_shape: tuple | None = None,
                image_dtype=None) -> ModelFacts:
  """:class:`ModelFacts` of ``model`` on images of ``image_shape`` (no batch
  axis) and ``image_dtype`` (None: the variables' float type, as a float64
  model takes float64 images), cached by the shapes.

  Given the ``batch_shape`` the images came in, a refusal says whether they
  lack their batch axis (whether the model takes one image of that shape).

  Raises:
    ValueError: images of that shape do not fit the variables (the message
      names ``images`` and the model's error).
  """
  variables = model_variables(variables)
  leaves, treedef = jax.tree.flatten(variables)
  abstract = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
                   for x in leaves)
  if image_dtype is None:
    floats = [x.dtype for x in abstract if jnp.issubdtype(x.dtype,
                                                         jnp.floating)]
    image_dtype = jnp.result_type(*floats) if floats else jnp.float32
  try:
    return _model_facts(model, treedef, abstract, tuple(image_shape),
                        jnp.dtype(image_dtype))
  except ValueError:
    if batch_shape and _fits(model, jax.tree.unflatten(treedef, abstract),
                             tuple(batch_shape), image_dtype):
      raise ValueError(
          f'images of shape {tuple(batch_shape)} have no batch axis: the model takes one '
          'image of that shape; pass images[None]') from None
    raise


@functools.lru_cache(maxsize=64)
def _model_facts(model, treedef, abstract, image_shape,
                 image_dtype) -> ModelFacts:
  variables = jax.tree.unflatten(treedef, abstract)
  image = jax.ShapeDtypeStruct((1,) + image_shape, image_dtype)
  try:
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False,
                                 capture_intermediates=True,
                                 mutable=['intermediates']), variables, image)
    _, spiking = jax.eval_shape(
        lambda v, x: model.clone(spiking=SpikingConfig(steps=1)).apply(
            v, x, train=False, mutable=['v0']), variables, image)
  except Exception as e:  # pylint: disable=broad-except
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = line.split(' (https://')[0][:240]
    raise ValueError(
        f'images of shape [B, {", ".join(map(str, image_shape))}] do not fit '
        f'the variables ({type(e).__name__}: {line}): pass the images the '
        'model was trained on') from None
  v0 = {jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(
            spiking.get('v0', {}))[0]}
  step_bytes = sum(leaf.size * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(state))
  if hasattr(model, 'step_bytes'):  # a traced model has no submodules to
    step_bytes = model.step_bytes(variables, image)  # capture
  return ModelFacts(v0, step_bytes)


def _fits(model, variables, image_shape, image_dtype) -> bool:
  """Whether one image of ``image_shape`` (a batch without its axis) fits."""
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                   jax.ShapeDtypeStruct((1,) + image_shape, image_dtype))
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def check_v0(v0: Any, facts: ModelFacts, batch: int) -> None:
  """ValueError unless ``v0``'s leaves are those of :func:`cos_jax.init_v0`
  for this model and a batch of ``batch``, and (where concrete) not NaN."""
  expected = {path: (batch,) + shape[1:] for path, shape in facts.v0.items()}
  try:
    got = {jax.tree_util.keystr(p): tuple(np.shape(x))
           for p, x in jax.tree_util.tree_flatten_with_path(v0)[0]}
  except (TypeError, ValueError):
    got = {}
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing or extra:
    what = (f'has no leaf {missing[0]}' if missing else
            f'has a leaf {extra[0]} the model does not have')
    raise ValueError(f'v0 {what}: pass the v0 of init_v0 or calibrate for '
                     'this model and these images')
  for path, shape in expected.items():
    if got[path] != shape:
      raise ValueError(
          f'v0{path} has shape {got[path]}, expected {shape} for a batch of '
          f'{batch}: a v0 is per image, compute it for these images')
  # +inf is a calibrated value (a saturated neuron fires at every step,
  # neuron.shift_v0) and -inf silences a neuron: only NaN means nothing.
  check_finite('v0', v0, allow_inf=True)


def run_bounds(T: int, calibration: Calibration | None,
               time_chunk: int | None, record_steps: int = 0) -> dict:
  """:func:`check_inputs`'s ``steps`` and ``block`` for a run
  of T steps after ``calibration`` (None: uncalibrated), named by the setting
  that makes each long."""
  rounds = calibration.rho * calibration.iterations if calibration else 0
  by_length = sorted([('T', T, T)] + (
      [('iterations', calibration.iterations, rounds) if
       calibration.iterations > 1 else ('rho', calibration.rho, rounds)]
      if calibration else []), key=lambda item: -item[2])
  probe = calibration.rho if calibration else 1
  block = block_steps(max(T, probe), probe, time_chunk, record_steps)
  field = ('time_chunk' if time_chunk and block == time_chunk else
           'rho' if calibration and block == probe else 'T')
  value = {'time_chunk': time_chunk, 'rho': probe, 'T': T}[field]
  return {'steps': (by_length[0][:2] + (T + rounds,),),
          'block': (field, value, block)}


def check_inputs(variables: Any, images, model: nn.Module | None = None,
                 v0: Any | None = None, *, steps: tuple = (),
                 block: tuple | None = None) -> None:
  """The public functions' argument checks (those of this module).

  Raises ValueError or SettingsError (one line naming the argument) for
  images that are not an array with a batch axis or do not fit the model's
  variables, variables without 'params', a threshold that is not finite and
  > 0, a v0 whose leaves are not those of this model and batch, non-finite
  images, NaN in v0 (+inf is a calibrated value), a run longer than
  :func:`cos_jax.max_steps`, or a block larger than the memory.

  Args:
    steps: ``(field, value, time-steps per image)`` of the settings that set
      the run's length.
    block: ``(field, value, time-steps)`` of the longest time-folded block
      and the setting that makes it long.

  Shapes are checked under ``jit`` too; values (thresholds, finiteness) only
  where concrete: under ``jit`` a threshold of 0 passes (docs/reliability.md).
  """
  check_images(images)
  check_variables(variables)
  for field, value, total in steps:
    check_steps(field, value, total)
  flat = traverse_util.flatten_dict(variables['params'])
  for path, value in flat.items():
    if path[-1] == 'threshold':
      try:
        neuron.check_threshold(value)
      except ValueError as e:
        raise ValueError(f'{"/".join(path)}: {e}') from None
  if model is not None:
    facts = model_facts(model, variables, images.shape[1:],
                               images.shape, images.dtype)
    if v0 is not None:
      check_v0(v0, facts, images.shape[0])
    if block is not None:
      field, value, block_length = block
      check_memory(field, value, blocks.memory_bound(
          model, variables, images.shape[1:], batch=images.shape[0],
          steps=block_length))
  check_finite('images', images)

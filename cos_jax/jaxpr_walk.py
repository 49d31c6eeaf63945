"""Walking a traced function's jaxpr: its ReLU sites and the linearity check.

A *site* is one ``jax.nn.relu`` call (also ``flax.linen.relu``,
``flax.nnx.relu`` and what Equinox calls): in a jaxpr, a ``custom_jvp_call``
whose body is the jitted function named ``relu``. :func:`evaluate` runs a
jaxpr with a caller's rule at every site, inlining the calls (``jit``,
``custom_jvp_call``, ...) that contain sites. :func:`check_linear` proves
that the spiking network computes the rates the ANN computes: between two
sites, and from the last site to the output, every operation on a value that
depends on a site must be linear (or affine) in it.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
from jax._src import source_info_util  # the user's file:line of an equation

# Operations that are linear in every operand that carries spikes.
_LINEAR = frozenset({
    'add', 'add_any', 'sub', 'neg', 'reshape', 'broadcast_in_dim',
    'transpose', 'squeeze', 'expand_dims', 'slice', 'concatenate',
    'reduce_sum', 'reduce_window_sum', 'rev', 'copy', 'copy_p', 'cumsum',
    'sharding_constraint', 'reduce_precision', 'pad', 'mesh_cast',
    'reshard', 'optimization_barrier',
})
# Bilinear operations: linear when exactly one operand carries spikes.
_BILINEAR = frozenset({'mul', 'dot_general', 'conv_general_dilated'})
# Operations linear in their first operand only (the rest must be static).
_FIRST_ONLY = frozenset({'div', 'dynamic_slice', 'gather',
                         'dynamic_update_slice'})
_RANDOM = frozenset({'random_bits', 'random_seed', 'random_wrap',
                     'random_unwrap', 'random_split', 'random_fold_in',
                     'threefry2x32', 'rng_bit_generator', 'rng_uniform'})
_BRANCHES = frozenset({'cond', 'while', 'scan', 'switch'})

# What to use instead, by the kind of operation refused.
_ADVICE = {
    'max': 'use average pooling (nn.avg_pool) instead of max pooling, '
           'jax.nn.relu (not jnp.maximum) for a ReLU, and apply softmax to '
           'the logits outside the function',
    'product': 'a product of two spiking values has no rate equivalent; '
               'compute it before the first ReLU or after the output',
    'norm': 'normalise with BatchNorm in inference mode (an affine map), or '
            'move this before the first ReLU or after the output',
    'branch': 'make the branch static (Python control flow on settings, not '
              'on values)',
    'random': 'trace the inference function (deterministic: no dropout, '
              'train=False)',
    'activation': 'use jax.nn.relu for every activation between two '
                  'ReLUs (each one becomes a layer of spiking neurons)',
    'other': 'between two ReLUs use only linear or affine operations (conv, '
             'dense, add, reshape, average pooling, inference BatchNorm)',
}
_KIND = {'max': 'max', 'reduce_max': 'max', 'reduce_window_max': 'max',
         'min': 'max', 'reduce_min': 'max', 'argmax': 'max',
         'argmin': 'max', 'exp': 'norm', 'log': 'norm', 'div': 'norm',
         'rsqrt': 'norm', 'sqrt': 'norm', 'integer_pow': 'activation',
         'pow': 'activation', 'logistic': 'activation', 'tanh': 'activation',
         'exp2': 'norm', 'log1p': 'norm', 'expm1': 'norm',
         'erf': 'activation', 'square': 'norm',
         'gt': 'branch', 'ge': 'branch', 'lt': 'branch', 'le': 'branch',
         'eq': 'branch', 'ne': 'branch', 'sign': 'branch'}


class NotConvertible(ValueError):
  """A network that cannot run as an SNN; the message is one line."""


def _closed(jaxpr) -> tuple[jax.extend.core.Jaxpr, Sequence[Any]]:
  return getattr(jaxpr, 'jaxpr', jaxpr), getattr(jaxpr, 'consts', ())


def is_relu(eqn) -> bool:
  """True for a ``jax.nn.relu`` call: custom_jvp around jit(name='relu')."""
  if eqn.primitive.name != 'custom_jvp_call':
    return False
  body, _ = _closed(eqn.params['call_jaxpr'])
  return (len(body.eqns) == 1 and body.eqns[0].primitive.name in
          ('jit', 'pjit') and body.eqns[0].params.get('name') == 'relu')


def body(eqn):
  """(jaxpr, consts) of a call whose body runs once on its operands."""
  params = eqn.params
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in params and eqn.primitive.name not in _BRANCHES:
      return _closed(params[key])
  return None


def has_sites(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if is_relu(eqn):
      return True
    inner = body(eqn)
    if inner is not None and has_sites(inner[0]):
      return True
  return False


def _line(frame) -> str:
  return (f'{frame.file_name}:{frame.start_line}:{frame.start_column} '
          f'({frame.function_name})')


def where(eqn) -> str:
  """The user's source line of ``eqn``, the library line it ran in when
  that differs (e.g. inside flax's LayerNorm), and its module path."""
  frames = list(source_info_util.user_frames(eqn.source_info.traceback))
  if not frames:
    return 'an unknown source line'
  own = next((f for f in frames if not any(
      part in f.file_name for part in ('site-packages', 'dist-packages',
                                       '/cos_jax/'))), frames[0])
  line = _line(own)
  if own is not frames[0]:
    line += f' via {_line(frames[0])}'
  stack = str(eqn.source_info.name_stack)
  return f'{line} [{stack}]' if stack else line


def site_stacks(jaxpr, prefix: str = '') -> list[str]:
  """The name stack of every site, in trace order."""
  stacks = []
  for eqn in jaxpr.eqns:
    stack = '/'.join(s for s in (prefix, str(eqn.source_info.name_stack))
                     if s)
    if is_relu(eqn):
      stacks.append(stack)
    elif (inner := body(eqn)) is not None:
      stacks += site_stacks(inner[0], stack)
  return stacks


def site_names(stacks: Sequence[str],
               kinds: Sequence[str] | None = None) -> tuple[str, ...]:
  """A unique name per site: its module path (name stack), suffixed with
  ``relu_<j>`` where a path holds several sites; ``relu_<k>`` (k in trace
  order) where there is no path. With ``kinds`` (e.g. each linear
  equation's primitive), ``<kind>_<j>`` instead of ``relu_<j>``."""
  kinds = ['relu'] * len(stacks) if kinds is None else kinds
  counts = collections.Counter(stacks)
  seen = collections.Counter()
  names = []
  for k, (stack, kind) in enumerate(zip(stacks, kinds)):
    if not stack:
      names.append(f'{kind}_{k}')
    elif counts[stack] == 1:
      names.append(stack)
    else:
      names.append(f'{stack}/{kind}_{seen[stack]}')
      seen[stack] += 1
  return tuple(names)


def bind(eqn, values):
  """``eqn``'s primitive applied to ``values``; a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  # The equation's own source line and module path travel with it.
  with source_info_util.user_context(
      eqn.source_info.traceback, name_stack=(
          source_info_util.current_name_stack() +
          eqn.source_info.name_stack)), eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr, consts, args, *, site: Callable, apply: Callable,
             inline_all: bool = False, counter: list | None = None,
             literal: Callable = lambda value: value):
  """Runs ``jaxpr`` with ``site(k, x)`` at the k-th site (trace order) and
  ``apply(eqn, values)`` -> outputs for every other equation.

  Calls that contain sites are inlined (evaluated here, equation by
  equation); other calls go to ``apply`` whole unless ``inline_all``.
  A literal operand's value is ``literal(its value)``.
  """
  counter = [0] if counter is None else counter
  env = {}

  def read(var):
    if isinstance(var, jax.extend.core.Literal):
      return literal(var.val)
    return env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    if is_relu(eqn):
      outs = [site(counter[0], values[0])]
      counter[0] += 1
    elif (inner := body(eqn)) is not None and (
        inline_all or has_sites(inner[0])):
      outs = evaluate(inner[0], inner[1], values, site=site, apply=apply,
                      inline_all=inline_all, counter=counter, literal=literal)
    else:
      outs = apply(eqn, values)
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _refuse(eqn, what: str, kind: str):
  raise NotConvertible(
      f'{where(eqn)}: {what} cannot run as a spiking network; '
      f'{_ADVICE[kind]}')


def _check_eqn(eqn, spiking: list[bool]) -> None:
  """Raises NotConvertible unless ``eqn`` is linear in its spiking inputs."""
  name = eqn.primitive.name
  if name in _BRANCHES:
    _refuse(eqn, f'a data-dependent branch ({name}) on a spiking value',
            'branch')
  if name in _LINEAR:
    if name == 'pad' and spiking[1]:
      _refuse(eqn, 'padding with a spiking value', 'other')
    return
  if name in _BILINEAR:
    if sum(spiking) > 1:
      _refuse(eqn, f'a product of two spiking values ({name})', 'product')
    return
  if name in _FIRST_ONLY and not any(spiking[1:]):
    return
  if name == 'select_n' and not spiking[0]:
    return  # a static choice between spiking values
  if name == 'convert_element_type' and jax.numpy.issubdtype(
      eqn.params['new_dtype'], jax.numpy.floating):
    return
  kind = _KIND.get(name, 'other')
  what = {'max': f'{name} (a maximum: max pooling, jnp.maximum or softmax)',
          'norm': f'{name} (a normalisation, softmax or other non-linear map)',
          'branch': f'a comparison ({name}), i.e. a data-dependent choice,',
          'activation': f'{name} (another activation: GELU, sigmoid, tanh, '
                        'or a power)'
          }.get(kind, name)
  _refuse(eqn, f'{what} on a spiking value', kind)


def check_linear(jaxpr, *, spiking_in: Sequence[bool] | None = None
                 ) -> list[bool]:
  """Refuses (NotConvertible, one line) what an SNN cannot compute.

  Walks ``jaxpr`` marking every value that depends on a site as spiking;
  each operation on a spiking value must be linear or affine in it, random
  operations are refused anywhere. Returns which outputs are spiking.
  """
  spiking_in = [False] * len(jaxpr.invars) if spiking_in is None else list(
      spiking_in)

  def site(_, x):
    return True

  def apply(eqn, flags):
    name = eqn.primitive.name
    if name in _RANDOM:
      _refuse(eqn, f'a random operation ({name})', 'random')
    if name not in _BRANCHES:
      if any(flags):
        _check_eqn(eqn, flags)
      return [any(flags)] * len(eqn.outvars)
    # A branch or loop: chosen by a static value (e.g. lax.platform_dependent)
    # it is checked branch by branch; on a spiking value it is refused.
    static_choice = name == 'cond' and not flags[0]
    if any(flags) and not static_choice:
      _check_eqn(eqn, flags)
    out = [False] * len(eqn.outvars)
    for key in ('branches', 'jaxpr', 'cond_jaxpr', 'body_jaxpr'):
      for sub in _as_list(eqn.params.get(key)):
        inner, _ = _closed(sub)
        if has_sites(inner):
          _refuse(eqn, f'a ReLU inside {name}', 'branch')
        inner_in = flags[1:] if static_choice else None
        out = [a or b for a, b in zip(out, check_linear(
            inner, spiking_in=inner_in))]
    return out

  return evaluate(jaxpr, [False] * len(jaxpr.constvars), spiking_in,
                  site=site, apply=apply, inline_all=True,
                  literal=lambda _: False)


def _as_list(value):
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple)) else [value]


def check_network(closed_jaxpr, *, what: str = 'fn') -> int:
  """The checks of a network's jaxpr; returns its number of sites.

  Refuses a function with no site, one whose output does not depend on a
  site, and every non-linear operation on a spiking value.
  """
  jaxpr = closed_jaxpr.jaxpr
  n = len(site_stacks(jaxpr))
  if n == 0:
    raise NotConvertible(
        f'{what} calls no jax.nn.relu: there is no activation to turn into '
        'spiking neurons (write each ReLU as jax.nn.relu / nn.relu)')
  out = check_linear(jaxpr)
  if not all(out):
    raise NotConvertible(f'{what}: an output does not depend on any ReLU, '
                         'so it cannot be read from spikes')
  return n

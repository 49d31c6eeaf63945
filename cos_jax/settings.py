"""Settings of a spiking run, validated once where they enter, and the checks
both programs' settings share.

Every setting a user types (a ``configs/convert.py`` field, a training config
field, a keyword of the library) is checked by one of :func:`check_positive_int`,
:func:`check_optional_positive_int`, :func:`check_number` and
:func:`check_choice`, which raise :class:`SettingsError` naming the field; the
programs print it as one line (``--rho ...`` for convert.py,
``--config.learning_rate ...`` for train.py).

:class:`Calibration` says how the initial potentials are calibrated (ρ, rounds,
schedule, ε). It is frozen and hashable: the public functions build it from
their keyword arguments (or a CLI builds it from its config), and the same
object travels unchanged into :class:`~cos_jax.activation.SpikingConfig` and,
as a static argument, into every jitted function. Its constructor checks every
field. Downstream, ``SpikingConfig.__post_init__`` checks only that a pass is
long enough for the probe (ρ ≤ its steps; the public functions run
``max(ρ, T)`` steps), and ``neuron.calibrate_layer``, public itself, checks its
own ``epsilon``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from cos_jax.neuron import DEFAULT_EPSILON

SCHEDULES = ('layerwise', 'global')
# What calibration does with a neuron that fired at every probe step and still
# wants more spikes: 'keep' it, or make it 'fire' at every later step
# (neuron.shift_v0; docs/semantics.md has the measurements behind the default).
DEFAULT_SATURATED = 'fire'  # measured on ResNet-20, docs/semantics.md
SATURATED_RULES = ('keep', 'fire')
# Long simulations run in chunks of this many time-steps, carrying every IF
# layer's membrane potential from one chunk to the next: a linear layer then
# sees [B·chunk, ...] rows instead of [B·T, ...], which bounds memory by the
# chunk and keeps a CPU's caches warm (docs/performance.md, "SNN speed and
# memory").
DEFAULT_TIME_CHUNK = 8


class SettingsError(ValueError):
  """A setting out of range. ``field`` names it; the message is one line.

  Example:
    >>> try:
    ...   cos_jax.simulate(model, variables, images, T=0)
    ... except cos_jax.SettingsError as error:
    ...   print(error.field, '|', error)
    T | T must be a positive integer, got 0
  """

  def __init__(self, field: str, message: str):
    super().__init__(f'{field} {message}')
    self.field = field
    self.message = message


def check_positive_int(field: str, value) -> int:
  """``value`` as an int if it is an integer ≥ 1 (Python's or NumPy's, e.g.
  ``np.int64(4)``; bools are not), else raises SettingsError."""
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, numbers.Integral) or value < 1):
    raise SettingsError(field, f'must be a positive integer, got {value!r}')
  return int(value)


def check_optional_positive_int(field: str, value) -> int | None:
  """None, or :func:`check_positive_int` of ``value``."""
  if value is None:
    return None
  try:
    return check_positive_int(field, value)
  except SettingsError:
    raise SettingsError(field, f'must be None or a positive integer, got '
                        f'{value!r}') from None


def check_number(field: str, value, wanted: str, ok=lambda v: True) -> float:
  """``value`` as a float if it is a finite real number (bools are not) for
  which ``ok`` holds, else SettingsError saying it must be ``wanted``."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or not ok(value)):
    raise SettingsError(field, f'must be {wanted}, got {value!r}')
  return float(value)


def check_choice(field: str, value, choices, what: str | None = None):
  """``value`` if it is one of ``choices``, else SettingsError listing them."""
  if value not in choices:
    raise SettingsError(field, f'unknown {what or field} {value!r}: choose '
                        f'one of {", ".join(map(str, choices))}')
  return value


def check_time_chunk(value) -> int | None:
  """A time chunk is None (one block) or a positive int."""
  return None if value is None else check_positive_int('time_chunk', value)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """How COS (and the lightweight rule) set each neuron's v(0).

  Attributes:
    rho: probe length ρ in time-steps (≥ 1; independent of the simulated T).
    iterations: probe → judge → shift rounds on the same ρ inputs (≥ 1).
    schedule: 'layerwise' (paper Algorithm 1: layer l is probed on the output
      of the already calibrated layer l-1) or 'global' (the whole network runs
      ρ steps, every layer shifts at once; repeated ``iterations`` times).
    epsilon: Theorem-2 margin ε as a fraction of θ, in (0, 1).
    saturated: the rule for a neuron that fired at every probe step and still
      wants more spikes: 'fire' (at every later step, as the PyTorch
      reference does; the default) or 'keep' (docs/semantics.md).

  Example:
    >>> cos_jax.Calibration(rho=4)
    Calibration(rho=4, iterations=1, schedule='layerwise', epsilon=0.001,
                saturated='fire')
    >>> cos_jax.Calibration(rho=0)
    Traceback (most recent call last):
    ...
    cos_jax.settings.SettingsError: rho must be a positive integer, got 0
  """
  rho: int
  iterations: int = 1
  schedule: str = 'layerwise'
  epsilon: float = DEFAULT_EPSILON
  saturated: str = DEFAULT_SATURATED

  def __post_init__(self):
    object.__setattr__(self, 'rho', check_positive_int('rho', self.rho))
    object.__setattr__(self, 'iterations',
                       check_positive_int('iterations', self.iterations))
    check_choice('schedule', self.schedule, SCHEDULES)
    object.__setattr__(self, 'epsilon', check_number(
        'epsilon', self.epsilon, 'a fraction of the threshold in (0, 1)',
        lambda v: 0 < v < 1))
    check_choice('saturated', self.saturated, SATURATED_RULES, 'rule')

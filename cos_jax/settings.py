"""Settings of a spiking run, validated once where they enter.

:class:`Calibration` says how the initial potentials are calibrated (ρ, rounds,
schedule, ε). It is frozen and hashable: the public functions build it from
their keyword arguments (or a CLI builds it from its config), and the same
object travels unchanged into :class:`~cos_jax.activation.SpikingConfig` and,
as a static argument, into every jitted function. Nothing downstream checks it
again.
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
# chunk and keeps a CPU's caches warm (README, "SNN speed and memory").
DEFAULT_TIME_CHUNK = 8


class SettingsError(ValueError):
  """A setting out of range. ``field`` names it; the message is one line."""

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


def check_time_chunk(value) -> int | None:
  """A time chunk is None (one block) or a positive int."""
  return None if value is None else check_positive_int('time_chunk', value)


def block_steps(T: int, probe_steps: int, time_chunk: int | None,
                record_steps: int = 0) -> int:
  """Steps of the longest block a run of ``T`` steps folds at once."""
  total = max(T, probe_steps)
  first = max(time_chunk or total, probe_steps, record_steps)
  return min(total, first)


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
    if self.schedule not in SCHEDULES:
      raise SettingsError('schedule', f'must be one of {", ".join(SCHEDULES)}'
                          f', got {self.schedule!r}')
    epsilon = self.epsilon
    if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon) or not 0 < epsilon < 1):
      raise SettingsError('epsilon', 'is a fraction of the threshold and must '
                          f'lie in (0, 1), got {epsilon!r}')
    object.__setattr__(self, 'epsilon', float(epsilon))
    if self.saturated not in SATURATED_RULES:
      raise SettingsError('saturated', f'must be one of '
                          f'{", ".join(SATURATED_RULES)}, got '
                          f'{self.saturated!r}')

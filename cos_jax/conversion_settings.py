"""What a conversion measures: :class:`ConversionSettings`, built and
validated once from ``configs/convert.py`` (or by hand), and the runs it
implies (:meth:`ConversionSettings.runs`, the reported T of
:func:`reported_steps`).
"""

from __future__ import annotations

import dataclasses
import math

from cos_jax import cost, methods
from cos_jax.settings import (Calibration, SettingsError, check_positive_int,
                              check_time_chunk)

# Training images pc and bc measure their corrections on: the authors' one
# batch of the training loader (128 on CIFAR, main_cal_cifar.py).
DEFAULT_CALIBRATION_EXAMPLES = 128


@dataclasses.dataclass(frozen=True)
class ConversionSettings:
  """What to measure. Build it with :meth:`from_config` (which validates).

  Attributes:
    calibration: ρ (τ for SRP), rounds, schedule and ε of the methods that
      take them.
    T: the longest simulation reported (accuracy at every t ≤ T).
    methods: the methods to compare, in the order given; names are bound to
      ``calibration`` on construction (:func:`cos_jax.methods.for_settings`).
    analysis_T: window of the offset-spike analysis (None: the model's L).
    seed: seed of the random v0 method.
    time_chunk: steps simulated at a time (None: one block).
    cost_model: a key of ``cos_jax.cost.COST_MODELS``, or None to count no
      spikes (docs/cost.md).
    cost_examples: images whose spikes are counted, the first ones of the
      split in whole batches (None: all of them).
    calibration_examples: training images 'pc' and 'bc' measure their
      corrections on.
    readout_from: steps at the start of every run that the readout skips
      (Bu et al.'s delayed readout): accuracy at T is over the outputs of
      steps ``readout_from + 1 .. readout_from + T``, so each run lasts
      ``readout_from`` steps more. 0: the usual readout from step 1.
  """
  calibration: Calibration
  T: int
  methods: tuple[methods.Method, ...]
  analysis_T: int | None = None
  seed: int = 0
  time_chunk: int | None = None
  cost_model: str | None = cost.DEFAULT_COST_MODEL
  cost_examples: int | None = cost.DEFAULT_COST_EXAMPLES
  calibration_examples: int = DEFAULT_CALIBRATION_EXAMPLES
  readout_from: int = 0

  def __post_init__(self):
    object.__setattr__(self, 'methods', tuple(
        methods.for_settings(methods.get(m) if isinstance(m, str) else m,
                             self.calibration) for m in self.methods))

  @classmethod
  def from_config(cls, config) -> 'ConversionSettings':
    """From a ``configs/convert.py`` config; SettingsError names the field."""
    names = tuple(n.strip() for n in str(config.init).split(',') if n.strip())
    if not names:
      raise SettingsError('init', 'needs at least one v0 method')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise SettingsError('init', f'names {", ".join(repeated)} more than '
                          'once; list each method once')
    calibration = Calibration(config.rho, config.iterations, config.schedule,
                              config.epsilon, config.saturated)
    analysis_T = config.get('analysis_T')
    readout_from = config.get('readout_from', 0)
    if (isinstance(readout_from, bool) or not isinstance(readout_from, int)
        or readout_from < 0):
      raise SettingsError('readout_from', 'must be an integer >= 0, got '
                          f'{readout_from!r}')
    cost_model = _cost_model_name(config.get('cost_model',
                                             cost.DEFAULT_COST_MODEL))
    if readout_from and cost_model:
      raise SettingsError('readout_from', 'is not counted by the cost model '
                          '(its spikes are those of a run read from step 1): '
                          'pass --cost_model none with it')
    return cls(
        calibration=calibration,
        T=check_positive_int('T', config.T),
        methods=names,
        analysis_T=(None if analysis_T is None
                    else check_positive_int('analysis_T', analysis_T)),
        seed=config.seed,
        time_chunk=check_time_chunk(config.time_chunk or None),
        cost_model=cost_model,
        cost_examples=_cost_examples(config.get('cost_examples',
                                                cost.DEFAULT_COST_EXAMPLES)),
        calibration_examples=check_positive_int(
            'calibration_examples', config.get(
                'calibration_examples', DEFAULT_CALIBRATION_EXAMPLES)),
        readout_from=readout_from)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.methods)

  @property
  def corrected(self) -> bool:
    """Whether a method needs a calibration set of training images."""
    return any(m.corrected for m in self.methods)

  def runs(self) -> dict[str, tuple[methods.Method, int]]:
    """The runs one batch gets, ``{key: (method, T)}``: one per method up to
    T, or, for a method corrected per T, one per reported T (key
    ``'pc@4'``); each ``readout_from`` steps longer, which the readout
    skips."""
    out, skip = {}, self.readout_from
    for m in self.methods:
      if m.corrected:
        out.update({run_key(m.name, t): (m, t + skip)
                    for t in reported_steps(self.T)})
      else:
        out[m.name] = (m, self.T + skip)
    return out


def reported_steps(T: int) -> list[int]:
  """1, 2, 4, ... up to T (T itself included): the T of the tables."""
  steps = [2**k for k in range(int(math.log2(T)) + 1)]
  return steps if steps[-1] == T else steps + [T]


def run_key(name: str, T: int) -> str:
  """The key of a per-T run of a corrected method."""
  return f'{name}@{T}'


def _cost_examples(value) -> int | None:
  """The cost_examples setting: 0 (or None) means every image."""
  if value is not None and (isinstance(value, bool)
                            or not isinstance(value, int) or value < 0):
    raise SettingsError('cost_examples', 'must be a positive integer, or 0 '
                        f'to count every image, got {value!r}')
  return value or None


def _cost_model_name(name) -> str | None:
  model = cost.cost_model(name)
  return None if model is None else model.name

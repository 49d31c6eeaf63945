"""The ways to start and run an IF network: each method owns the shape of its run.

A :class:`Method` says, for a reported T, how many steps it simulates, which
steps are probe or pre-simulation passes, how each layer sets v(0), whether a
layer's output is masked, which latency it is reported at and which steps its
cost counts. ``snn``, ``cost``, ``conversion`` and ``report`` ask it and never
work it out again. :data:`METHODS` holds one object per name; a method bound
to its settings (:meth:`Method.bind`) is frozen and hashable, so it travels
as a static argument of every jitted function.

Adding a method is one object here (docs/architecture.md, "Extending").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cos_jax import neuron
from cos_jax.settings import DEFAULT_SATURATED, Calibration, SettingsError

# SRP's mask threshold, a fraction of θ (the authors' MPLayer compares
# v/θ > 1e-3 after the pre-simulation).
SRP_MASK_FRACTION = 1e-3

# How snn runs a method (``Method.run``):
FUSED = 'fused'            # one pass: each layer sets v(0) from its first
                           # ``probe_steps`` inputs, then runs from it
PASSES = 'passes'          # ``pre_passes`` network-wide probe passes of ρ
                           # steps set v(0), then a plain run from it
PRESIM = 'presim'          # SRP: τ network-wide steps from θ/2 give a mask,
                           # then a run from θ/2 with masked outputs
CORRECTED = 'corrected'    # pc / bc: a run with corrections measured on a
                           # calibration set beforehand, one per reported T


@dataclasses.dataclass(frozen=True)
class Method:
  """A way to set v(0) and run the network (the base: a fill rule).

  Attributes:
    name: its name in configs, flags and results.
    label: its name in tables and plots.
    needs_key: draws random numbers (callers must pass a PRNG key).
    calibration: the bound settings (ρ, rounds, schedule, ε) of a method
      that takes them (:attr:`takes_calibration`); None otherwise.
  """
  name: str
  label: str
  needs_key: bool = False
  calibration: Calibration | None = None
  # The ρ of the runs this one is compared with (:func:`for_settings`): a
  # method without a probe is also simulated to T + ρ.
  _compare_rho: int = dataclasses.field(default=0, repr=False)

  # What the method takes and how snn runs it (class-level facts).
  takes_calibration = False   # reads ρ (and the rest of a Calibration)
  probes_own_input = False    # v(0) from a ρ-step probe of the layer's input
  masked = False              # a layer's output is s·θ·mask
  corrected = False           # needs a calibration set, one correction per T

  def bind(self, calibration: Calibration | None) -> 'Method':
    """This method with ``calibration`` if it takes one (else without)."""
    return dataclasses.replace(
        self, calibration=calibration if self.takes_calibration else None)

  @property
  def rho(self) -> int:
    return self.calibration.rho if self.calibration else 0

  # ---------------------------------------------------------- per layer
  def layer_v0(self, probe_currents: jax.Array, threshold: jax.Array,
               v0: jax.Array, rounds: int,
               key: jax.Array | None = None) -> jax.Array:
    """One IF layer's v(0).

    Args:
      probe_currents: ``[probe_steps, ...]`` the layer's first input
        currents (only one step's shape matters to a fill rule).
      threshold: θ.
      v0: the potential a probe starts from (θ/2 unless a caller chose).
      rounds: probe/update rounds of a probing method.
      key: PRNG key of a method that ``needs_key``.

    Returns:
      The layer's v(0), shaped like ``probe_currents[0]``.
    """
    return neuron.half_threshold(threshold, probe_currents[0])

  @property
  def probe_steps(self) -> int:
    """Input steps :meth:`layer_v0` reads in the fused pass (ρ, or 1)."""
    return 1

  # ---------------------------------------------------- the run's shape
  @property
  def run(self) -> str:
    """How snn runs it: FUSED, PASSES, PRESIM or CORRECTED."""
    return FUSED

  @property
  def extra_steps(self) -> int:
    """Steps simulated beyond the reported T: ρ for a method without a probe,
    so it can also be reported at T + ρ (the paper's comparison)."""
    return 0 if self.takes_calibration else self._compare_rho

  def steps(self, T: int) -> int:
    """Main-run steps simulated (outputs kept) to report up to T."""
    return T + self.extra_steps

  def layer_steps(self, T: int) -> int:
    """Steps every layer runs in its main pass for accuracies up to T (a
    fused probe spans ρ even when T < ρ)."""
    steps = self.steps(T)
    return max(steps, self.probe_steps) if self.run == FUSED else steps

  @property
  def pre_passes(self) -> int:
    """Network-wide passes run before the main run (their spikes travel)."""
    return 0

  @property
  def pre_steps(self) -> int:
    """Steps of each pre pass."""
    return self.rho if self.pre_passes else 0

  def counted(self, T: int) -> tuple[int, int]:
    """(pre-pass steps, main-run steps) whose spikes a run for accuracies up
    to T records, in this order."""
    return self.pre_passes * self.pre_steps, self.layer_steps(T)

  def emitted(self, t: int) -> int:
    """Steps each layer passes spikes on, as computed, for accuracy at t."""
    return max(t, self.probe_steps) if self.run == FUSED else t

  # ------------------------------------------------------- reporting
  def shifts(self) -> tuple[int, ...]:
    """Offsets s of the rows it is reported at: accuracy at T + s."""
    return (0, self.extra_steps) if self.extra_steps else (0,)

  def latency(self, t: int, depth: int) -> int:
    """Time-steps from the image to the answer at t on a streaming chip
    (``depth``: IF layers on the longest path)."""
    return t + self.pre_passes * self.pre_steps

  def latency_text(self, depth: int) -> str:
    """Its latency as a formula of T, for tables."""
    extra = self.latency(1, depth) - 1
    return f'{extra}+T' if extra else 'T'

  def buffers(self, neurons: int) -> tuple[int, int]:
    """(currents a streaming chip buffers, probe neuron updates) per image."""
    return 0, 0

  def display(self) -> str:
    """The label with its settings."""
    return self.label


@dataclasses.dataclass(frozen=True)
class Fill(Method):
  """v(0) by a rule of θ: 'half' (θ/2), 'zero', 'random' (U[0, θ))."""
  rule: str = 'half'

  def layer_v0(self, probe_currents, threshold, v0, rounds, key=None):
    like = probe_currents[0]
    if self.rule == 'zero':
      return jnp.zeros_like(like)
    if self.rule == 'random':
      return jax.random.uniform(key, like.shape, like.dtype) * threshold
    return neuron.half_threshold(threshold, like)


@dataclasses.dataclass(frozen=True)
class Probe(Method):
  """v(0) from a ρ-step probe of the layer's own input: COS (Theorems 1-3)
  or the lightweight rule v(0) ← v(ρ) (paper A.5)."""
  rule: str = 'cos'
  takes_calibration = True
  probes_own_input = True

  def layer_v0(self, probe_currents, threshold, v0, rounds, key=None):
    if self.rule == 'lightweight':
      return neuron.repeat(lambda _, v: neuron.probe(
          probe_currents, threshold, v).v, rounds, v0)
    return neuron.calibrate_layer(
        probe_currents, threshold, v0, iterations=rounds,
        epsilon=self.calibration.epsilon,
        saturate=self.calibration.saturated == 'fire')

  @property
  def probe_steps(self):
    return self.rho

  @property
  def layerwise(self) -> bool:
    return self.calibration.schedule == 'layerwise'

  @property
  def run(self):
    return FUSED if self.layerwise else PASSES

  @property
  def pre_passes(self):
    return 0 if self.layerwise else self.calibration.iterations

  def latency(self, t, depth):
    # Layerwise: each layer buffers its first ρ inputs, probes, then replays
    # them, so every IF layer on the longest path adds ρ (docs/cost.md).
    return t + depth * self.rho if self.layerwise else super().latency(
        t, depth)

  def latency_text(self, depth):
    if self.layerwise:
      return f'{depth}*rho+T'
    return f'{self.calibration.iterations}*rho+T'

  def buffers(self, neurons):
    if not self.layerwise:
      return 0, 0
    return (self.rho * neurons,
            self.calibration.iterations * self.rho * neurons)

  def display(self):
    return f'{self.label}, rho={self.rho}'


@dataclasses.dataclass(frozen=True)
class SRP(Method):
  """SRP (Hao et al., AAAI 2023; the authors' MPLayer), τ = ρ: the whole
  network runs τ steps from θ/2; a neuron's mask is [v(τ) > 1e-3·θ]; every
  potential restarts at θ/2 and the run's outputs are s·θ·mask. Reported at
  T (the authors' accounting); its latency is τ + T."""
  takes_calibration = True
  masked = True

  @property
  def run(self):
    return PRESIM

  @property
  def pre_passes(self):
    return 1

  def shifts(self):
    return (0,)

  def latency_text(self, depth):
    return 'tau+T'

  def display(self):
    return f'{self.label}, tau={self.rho}'


@dataclasses.dataclass(frozen=True)
class Correction(Method):
  """Dataset-level calibration (Li et al., ICML 2021, ``emp_bias_corr``),
  one correction per reported T, measured on a training batch: 'pc' sets
  v(0) = θ/2 + T·mean_batch(a − r) per neuron, 'bc' adds
  −mean_{batch, space}(r − a) to the layer's input current per channel."""
  rule: str = 'pc'
  corrected = True

  @property
  def run(self):
    return CORRECTED

  @property
  def extra_steps(self):
    return 0

  def shifts(self):
    return (0,)


METHODS = {m.name: m for m in (
    Probe('cos', 'COS (calibrated offset spikes)', rule='cos'),
    Fill('half', 'QCFS baseline v0=θ/2', rule='half'),
    Probe('lightweight', 'lightweight v0=v(ρ)', rule='lightweight'),
    Fill('zero', 'v0=0', rule='zero'),
    Fill('random', 'v0~U[0,θ)', needs_key=True, rule='random'),
    SRP('srp', 'SRP (residual membrane potential)'),
    Correction('pc', 'PC (potential correction)', rule='pc'),
    Correction('bc', 'BC (bias correction)', rule='bc'),
)}


def get(name: str) -> Method:
  """The :class:`Method` called ``name``; a SettingsError names the choices.

  (The public functions call the method argument ``init``, hence the field.)
  """
  if name not in METHODS:
    raise SettingsError('init', f'takes a v0 method among '
                        f'{", ".join(METHODS)}; got {name!r}')
  return METHODS[name]


def resolve(name: str, rho: int | None, iterations: int = 1,
            schedule: str = 'layerwise', epsilon: float = neuron.DEFAULT_EPSILON,
            saturated: str = DEFAULT_SATURATED) -> Method:
  """Method ``name`` bound to its validated settings (SettingsError names a
  bad field). A method that takes no Calibration ignores them."""
  method = get(name)
  if not method.takes_calibration:
    return method
  return method.bind(Calibration(rho, iterations, schedule, epsilon,
                                 saturated))


def named(method: Method | str, calibration: Calibration | None) -> Method:
  """``method`` (or the method of that name) bound to ``calibration`` where
  it takes one and is not bound yet."""
  if isinstance(method, str):
    method = get(method)
  if method.calibration is None and calibration is not None:
    method = method.bind(calibration)
  return method


def for_settings(method: Method, calibration: Calibration) -> Method:
  """``method`` as convert.py runs it next to others probing ρ steps: bound
  to ``calibration``, and a method without a probe also simulated to T + ρ
  (its comparison row)."""
  return dataclasses.replace(method.bind(calibration),
                             _compare_rho=calibration.rho)


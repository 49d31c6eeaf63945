"""The ways to set an IF layer's initial potential v(0): one table, one rule.

:data:`METHODS` lists every method with its report label and whether it
calibrates from a ρ-step probe of the layer's own input (such methods are
reported at T; the others at T and at T + ρ, the paper's fair comparison).
:func:`layer_v0` computes one layer's v(0) under a method. Adding a method
means one row in the table and one branch in that function
(docs/architecture.md, "Extending").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cos_jax import neuron
from cos_jax.settings import DEFAULT_SATURATED, Calibration, SettingsError


@dataclasses.dataclass(frozen=True)
class Method:
  """A v(0) method.

  Attributes:
    name: its name in configs, flags and results.
    label: its name in tables and plots.
    calibrated: sets v(0) from a ρ-step probe of the layer's own input.
    needs_key: draws random numbers (callers must pass a PRNG key).
  """
  name: str
  label: str
  calibrated: bool
  needs_key: bool = False


METHODS = {m.name: m for m in (
    Method('cos', 'COS (calibrated offset spikes)', calibrated=True),
    Method('half', 'QCFS baseline v0=θ/2', calibrated=False),
    Method('lightweight', 'lightweight v0=v(ρ)', calibrated=True),
    Method('zero', 'v0=0', calibrated=False),
    Method('random', 'v0~U[0,θ)', calibrated=False, needs_key=True),
)}


def get(name: str) -> Method:
  """The :class:`Method` called ``name``; a SettingsError names the choices.

  (The public functions call the method argument ``init``, hence the field.)
  """
  if name not in METHODS:
    raise SettingsError('init', f'takes a v0 method among '
                        f'{", ".join(METHODS)}; got {name!r}')
  return METHODS[name]


def calibration_for(name: str, rho: int | None, iterations: int,
                    schedule: str, epsilon: float,
                    saturated: str = DEFAULT_SATURATED) -> Calibration | None:
  """The validated Calibration of method ``name`` (None if it takes none)."""
  if get(name).calibrated:
    return Calibration(rho, iterations, schedule, epsilon, saturated)
  return None


def layer_v0(name: str, probe_currents: jax.Array, threshold: jax.Array,
             v0: jax.Array, calibration: Calibration | None, rounds: int,
             key: jax.Array | None = None) -> jax.Array:
  """One IF layer's v(0) under method ``name``.

  Args:
    name: a key of :data:`METHODS`.
    probe_currents: ``[ρ, ...]`` the layer's first ρ input currents (only the
      shape of one step matters to uncalibrated methods).
    threshold: θ.
    v0: the potential the probe starts from (θ/2 unless a caller chose).
    calibration: ε for 'cos'; unused by the others.
    rounds: probe/update rounds of a calibrated method (the Calibration's
      ``iterations`` under the layerwise schedule, 1 per network pass under
      the global one).
    key: PRNG key of a method that ``needs_key``.

  Returns:
    The layer's v(0), shaped like ``probe_currents[0]``.
  """
  like = probe_currents[0]
  if name == 'cos':
    return neuron.calibrate_layer(
        probe_currents, threshold, v0, iterations=rounds,
        epsilon=calibration.epsilon,
        saturate=calibration.saturated == 'fire')
  if name == 'lightweight':  # paper A.5: v(0) <- v(ρ)
    return neuron.repeat(
        lambda _, v: neuron.probe(probe_currents, threshold, v).v, rounds, v0)
  if name == 'half':
    return neuron.half_threshold(threshold, like)
  if name == 'zero':
    return jnp.zeros_like(like)
  if name == 'random':
    return jax.random.uniform(key, like.shape, like.dtype) * threshold
  raise ValueError(f'unknown v0 method {name!r}')

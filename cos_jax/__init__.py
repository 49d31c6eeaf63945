"""cos_jax: ANN->SNN conversion with QCFS activations and calibrated offset spikes.

Core (pure, jit-able):
  qcfs, if_neuron, spike_train, probe, shift_v0, calibrate_layer, offset_spikes, ratio_and_mse
Networks (a zoo model + its variables):
  models.get, init_v0, calibrate, simulate, evaluate_snn
Any JAX network: trace (its jax.nn.relu calls become sites), with_qcfs
Plain ReLU networks: balance_thresholds (per-channel thresholds, no training)
Settings: Calibration (validated once, hashable), methods.METHODS (the v0 methods)
"""

from cos_jax import methods, models
from cos_jax.activation import Activation, SpikingConfig
from cos_jax.balance import balance_thresholds
from cos_jax.neuron import (IFResult, ProbeStats, calibrate_layer, if_neuron,
                            offset_spikes, probe, qcfs, ratio_and_mse, shift_v0,
                            spike_train)
from cos_jax.settings import Calibration, SettingsError
from cos_jax.snn import (SNNRun, calibrate, evaluate_snn, init_v0, simulate,
                         spiking)
from cos_jax.qcfs_function import with_qcfs
from cos_jax.traced import trace

__all__ = [
    'Activation', 'Calibration', 'IFResult', 'ProbeStats', 'SNNRun',
    'SettingsError', 'SpikingConfig', 'balance_thresholds', 'calibrate',
    'calibrate_layer',
    'evaluate_snn', 'if_neuron', 'init_v0', 'methods', 'models',
    'offset_spikes', 'probe', 'qcfs', 'ratio_and_mse', 'shift_v0', 'simulate',
    'spike_train', 'spiking', 'trace', 'with_qcfs',
]

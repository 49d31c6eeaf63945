r"""Converts a trained QCFS ANN to an IF SNN with calibrated offset spikes.

  python convert.py --rho 8                       # the shipped Fashion-MNIST net
  python convert.py --workdir runs/c10 --rho 4 --T 32 --init cos,half,lightweight

Loads the checkpoint of a train.py workdir, calibrates every IF neuron's
initial membrane potential per input from a ρ-step probe (COS), simulates up
to T steps and reports accuracy at T = 1, 2, 4, ... for each v0 method, next
to the ANN and the uncalibrated baselines at T and at T+ρ, with per-layer
offset-spike statistics before/after calibration; writes results.json,
results.csv, accuracy.png and offset_spikes.png. The settings are the fields
of configs/convert.py: pass any of them as --field value. Batches are sharded
over every local device (one XLA device per core on a CPU host).
"""

import os

from absl import app
from absl import flags

from configs import convert as convert_config
from cos_jax import cli, conversion_job

_CONFIG = cli.define_config(
    'convert.py', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'convert.py'),
    'Conversion config; any field can also be set as --field value.')
_FIELDS = cli.define_field_flags(convert_config.get_config(),
                                 'configs/convert.py')
_PROCESS_FLAGS = cli.define_process_flags()
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', 0, 'XLA CPU devices to split the host into (0 = one per '
    'core); only affects the CPU backend.', lower_bound=0)


def main(argv):
  del argv
  cli.start(_HOST_DEVICES.value, _PROCESS_FLAGS)
  with cli.one_line_errors('convert.py'):
    config = _CONFIG.value
    cli.apply_field_flags(config, _FIELDS)
    conversion_job.convert(config)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'convert.py', convert_config.get_config()))

r"""Trains a QCFS ANN (the source network of the ANN->SNN conversion).

  python train.py --workdir runs/fmnist                      # defaults
  python train.py --workdir runs/c10_vgg --config configs/cifar10_vgg16.py \
      --config.epochs=3 --config.num_train_examples=5000

Rerunning the same command resumes from the latest checkpoint in --workdir.
On a CPU-only machine the batch is sharded over one XLA device per core
(--host_devices=0, the default); --host_devices=1 runs on a single device.
Many processes (one per host, or several on one machine with
`python -m cos_jax.launch`): --coordinator_address, --num_processes and
--process_id, or --distributed on a TPU pod slice / under SLURM; each process
reads its own shard of the data (README, "Many hosts").
"""

import os

from absl import app
from absl import flags

from configs import default as default_config
from cos_jax import cli, training

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, config.json, log.jsonl and '
    'TensorBoard summaries; an existing run there is resumed.')
_CONFIG = cli.define_config(
    'train.py', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             'configs', 'default.py'),
    'Training configuration file (configs/*.py); fields can be overridden, '
    'e.g. --config.epochs=3.')
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', 0, 'Number of XLA CPU devices to split the host into '
    '(0 = one per core). Only affects runs on the CPU backend.', lower_bound=0)
_RESTART = flags.DEFINE_bool(
    'restart', False, 'Train from step 0 in a --workdir that train.py wrote '
    'before, deleting its checkpoints and log (a finished run, or a copy of '
    'a shipped one). Without it a run resumes from its latest checkpoint.')
_PROCESS_FLAGS = cli.define_process_flags()

flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  cli.start(_HOST_DEVICES.value, _PROCESS_FLAGS)
  with cli.one_line_errors('train.py'):
    training.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                 restart=_RESTART.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'train.py', default_config.get_config()))

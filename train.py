r"""Trains a QCFS ANN (the source network of the ANN->SNN conversion).

  python train.py --workdir runs/fmnist                      # defaults
  python train.py --workdir runs/c10_vgg --config configs/cifar10_vgg16.py \
      --config.epochs=3 --config.num_train_examples=5000

Rerunning the same command resumes from the latest checkpoint in --workdir.
On a CPU-only machine the batch is sharded over one XLA device per core
(--host_devices=0, the default); --host_devices=1 runs on a single device.
Multi-host: pass --coordinator_address, --num_processes and --process_id on
every host (each host then reads its own shard of the data).
"""

import os
import sys

# TensorFlow (used by the TFDS input pipeline) is noisy on stderr.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cos_jax import training

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'default.py')

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, config.json, log.jsonl and '
    'TensorBoard summaries; an existing run there is resumed.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Training configuration file (configs/*.py); '
    'fields can be overridden, e.g. --config.epochs=3.', lock_config=True)
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', 0, 'Number of XLA CPU devices to split the host into '
    '(0 = one per core). Only affects runs on the CPU backend.', lower_bound=0)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0, passed '
    'to jax.distributed.initialize.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-host: total number of processes.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-host: the index of this process.')

flags.mark_flags_as_required(['workdir'])


def _fail(message: str) -> None:
  sys.stderr.write(f'train.py: error: {message}\n')
  sys.stderr.flush()
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}: pass settings as '
          f'flags, e.g. --config.epochs=3')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every file it writes (INFO) and TFDS warns about benign
    # things; keep stderr for errors. --verbosity=0 shows everything.
    logging.set_verbosity(logging.ERROR)
  # Both must happen before JAX initialises its backends.
  training.use_all_host_cores(_HOST_DEVICES.value)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)

  try:
    training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Exception as e:  # pylint: disable=broad-except
    # cos_jax.data (TensorFlow) is imported only once a config is valid.
    data = sys.modules.get('cos_jax.data')
    expected = (training.ConfigError, training.CheckpointError) + (
        (data.DatasetUnavailableError,) if data else ())
    if not isinstance(e, expected):
      raise
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


if __name__ == '__main__':
  app.run(main)

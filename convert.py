r"""Converts a trained QCFS ANN to an IF SNN with calibrated offset spikes.

  python convert.py --rho 8                       # the shipped Fashion-MNIST net
  python convert.py --workdir runs/c10 --rho 4 --T 32 --init cos,half,lightweight

Loads the checkpoint of a train.py workdir, calibrates every IF neuron's
initial membrane potential per input from a ρ-step probe (COS), simulates up
to --T steps and reports accuracy at T = 1, 2, 4, ... for each --init, next to
the ANN and the uncalibrated baselines at T and at T+ρ (the paper's fair
comparison), with per-layer offset-spike statistics before/after calibration.
Writes results.json, results.csv, accuracy.png and offset_spikes.png to
--output_dir. Batches are sharded over every local device (one XLA device
per core on a CPU host).
"""

import math
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax

from cos_jax import training

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKDIR = os.path.join(_HERE, 'pretrained', 'fmnist_small')

_WORKDIR = flags.DEFINE_string(
    'workdir', DEFAULT_WORKDIR, 'A train.py workdir (default: the shipped '
    'small Fashion-MNIST net).')
_WHICH = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                           'Which checkpoint of the workdir to convert.')
_RHO = flags.DEFINE_integer('rho', 8, 'Probe time-steps ρ of the calibration.')
_T = flags.DEFINE_integer('T', 32, 'Largest simulation length; accuracy is '
                          'reported at T = 1, 2, 4, ... up to it.')
_ITERATIONS = flags.DEFINE_integer('iterations', 1,
                                   'COS probe/shift rounds per layer.')
_SCHEDULE = flags.DEFINE_enum('schedule', 'layerwise', ['layerwise', 'global'],
                              'layerwise (paper) or global (network-wide).')
_INIT = flags.DEFINE_list(
    'init', ['cos', 'half', 'lightweight'], 'Initialisations to compare: cos, '
    'half (QCFS baseline θ/2), lightweight (v0=v(ρ)), zero, random.')
_EPSILON = flags.DEFINE_float('epsilon', 1e-3, 'Theorem-2 ε as a fraction '
                              'of the threshold.')
_ANALYSIS_T = flags.DEFINE_integer(
    'analysis_T', None, 'Window of the offset-spike analysis (default: the '
    "model's L, the paper's T = L).")
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per batch (all '
                              'devices together); bounds memory.')
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', None,
                                     'Use only the first N examples.')
_SPLIT = flags.DEFINE_string('split', None, "TFDS split (default: the "
                             "dataset's test split).")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where results go (default: '
    'results/<workdir name>_rho<ρ>_T<T>).')
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', 0, 'XLA CPU devices to split the host into (0 = one per '
    'core); only affects the CPU backend.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of --init random.')
_TIME_CHUNK = flags.DEFINE_integer(
    'time_chunk', 8, 'Simulate this many steps at a time, carrying membrane '
    'potentials (same spikes; bounds memory by the chunk). 0 = all T steps '
    'in one block, which can be faster on accelerators.')


def _fail(message: str) -> None:
  sys.stderr.write(f'convert.py: error: {message}\n')
  sys.stderr.flush()
  sys.exit(2)


def _parse_flags(argv):
  """absl parsing, but a bad value is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}. See python convert.py --helpshort')


def _check_positive(name, value, allow_none=False):
  if value is None and allow_none:
    return
  if value is None or value < 1:
    _fail(f'--{name} must be a positive integer, got {value}')


def _output_dir(workdir: str) -> str:
  if _OUTPUT_DIR.value:
    path = _OUTPUT_DIR.value
  else:
    name = os.path.basename(os.path.normpath(workdir)) or 'run'
    path = os.path.join('results', f'{name}_rho{_RHO.value}_T{_T.value}')
  if os.path.exists(path) and not os.path.isdir(path):
    _fail(f'--output_dir {path} exists and is not a directory: pass another '
          '--output_dir')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent if not os.path.isdir(path) else path, os.W_OK):
    _fail(f'--output_dir {path} is not writable: pass another --output_dir')
  return path


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}: pass settings as '
          'flags, e.g. --rho 8')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # TFDS/Orbax chatter; --verbosity=0 shows it
  for name, flag in (('rho', _RHO), ('T', _T), ('iterations', _ITERATIONS),
                     ('batch_size', _BATCH)):
    _check_positive(name, flag.value)
  _check_positive('num_examples', _NUM_EXAMPLES.value, allow_none=True)
  _check_positive('analysis_T', _ANALYSIS_T.value, allow_none=True)
  if _HOST_DEVICES.value < 0:
    _fail(f'--host_devices must be >= 0, got {_HOST_DEVICES.value}')
  training.use_all_host_cores(_HOST_DEVICES.value)

  # Imported after the device set-up: they pull in TensorFlow and matplotlib.
  from cos_jax import conversion, data  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  settings = conversion.ConversionSettings(
      rho=_RHO.value, T=_T.value, iterations=_ITERATIONS.value,
      schedule=_SCHEDULE.value, inits=tuple(_INIT.value),
      epsilon=_EPSILON.value, analysis_T=_ANALYSIS_T.value, seed=_SEED.value,
      time_chunk=_TIME_CHUNK.value or None)
  try:
    settings.validate()
  except ValueError as e:
    _fail(str(e))
  output_dir = _output_dir(_WORKDIR.value)

  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)  # Orbax logs its own errors on reads
  try:
    config, model, variables = training.load_checkpoint(
        _WORKDIR.value, which=_WHICH.value)
  except training.CheckpointError as e:
    _fail(str(e).splitlines()[0])
  finally:
    logging.set_verbosity(verbosity)
  info = data.dataset_info(config.dataset)
  split = _SPLIT.value or info.test_split
  devices = jax.device_count()
  batch_size = math.ceil(_BATCH.value / devices) * devices
  try:
    batches = data.make_dataset(
        config.dataset, split, batch_size=_BATCH.value, train=False,
        data_dir=_DATA_DIR.value or config.get('data_dir'),
        num_examples=_NUM_EXAMPLES.value)
    first = next(batches, None)
  except data.DatasetUnavailableError as e:
    _fail(str(e).splitlines()[0])
  except (ValueError, KeyError) as e:  # e.g. an unknown split name
    _fail(f'cannot read split {split!r} of {config.dataset}: '
          f'{str(e).splitlines()[0] if str(e) else repr(e)}')
  if first is None:
    _fail(f'split {split!r} of {config.dataset} is empty: check --split and '
          '--num_examples')

  total = info.split_sizes.get(split)
  if _NUM_EXAMPLES.value:
    total = min(total or _NUM_EXAMPLES.value, _NUM_EXAMPLES.value)
  print(f'Converting {_WORKDIR.value} ({config.model}, L={config.levels}, '
        f'{config.dataset}:{split}) on {devices} {jax.devices()[0].platform} '
        f'device(s): rho={settings.rho}, T<={settings.T}, '
        f'iterations={settings.iterations}, schedule={settings.schedule}, '
        f'init={",".join(settings.inits)}', flush=True)

  def all_batches():
    yield first
    yield from batches

  start = time.time()
  with tqdm.tqdm(total=total, unit='img', desc='convert',
                 dynamic_ncols=True) as bar:
    result = conversion.convert_and_evaluate(
        model, variables, all_batches(), settings, batch_size=batch_size,
        progress=bar)
  wall = time.time() - start

  header, rows = conversion.summary_rows(result, settings)
  print()
  print(conversion.format_table(header, rows))
  print()
  print(conversion.format_layers(result))
  meta = {'workdir': os.path.abspath(_WORKDIR.value),
          'checkpoint': _WHICH.value, 'model': config.model,
          'levels': config.levels, 'dataset': config.dataset, 'split': split,
          'devices': devices, 'platform': jax.devices()[0].platform,
          'wall_seconds': wall}
  written = conversion.write_results(output_dir, result, settings, meta)
  print(f'\n{result["examples"]} examples in {wall:.0f} s; wrote '
        f'{", ".join(os.path.basename(p) for p in written)} to {output_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

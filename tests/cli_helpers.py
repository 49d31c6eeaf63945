"""What the tests of the command-line contract share: running the programs'
jobs in-process behind their error handler, and the one-line check."""

import os
import subprocess
import sys

from configs import convert as convert_config
from configs import default as default_config
from cos_jax import cli, conversion_job, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny real Fashion-MNIST run (4 devices in-process): 6 steps per epoch.
TINY_TRAIN = {'num_train_examples': 192, 'num_test_examples': 100,
              'batch_size': 32, 'eval_batch_size': 40, 'epochs': 2,
              'checkpoint_every_steps': 4, 'log_every_steps': 2,
              'model_kwargs.stages': ((4,), (8,)), 'model_kwargs.hidden': 16}
# The same run as train.py flags, for subprocess runs.
TINY_TRAIN_FLAGS = [f'--config.{k}={v}' for k, v in TINY_TRAIN.items()]


def run_script(script, *args, env=None, timeout=600):
  """Runs ``script`` (relative to the repo) in a subprocess."""
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT, env={**os.environ, **(env or {})})


def expect_usage_error(stderr, returncode, *words, program='convert.py'):
  """Exit code 2, one line on stderr naming ``words``, no traceback."""
  assert returncode == 2, (returncode, stderr[-2000:])
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-2000:]
  assert lines[0].startswith(f'{program}: error: '), lines[0]
  assert 'Traceback' not in stderr
  for word in words:
    assert word in lines[0], lines[0]


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for name in parents:
    config = config[name]
  config[leaf] = value


def _in_process(program, job, config, capfd):
  capfd.readouterr()
  try:
    with cli.one_line_errors(program):
      job(config)
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capfd.readouterr().err


def convert_in_process(capfd, **fields):
  """conversion_job.convert on configs/convert.py with ``fields`` set, behind
  the CLI's error handler; returns (exit code, stderr)."""
  config = convert_config.get_config()
  for name, value in fields.items():
    _set(config, name, value)
  return _in_process('convert.py', conversion_job.convert, config, capfd)


def train_config(**fields):
  """configs/default.py with :data:`TINY_TRAIN` and ``fields`` (dotted keys
  reach into model_kwargs)."""
  config = default_config.get_config()
  for name, value in {**TINY_TRAIN, **fields}.items():
    _set(config, name, value)
  return config


def train_in_process(capfd, workdir, **fields):
  """training.train_and_evaluate of :func:`train_config` behind train.py's
  error handler; returns (exit code, stderr)."""
  return _in_process(
      'train.py', lambda c: training.train_and_evaluate(c, str(workdir)),
      train_config(**fields), capfd)

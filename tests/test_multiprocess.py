"""Several JAX processes on this machine (python -m cos_jax.launch), against
one process with the same number of devices: 2 processes x 2 devices vs
1 process x 4 devices, over loopback."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cos_jax import checkpoints
from cli_helpers import TINY_TRAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN_FLAGS
TIMING = ('epoch_seconds', 'images_per_second')


def _env(**extra):
  env = dict(os.environ, COS_JAX_OFFLINE='1', **extra)
  env.pop('XLA_FLAGS', None)
  return env


def _launch(*command, processes=2, devices=2, env=None, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'cos_jax.launch', f'--processes={processes}',
       f'--devices_per_process={devices}', '--', *command],
      cwd=ROOT, env=env or _env(), capture_output=True, text=True,
      timeout=timeout)


def _single(*command, timeout=600):
  return subprocess.run([sys.executable, *command, '--host_devices=4'],
                        cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _log(workdir):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in Path(workdir, 'log.jsonl').read_text().splitlines()]


def test_calibrate_and_simulate_on_two_processes_equal_one(tmp_path):
  one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
  script = 'benchmarks/global_calibration.py'
  result = _single(script, f'--out={one}')
  assert result.returncode == 0, result.stderr[-2000:]
  result = _launch(script, f'--out={two}')
  assert result.returncode == 0, result.stderr[-2000:]
  a, b = np.load(one), np.load(two)
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 1
  for name in a.files:  # v0 of every IF layer and the outputs, bit for bit
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_convert_on_two_processes_equals_one(tmp_path):
  """70 test images in global batches of 32: the last batch's 6 images are
  all among process 0's rows, so process 1 runs it on padding alone; every
  image is counted once and results.json equals the one-process run's."""
  flags = ['--num_examples=70', '--batch_size=32', '--T=4', '--rho=4',
           '--init=cos,random,half']
  result = _single('convert.py', *flags, f'--output_dir={tmp_path / "one"}')
  assert result.returncode == 0, result.stderr[-2000:]
  result = _launch('convert.py', *flags, f'--output_dir={tmp_path / "two"}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'examples in' in result.stdout  # process 0's report, once
  assert result.stdout.count('Converting ') == 1
  varying = ('seconds', 'wall_seconds', 'config', 'processes')
  one, two = (
      {k: v for k, v in json.loads(Path(tmp_path, d, 'results.json')
                                   .read_text()).items() if k not in varying}
      for d in ('one', 'two'))
  assert one['examples'] == two['examples'] == 70
  assert one == two
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      '.one.lock', '.two.lock', 'one', 'two']


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mp') / 'two'
  result = _launch('train.py', f'--workdir={workdir}', *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_training_on_two_processes_equals_one(tmp_path, two_process_run):
  """Same data shards (2), same batches, same steps: the parameters agree
  up to float rounding of the cross-process all-reduce."""
  one = tmp_path / 'one'
  result = _single('train.py', f'--workdir={one}', '--config.data_shards=2',
                   *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  a = checkpoints.restore(str(one), which='latest')
  b = checkpoints.restore(str(two_process_run), which='latest')
  assert a.step == b.step == 12
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                               atol=1e-5)
  log_a, log_b = _log(one), _log(two_process_run)
  assert [r['step'] for r in log_a] == [r['step'] for r in log_b]
  for ra, rb in zip(log_a, log_b):
    for key, value in ra.items():
      assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  assert json.loads(Path(two_process_run, 'config.json').read_text())[
      'data_shards'] == 2


def test_a_killed_process_stops_the_others_and_the_rerun_resumes(
    tmp_path, two_process_run):
  workdir = tmp_path / 'killed'
  start = time.time()
  killed = _launch('train.py', f'--workdir={workdir}', *TINY,
                   env=_env(COS_JAX_CRASH_AT='logged@6@1'))
  assert killed.returncode == 2
  assert time.time() - start < 300
  last = killed.stderr.strip().splitlines()[-1].split('\r')[-1]
  assert last.startswith('launch: error: process 1 of 2 ended with signal '
                         'SIGKILL'), killed.stderr[-2000:]
  assert 'Traceback' not in killed.stderr
  resumed = _launch('train.py', f'--workdir={workdir}', *TINY)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming' in resumed.stdout
  a = checkpoints.restore(str(workdir), which='latest')
  b = checkpoints.restore(str(two_process_run), which='latest')
  assert a.verified and a.digest == b.digest  # bit for bit
  assert _log(workdir) == _log(two_process_run)


def test_refusals_under_the_launcher_stay_one_line(tmp_path):
  refused = _launch('convert.py', '--rho', '0',
                    f'--output_dir={tmp_path / "o"}')
  assert refused.returncode == 2
  lines = refused.stderr.strip().splitlines()
  assert lines == ['convert.py: error: --rho must be a positive integer, '
                   'got 0'], refused.stderr
  bad = subprocess.run([sys.executable, '-m', 'cos_jax.launch',
                        '--processes=0', '--', 'convert.py'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      'launch: error: --processes and --devices_per_process must be >= 1']

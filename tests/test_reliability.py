"""Hostile input and faults: every case ends in a one-line refusal (exit code 2,
nothing overwritten) or in a correct result.

Most cases run in-process through the programs' own error handler
(``cli.one_line_errors`` around ``conversion_job.convert`` or
``training.train_and_evaluate``); subprocesses run what only a real process
can show: TensorFlow's stderr on a forced-oneDNN CPU, locks that die with
their process, and SIGKILLs at every phase of an epoch end.

  python -m pytest tests/test_reliability.py -q   # docs/reliability.md's figures
"""

import errno
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cos_jax
from cli_helpers import (ROOT, convert_in_process, expect_usage_error,
                         train_in_process)
from cos_jax import (checkpoints, cli, conversion, interop, ownership, report,
                     runtime, training)
from cos_jax.data import DatasetUnavailableError


def snapshot(path: Path):
  """(relative path, size, mtime) of every file under ``path``."""
  if not path.exists():
    return None
  return sorted((str(p.relative_to(path)), p.stat().st_size,
                 p.stat().st_mtime_ns) for p in path.rglob('*'))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A tiny trained Fashion-MNIST workdir (2 epochs, in-process)."""
  workdir = tmp_path_factory.mktemp('tiny') / 'run'
  training.train_and_evaluate(
      __import__('cli_helpers').train_config(), str(workdir))
  return workdir


def _variant(tiny, tmp_path, edit):
  """A copy of the tiny workdir changed by ``edit(copy_path)``."""
  copy = tmp_path / 'variant'
  shutil.copytree(tiny, copy)
  edit(copy)
  return str(copy)


def _best_data_files(workdir):
  return sorted((p for p in Path(workdir, 'best').rglob('*')
                 if p.is_file() and p.stat().st_size > 64
                 and 'variables' in str(p) and 'metadata' not in p.name),
                key=lambda p: -p.stat().st_size)


def _flip_bit(workdir):
  path = _best_data_files(workdir)[0]
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _truncate(workdir):
  path = _best_data_files(workdir)[0]
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _write_config(value):
  return lambda w: Path(w, 'config.json').write_text(value)


def _config_field(**changes):
  def edit(workdir):
    path = Path(workdir, 'config.json')
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
  return edit


def _wider_hidden_layer(workdir):
  path = Path(workdir, 'config.json')
  config = json.loads(path.read_text())
  config['model_kwargs']['hidden'] = 32
  path.write_text(json.dumps(config))


def _resave_edited(workdir, edit):
  """Re-saves the best checkpoint after ``edit(variables)`` changed its
  NumPy copy in place (the digests stay valid: the values are the fault)."""
  restored = checkpoints.restore(str(workdir))
  variables = jax.tree.map(np.array, restored.variables)
  edit(variables)
  best = Path(workdir, 'best')
  shutil.rmtree(best)
  manager = checkpoints.Manager(str(best), max_to_keep=1, create=True,
                                async_save=False)
  manager.save(restored.step, variables=variables,
               metadata={'step': restored.step, 'test_accuracy': 0.5})
  manager.close()


def _nan_params(workdir):
  """The best checkpoint with a NaN weight."""
  def nan_weight(variables):
    variables['params']['Conv_0']['kernel'].flat[0] = np.nan
  _resave_edited(workdir, nan_weight)


# ---------------------------------------------------------------------------
# convert.py: settings, checkpoints and output directories.

REFUSED_CONVERSIONS = {
    'rho 0': ({'rho': 0}, ['--rho']),
    'rho negative': ({'rho': -3}, ['--rho']),
    'rho huge (memory)': ({'rho': 1000000}, ['--rho', 'GiB']),
    'T 0': ({'T': 0}, ['--T']),
    'T negative': ({'T': -1}, ['--T']),
    'T huge in one block (memory)': ({'T': 1000000, 'time_chunk': 0},
                                     ['--time_chunk', 'GiB']),
    'iterations 0': ({'iterations': 0}, ['--iterations']),
    'iterations negative': ({'iterations': -1}, ['--iterations']),
    'unknown schedule': ({'schedule': 'online'}, ['--schedule', 'online']),
    'empty init': ({'init': ''}, ['--init']),
    'only commas': ({'init': ',,'}, ['--init']),
    'duplicate init': ({'init': 'cos,cos'}, ['--init', 'more than once']),
    'unknown init': ({'init': 'cos,best'}, ['--init', 'best']),
    'init case': ({'init': 'COS'}, ['--init']),
    'epsilon 0': ({'epsilon': 0.0}, ['--epsilon']),
    'epsilon 1': ({'epsilon': 1.0}, ['--epsilon']),
    'epsilon negative': ({'epsilon': -0.1}, ['--epsilon']),
    'epsilon nan': ({'epsilon': math.nan}, ['--epsilon']),
    'epsilon inf': ({'epsilon': math.inf}, ['--epsilon']),
    'analysis_T 0': ({'analysis_T': 0}, ['--analysis_T']),
    'analysis_T huge (memory)': ({'analysis_T': 1000000},
                                 ['--analysis_T', 'GiB']),
    'T huge (time)': ({'T': 1000000}, ['--T', 'COS_JAX_MAX_STEPS']),
    'iterations huge (time)': ({'iterations': 100000},
                               ['--iterations', 'bound']),
    'analysis_T huge (time)': ({'analysis_T': 1000000},
                               ['--analysis_T', 'bound']),
    'time_chunk negative': ({'time_chunk': -1}, ['--time_chunk']),
    'batch_size 0': ({'batch_size': 0}, ['--batch_size']),
    'batch_size negative': ({'batch_size': -4}, ['--batch_size']),
    'num_examples 0': ({'num_examples': 0}, ['--num_examples']),
    'num_examples negative': ({'num_examples': -5}, ['--num_examples']),
    'unknown split': ({'split': 'bogus'}, ['--split', 'bogus']),
    'empty split': ({'split': 'test[5:5]'}, ['--split']),
    'unknown checkpoint kind': ({'checkpoint': 'newest'}, ['--checkpoint']),
    'missing workdir': ({'workdir': '/nonexistent/run'},
                        ['/nonexistent/run', 'train.py']),
}


@pytest.mark.parametrize('name', sorted(REFUSED_CONVERSIONS))
def test_refused_conversion_leaves_the_old_results(tiny, tmp_path, capfd,
                                                   monkeypatch, name):
  fields, words = REFUSED_CONVERSIONS[name]
  if '(memory)' in name:  # past the bound on time, to reach the memory check
    monkeypatch.setenv('COS_JAX_MAX_STEPS', str(10**9))
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.json').write_text('previous')
  (out / ownership.RESULTS_MARKER).write_text('')  # convert.py wrote it
  before = snapshot(out)
  fields = {'workdir': str(tiny), 'output_dir': str(out),
            'num_examples': 64, **fields}
  start = time.time()
  expect_usage_error(*reversed(convert_in_process(capfd, **fields)), *words)
  assert time.time() - start < 60, 'refused only after doing work'
  assert snapshot(out) == before


# (made from scratch in tmp_path, or edits of a copy of the tiny workdir)
REFUSED_WORKDIRS = {
    'a file': (lambda tmp: _touch(tmp / 'file'), None, ['is a file']),
    'an empty directory': (lambda tmp: _mkdir(tmp / 'empty'), None,
                           ['config.json']),
    'config.json is a list': (None, _write_config('[1, 2]'),
                              ['holds a list']),
    'config.json is not JSON': (None, _write_config('{not json'),
                                ['unreadable']),
    'config of another architecture': (None, _wider_hidden_layer,
                                       ['does not match']),
    'config with an unknown model': (None, _config_field(model='alexnet'),
                                     ['describes no valid model']),
    'one flipped bit in the weights': (None, _flip_bit, ['corrupted']),
    'a truncated weight file': (None, _truncate, ['corrupted']),
    'non-finite weights': (None, _nan_params, ['non-finite']),
}


def _touch(path):
  path.write_text('x')
  return str(path)


def _mkdir(path):
  path.mkdir()
  return str(path)


@pytest.mark.parametrize('name', sorted(REFUSED_WORKDIRS))
def test_refused_checkpoint(tiny, tmp_path, capfd, name):
  make, edit, words = REFUSED_WORKDIRS[name]
  workdir = make(tmp_path) if make else _variant(tiny, tmp_path, edit)
  code, err = convert_in_process(capfd, workdir=workdir, num_examples=64,
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, *words)
  assert not (tmp_path / 'o').exists()


def test_refused_output_dirs(tiny, tmp_path, capfd):
  a_file = tmp_path / 'a_file'
  a_file.write_text('keep me')
  for out in (a_file, a_file / 'sub'):
    code, err = convert_in_process(capfd, workdir=str(tiny), num_examples=64,
                                   output_dir=str(out))
    expect_usage_error(err, code, '--output_dir')
  assert a_file.read_text() == 'keep me'


ACCEPTED_CONVERSIONS = {
    'a thousand iterations (a loop, not unrolled)': {'iterations': 1000},
    'one block (time_chunk 0)': {'time_chunk': 0},
    'batch larger than the split': {'batch_size': 20000},
    'rho above T': {'rho': 6, 'T': 4},
    'global schedule, 2 iterations': {'schedule': 'global', 'iterations': 2},
    'every method': {'init': 'cos,half,lightweight,zero,random'},
    'latest checkpoint': {'checkpoint': 'latest'},
    'negative seed': {'seed': -7, 'init': 'random'},
}


@pytest.mark.parametrize('name', sorted(ACCEPTED_CONVERSIONS))
def test_accepted_conversion_gives_a_correct_result(tiny, tmp_path, capfd,
                                                    name):
  out = tmp_path / 'out'
  fields = {'workdir': str(tiny), 'output_dir': str(out), 'num_examples': 16,
            'T': 4, 'rho': 2, **ACCEPTED_CONVERSIONS[name]}
  code, err = convert_in_process(capfd, **fields)
  assert code == 0, err
  doc = json.loads((out / 'results.json').read_text())
  assert doc['examples'] == 16
  for curve in doc['curves'].values():
    assert all(0 <= a <= 1 for a in curve)
  # The ANN's accuracy does not depend on any of these settings.
  restored = checkpoints.restore(str(tiny), which=fields.get('checkpoint',
                                                             'best'))
  assert doc['checkpoint_step'] == restored.step
  assert doc['checkpoint_digest'] == restored.digest
  assert doc['checkpoint_verified'] is True


def test_non_finite_images_are_refused(tiny):
  _, model, variables = checkpoints.load_checkpoint(str(tiny))
  images = np.zeros((4, 28, 28, 1), np.float32)
  images[2, 3, 3, 0] = np.nan
  settings = conversion.ConversionSettings(
      calibration=cos_jax.Calibration(rho=2), T=2, methods=('cos',))
  with pytest.raises(DatasetUnavailableError, match='non-finite') as e:
    conversion.convert_and_evaluate(
        model, variables, [{'image': images, 'label': np.zeros(4, np.int32)}],
        settings)
  assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------
# train.py: configs and workdirs.

REFUSED_TRAININGS = {
    'learning rate inf': ({'learning_rate': math.inf}, ['learning_rate']),
    'learning rate nan': ({'learning_rate': math.nan}, ['learning_rate']),
    'learning rate 0': ({'learning_rate': 0.0}, ['learning_rate']),
    'learning rate negative': ({'learning_rate': -1.0}, ['learning_rate']),
    'weight decay nan': ({'weight_decay': math.nan}, ['weight_decay']),
    'weight decay negative': ({'weight_decay': -1e-4}, ['weight_decay']),
    'momentum 1': ({'momentum': 1.0}, ['momentum']),
    'momentum negative': ({'momentum': -0.1}, ['momentum']),
    'warmup negative': ({'warmup_epochs': -5.0}, ['warmup_epochs']),
    'warmup nan': ({'warmup_epochs': math.nan}, ['warmup_epochs']),
    'warmup beyond the run': ({'warmup_epochs': 50.0}, ['warmup_epochs']),
    'threshold_init negative': ({'model_kwargs.threshold_init': -1.0},
                                ['threshold_init']),
    'threshold_init 0': ({'model_kwargs.threshold_init': 0.0},
                         ['threshold_init']),
    'levels 0': ({'levels': 0}, ['levels']),
    'levels negative': ({'levels': -4}, ['levels']),
    'batch size 0': ({'batch_size': 0}, ['batch_size']),
    'batch size not divisible': ({'batch_size': 30}, ['divisible']),
    'batch size above the data': ({'batch_size': 256}, ['larger than']),
    'epochs 0': ({'epochs': 0}, ['epochs']),
    'unknown dataset': ({'dataset': 'mnist'}, ['unknown dataset']),
    'unknown model': ({'model': 'resnet50'}, ['unknown architecture']),
    'unknown stem': ({'stem': 'tiny'}, ['unknown stem']),
    'unknown model_kwargs': ({'model_kwargs.bogus': 1}, ['model_kwargs']),
    'no training examples': ({'num_train_examples': 0},
                             ['num_train_examples']),
    'stop at step 0': ({'stop_after_steps': 0}, ['stop_after_steps']),
}


@pytest.mark.parametrize('name', sorted(REFUSED_TRAININGS))
def test_refused_training_writes_nothing(tmp_path, capfd, name):
  fields, words = REFUSED_TRAININGS[name]
  workdir = tmp_path / 'run'
  code, err = train_in_process(capfd, workdir, **fields)
  expect_usage_error(err, code, *words, program='train.py')
  assert not workdir.exists()


RESUME_CHANGES = {
    'batch size': {'batch_size': 64}, 'learning rate': {'learning_rate': 0.1},
    'seed': {'seed': 1}, 'epochs (the schedule spans them)': {'epochs': 3},
}


@pytest.mark.parametrize('name', sorted(RESUME_CHANGES))
def test_resume_with_another_trajectory_is_refused(tiny, tmp_path, capfd,
                                                   name):
  workdir = Path(_variant(tiny, tmp_path, lambda w: None))
  before = snapshot(workdir)
  code, err = train_in_process(capfd, workdir, **RESUME_CHANGES[name])
  expect_usage_error(err, code, 'holds a run with', program='train.py')
  assert snapshot(workdir) == before


def test_refused_workdirs_for_training(tmp_path, capfd):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  code, err = train_in_process(capfd, a_file)
  expect_usage_error(err, code, 'is a file', program='train.py')
  listed = tmp_path / 'listed'
  listed.mkdir()
  (listed / 'config.json').write_text('[1, 2]')
  (listed / 'checkpoints' / '4').mkdir(parents=True)
  code, err = train_in_process(capfd, listed)
  expect_usage_error(err, code, 'holds a list', program='train.py')


def test_divergence_stops_before_saving_non_finite_state(tmp_path, capfd):
  workdir = tmp_path / 'run'
  code, err = train_in_process(capfd, workdir, learning_rate=1e8)
  # Found during the run, so the progress bar came first; the error is the
  # last line.
  assert code == 2 and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith(
      'train.py: error: training diverged'), err[-500:]
  for directory in ('checkpoints', 'best'):
    for step in checkpoints.finalized_steps(str(workdir / directory)):
      manager = checkpoints.Manager(str(workdir / directory),
                                    max_to_keep=10, create=False)
      variables = manager.restore_variables(step, jax.tree.map(
          np.asarray, checkpoints.restore(str(workdir), which='latest'
                                          ).variables))
      manager.close()
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


# ---------------------------------------------------------------------------
# The library's own edges.

@functools.lru_cache(maxsize=1)
def _small():
  model = cos_jax.models.get('small', num_classes=10, levels=4,
                             stages=((4,),), hidden=8)
  images = jnp.ones((2, 28, 28, 1))
  return model, model.init(jax.random.key(0), images), images


LIBRARY_CASES = {
    'empty batch (simulate)': (lambda m, v, x: cos_jax.simulate(
        m, v, x[:0], T=2), 'B >= 1'),
    'empty batch (calibrate)': (lambda m, v, x: cos_jax.calibrate(
        m, v, x[:0], rho=2), 'B >= 1'),
    'empty batch (evaluate_snn)': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x[:0], T=2, rho=2), 'B >= 1'),
    'T 0': (lambda m, v, x: cos_jax.simulate(m, v, x, T=0), 'T must'),
    'T float': (lambda m, v, x: cos_jax.simulate(m, v, x, T=2.0), 'T must'),
    'rho 0': (lambda m, v, x: cos_jax.calibrate(m, v, x, rho=0), 'rho'),
    'rho bool': (lambda m, v, x: cos_jax.calibrate(m, v, x, rho=True), 'rho'),
    'unknown schedule': (lambda m, v, x: cos_jax.calibrate(
        m, v, x, rho=2, schedule='online'), 'schedule'),
    'unknown init': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x, T=2, init='best'), 'init'),
    'random without key': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x, T=2, init='random'), 'key'),
    'record_steps above T': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x, T=2, rho=2, record_steps=3), 'record_steps'),
    'time_chunk 0': (lambda m, v, x: cos_jax.simulate(
        m, v, x, T=2, time_chunk=0), 'time_chunk'),
    'negative thresholds': (lambda m, v, x: cos_jax.simulate(
        m, jax.tree_util.tree_map_with_path(
            lambda p, a: -a if 'threshold' in jax.tree_util.keystr(p) else a,
            v), x, T=2), 'threshold'),
    'no time-steps of current': (lambda m, v, x: cos_jax.if_neuron(
        jnp.zeros((0, 3)), 1.0), 'time axis'),
    'threshold 0': (lambda m, v, x: cos_jax.if_neuron(
        jnp.zeros((2, 3)), 0.0), 'threshold'),
    'threshold nan': (lambda m, v, x: cos_jax.calibrate_layer(
        jnp.zeros((2, 3)), math.nan), 'threshold'),
    'negative threshold in qcfs': (lambda m, v, x: cos_jax.qcfs(
        jnp.ones(3), -1.0, 4), 'threshold'),
    'levels 0 in qcfs': (lambda m, v, x: cos_jax.qcfs(jnp.ones(3), 1.0, 0),
                         'levels'),
}


@pytest.mark.parametrize('name', sorted(LIBRARY_CASES))
def test_library_refuses_with_a_clear_message(name):
  call, words = LIBRARY_CASES[name]
  with pytest.raises(ValueError, match=words) as e:
    call(*_small())
  assert '\n' not in str(e.value)


def test_library_non_finite_inputs_do_what_the_docs_say():
  """NaN currents never fire, +inf fires at every step, -inf never (the
  if_neuron docstring); a NumPy re-derivation of the same rule agrees."""
  currents = jnp.array([[jnp.nan, jnp.inf, -jnp.inf, 0.7]] * 3)
  spikes = np.asarray(jax.jit(lambda c: cos_jax.if_neuron(c, 1.0).spikes)(
      currents))
  v, expected = np.full(4, 0.5), []
  for current in np.asarray(currents):
    u = v + current
    fired = u >= 1.0
    v = u - fired * 1.0
    expected.append(fired.astype(np.float32))
  np.testing.assert_array_equal(spikes, np.array(expected))
  np.testing.assert_array_equal(spikes[:, :3], [[0, 1, 0]] * 3)


# ---------------------------------------------------------------------------
# Locks and results written as a whole.

def test_a_busy_workdir_or_output_dir_is_refused(tiny, tmp_path, capfd):
  workdir = Path(_variant(tiny, tmp_path, lambda w: None))
  with runtime.exclusive_lock(str(workdir / checkpoints.LOCK_FILE), 'x'):
    code, err = train_in_process(capfd, workdir, stop_after_steps=14)
  expect_usage_error(err, code, 'in use by process', program='train.py')
  out = tmp_path / 'out'
  with runtime.exclusive_lock(str(tmp_path / '.out.lock'), 'x'):
    code, err = convert_in_process(capfd, workdir=str(tiny), num_examples=8,
                                   output_dir=str(out))
  expect_usage_error(err, code, 'in use by process')
  assert not out.exists()


def test_a_lock_dies_with_its_process(tmp_path):
  lock = tmp_path / '.lock'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from cos_jax import runtime\n'
       'with runtime.exclusive_lock(sys.argv[1], "x"):\n'
       '  print("held", flush=True); time.sleep(600)', str(lock)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(runtime.BusyError, match=f'process {holder.pid}'):
    with runtime.exclusive_lock(str(lock), 'x'):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with runtime.exclusive_lock(str(lock), 'x'):
    pass


@pytest.mark.parametrize('fail_at', ['writing', 'before the swap',
                                     'after the swap'])
def test_results_are_replaced_as_a_whole(tmp_path, monkeypatch, fail_at):
  """An interruption at any point leaves the old set or the new one."""
  out = tmp_path / 'out'
  old = {name: f'old {name}' for name in report.FILES}
  old[ownership.RESULTS_MARKER] = ''  # written by convert.py
  out.mkdir()
  for name, text in old.items():
    (out / name).write_text(text)
  real_write, real_replace = runtime.write_atomic, runtime.replace_directory
  calls = []

  def write(path, data):
    calls.append(path)
    if fail_at == 'writing' and len(calls) == 2:
      raise KeyboardInterrupt
    real_write(path, data)

  def replace(build, target):
    if fail_at == 'before the swap':
      raise KeyboardInterrupt
    real_replace(build, target)
    raise KeyboardInterrupt  # after the swap, before returning

  monkeypatch.setattr(runtime, 'write_atomic', write)
  monkeypatch.setattr(runtime, 'replace_directory', replace)
  result = {'examples': 1, 'ann_accuracy': 1.0, 'curves': {'cos': [1.0]},
            'analysis_T': 1, 'layers': {'before': {}, 'after': {}}}
  settings = conversion.ConversionSettings(
      calibration=cos_jax.Calibration(rho=1), T=1, methods=('cos',))
  with pytest.raises(KeyboardInterrupt):
    report.write_results(str(out), result, settings, {})
  texts = {name: (out / name).read_bytes() for name in os.listdir(out)}
  assert sorted(texts) == sorted(old)
  is_old = all(texts[n] == old[n].encode() for n in report.FILES)
  is_new = json.loads(texts['results.json'])['examples'] == 1 if not is_old \
      else False
  assert is_old != is_new
  assert is_new == (fail_at == 'after the swap')


# ---------------------------------------------------------------------------
# Subprocesses: TensorFlow's stderr on a forced-oneDNN CPU.

FORCED_ONEDNN = {'TF_ENABLE_ONEDNN_OPTS': '1', 'TF_CPP_MIN_LOG_LEVEL': '0',
                 'COS_JAX_OFFLINE': '1'}


@pytest.mark.parametrize('script, args, words', [
    ('convert.py', ['--rho', '0'], ['--rho']),
    ('convert.py', ['--workdir', '/nonexistent'], ['/nonexistent']),
    ('train.py', ['--workdir', '/tmp/x', '--config.levels=0'], ['levels']),
])
def test_error_path_is_one_line_with_onednn_forced_on(script, args, words):
  """On x86 CPUs with oneDNN, `import tensorflow` writes absl C++ log lines
  that TF_CPP_MIN_LOG_LEVEL does not silence; forcing oneDNN on reproduces
  that on every machine. The error path must stay one line."""
  env = dict(os.environ, **FORCED_ONEDNN)
  result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
  expect_usage_error(result.stderr, result.returncode, *words,
                     program=script)


def test_tensorflow_really_prints_with_onednn_forced_on():
  """The test above could pass because TensorFlow stayed quiet: check that
  a plain import does print here when oneDNN is forced on."""
  env = dict(os.environ, **FORCED_ONEDNN)
  result = subprocess.run([sys.executable, '-c', 'import tensorflow'],
                          capture_output=True, text=True, env=env,
                          timeout=300)
  if 'oneDNN' not in result.stderr:
    pytest.skip('this TensorFlow build prints nothing with oneDNN on')
  quiet = subprocess.run(
      [sys.executable, '-c', 'from cos_jax.data._tensorflow import tf'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert quiet.stderr == '', quiet.stderr


# ---------------------------------------------------------------------------
# Hostile input (issue 21): cos_jax deletes only what it wrote.

FMNIST = Path(ROOT, 'pretrained', 'fmnist_small')
TORCH_FIXTURE = Path(ROOT, 'tests', 'fixtures', 'torch',
                     'QCFS_CIFAR10_resnet20_L4.pth')


def contents(path: Path) -> dict:
  """Every file (and symlink) under ``path`` with its bytes: what a refusal
  must leave, file by file."""
  return {str(p.relative_to(path)): (os.readlink(p) if p.is_symlink()
                                     else p.read_bytes())
          for p in sorted(path.rglob('*')) if p.is_file() or p.is_symlink()}


@pytest.fixture
def scratch(tmp_path):
  """A user's clone: a fake .git, their files, a copy of the shipped run, a
  .pth beside their notes, an old results dir they added a file to."""
  root = tmp_path / 'clone'
  (root / '.git' / 'objects').mkdir(parents=True)
  (root / '.git' / 'HEAD').write_text('ref: refs/heads/main\n')
  (root / '.git' / 'objects' / 'ab').write_bytes(b'\x00blob')
  (root / 'thesis.txt').write_text('chapter 1')
  (root / 'sub').mkdir()
  (root / 'sub' / 'data.csv').write_text('a,b\n1,2\n')
  shutil.copytree(FMNIST, root / 'run')
  (root / 'ckpt').mkdir()
  shutil.copy(TORCH_FIXTURE, root / 'ckpt' / 'm_L4.pth')
  (root / 'ckpt' / 'notes.txt').write_text('trained on the lab machine')
  (root / 'old').mkdir()
  (root / 'old' / 'results.json').write_text('{"curves": {}, "table": {}}')
  (root / 'old' / 'mine.txt').write_text('my notes on these results')
  (root / 'empty').mkdir()
  os.symlink(root / 'empty', root / 'link')
  os.symlink(root / 'nowhere', root / 'dangling')
  return root


# name: (convert.py fields given the scratch clone, words in the refusal)
REFUSED_OUTPUT_DIRS = {
    'the repository (absolute)': (lambda r: {'output_dir': str(r)},
                                  ['current directory']),
    '. (the current directory)': (lambda r: {'output_dir': '.'},
                                  ['current directory']),
    'the workdir it converts': (
        lambda r: {'workdir': str(r / 'run'), 'output_dir': str(r / 'run')},
        ['checkpoint']),
    'a copy of a workdir': (lambda r: {'workdir': str(FMNIST),
                                       'output_dir': str(r / 'run')},
                            ['best']),
    "a checkpoint's folder": (lambda r: {'output_dir': str(r / 'run' / 'best')},
                              ['did not write']),
    'the folder of the .pth': (
        lambda r: {'torch_checkpoint': str(r / 'ckpt' / 'm_L4.pth'),
                   'output_dir': str(r / 'ckpt')}, ['checkpoint']),
    'a new folder inside a workdir': (
        lambda r: {'output_dir': str(r / 'run' / 'results')},
        ['inside the train.py workdir']),
    "a folder of the user's files": (lambda r: {'output_dir': str(r / 'sub')},
                                     ['data.csv']),
    'results with a file added': (lambda r: {'output_dir': str(r / 'old')},
                                  ['mine.txt']),
    'a symlink to an empty dir': (lambda r: {'output_dir': str(r / 'link')},
                                  ['symlink']),
    'a dangling symlink': (lambda r: {'output_dir': str(r / 'dangling')},
                           ['symlink']),
    'a file': (lambda r: {'output_dir': str(r / 'thesis.txt')},
               ['not a directory']),
    'a 250-character name': (lambda r: {'output_dir': str(r / ('x' * 250))},
                             ['characters']),
    'under /proc': (lambda r: {'output_dir': '/proc/self/cos_out'},
                    ['virtual']),
}


@pytest.mark.parametrize('name', sorted(REFUSED_OUTPUT_DIRS))
def test_output_dir_refused_keeps_every_file(scratch, capfd, monkeypatch,
                                             name):
  fields, words = REFUSED_OUTPUT_DIRS[name]
  monkeypatch.chdir(scratch)
  before = contents(scratch)
  fields = {'workdir': str(scratch / 'run'), 'num_examples': 8,
            **fields(scratch)}
  expect_usage_error(*reversed(convert_in_process(capfd, **fields)),
                     '--output_dir', *words)
  assert contents(scratch) == before
  assert (scratch / '.git' / 'HEAD').is_file()


def test_output_dir_on_a_mount_point_is_refused(tmp_path, capfd,
                                                monkeypatch):
  mount = tmp_path / 'mnt'
  mount.mkdir()
  real = os.path.ismount
  monkeypatch.setattr(os.path, 'ismount',
                      lambda p: os.path.abspath(p) == str(mount) or real(p))
  code, err = convert_in_process(capfd, output_dir=str(mount),
                                 num_examples=8, T=2, rho=2)
  expect_usage_error(err, code, '--output_dir', 'mount point')


def test_output_dirs_cos_jax_may_replace(tmp_path):
  files = report.FILES
  new, empty, ours, legacy = (tmp_path / n for n in ('new', 'empty', 'ours',
                                                     'legacy'))
  empty.mkdir()
  ours.mkdir()
  (ours / ownership.RESULTS_MARKER).write_text('')
  (ours / 'results.json').write_text('{}')
  legacy.mkdir()
  (legacy / 'results.json').write_text('{"curves": {}, "table": {}}')
  for path in (new, empty, ours, legacy):
    assert ownership.check_output_dir(str(path), files) == str(path)
  # results.json that convert.py did not write is no proof
  (empty / 'results.json').write_text('{"mine": 1}')
  with pytest.raises(cos_jax.SettingsError, match='no .cos_jax_results'):
    ownership.check_output_dir(str(empty), files)


def test_the_swap_proves_the_directory_again(tmp_path):
  """A file that appears after the first check is found under the lock, just
  before the swap; the swap's leftovers beside it are only ours."""
  out = tmp_path / 'out'
  out.mkdir()
  (out / ownership.RESULTS_MARKER).write_text('')
  (out / 'late.txt').write_text('added during the run')
  foreign = tmp_path / '.out.tmp-user'
  foreign.mkdir()
  (foreign / 'keep.txt').write_text('not ours')
  with pytest.raises(cos_jax.SettingsError, match='late.txt'):
    report.write_results(str(out), _RESULT, _SETTINGS, {})
  assert (out / 'late.txt').read_text() == 'added during the run'
  assert (foreign / 'keep.txt').exists()
  assert sorted(os.listdir(tmp_path)) == ['.out.tmp-user', 'out']


_RESULT = {'examples': 1, 'ann_accuracy': 1.0, 'curves': {'cos': [1.0]},
           'analysis_T': 1, 'layers': {'before': {}, 'after': {}}}
_SETTINGS = conversion.ConversionSettings(
    calibration=cos_jax.Calibration(rho=1), T=1, methods=('cos',))


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_keeps_the_old_results(tmp_path, monkeypatch,
                                                        capfd, code):
  out = tmp_path / 'out'
  report.write_results(str(out), _RESULT, _SETTINGS, {'run': 'old'})
  before = contents(tmp_path)
  real = runtime.write_atomic

  def write(path, data):
    if path.endswith('.png'):
      raise OSError(code, os.strerror(code), path)
    real(path, data)
  monkeypatch.setattr(runtime, 'write_atomic', write)
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    with cli.one_line_errors('convert.py'):
      report.write_results(str(out), _RESULT, _SETTINGS, {'run': 'new'})
  err = capfd.readouterr().err
  assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
  assert err.startswith('convert.py: error: ' + os.strerror(code)), err
  assert contents(tmp_path) == before


# train.py: a workdir holds only what train.py wrote.

def test_training_refuses_a_workdir_it_did_not_write(scratch, capfd):
  before = contents(scratch)
  for workdir, words in ((scratch, ['.git']), (scratch / 'sub', ['data.csv']),
                         (scratch / 'ckpt', ['m_L4.pth'])):
    code, err = train_in_process(capfd, workdir)
    expect_usage_error(err, code, 'did not write', *words, program='train.py')
  user_log = scratch / 'new'
  user_log.mkdir()
  (user_log / 'log.jsonl').write_text('{"my": "experiment"}\n')
  code, err = train_in_process(capfd, user_log)
  expect_usage_error(err, code, 'no config.json', program='train.py')
  assert (user_log / 'log.jsonl').read_text() == '{"my": "experiment"}\n'
  assert contents(scratch) == {**before, 'new/log.jsonl': b'{"my": '
                               b'"experiment"}\n'}


def test_a_run_with_a_user_file_added_is_refused(tiny, tmp_path, capfd):
  workdir = Path(_variant(tiny, tmp_path, lambda w: None))
  (workdir / 'notes.txt').write_text('lr 0.1 was too high')
  before = contents(workdir)
  code, err = train_in_process(capfd, workdir)
  expect_usage_error(err, code, "'notes.txt'", 'did not write',
                     program='train.py')
  assert contents(workdir) == before


def test_a_copy_of_a_shipped_run_needs_restart(scratch, capfd):
  """The shipped run has a best checkpoint and a long log, but no step
  checkpoint: training it again would start from step 0, so it must be
  asked for."""
  run = scratch / 'run'
  before = contents(run)
  # (one step if the guard were gone: the test fails fast)
  code, err = train_in_process(capfd, run, stop_after_steps=1)
  expect_usage_error(err, code, '--restart', program='train.py')
  assert contents(run) == before
  assert len((run / 'log.jsonl').read_text().splitlines()) > 100
  # --restart deletes train.py's own files, nothing else, and starts over.
  old_log = len((run / 'log.jsonl').read_text().splitlines())
  final = training.train_and_evaluate(
      __import__('cli_helpers').train_config(stop_after_steps=2), str(run),
      restart=True)
  assert final['step'] == 2 and final['stopped_early']
  assert len((run / 'log.jsonl').read_text().splitlines()) < old_log
  assert checkpoints.finalized_steps(str(run / 'checkpoints')) == [2]
  assert not checkpoints.finalized_steps(str(run / 'best'))
  with pytest.raises(checkpoints.ConfigError, match='nothing was deleted'):
    checkpoints.clear_workdir(str(scratch / 'sub'))
  assert (scratch / 'sub' / 'data.csv').exists()


def test_resuming_a_finished_run_says_so_and_keeps_the_log(tiny, tmp_path,
                                                           capfd):
  workdir = Path(_variant(tiny, tmp_path, lambda w: None))
  log = (workdir / 'log.jsonl').read_text()
  capfd.readouterr()
  final = training.train_and_evaluate(
      __import__('cli_helpers').train_config(), str(workdir))
  out = capfd.readouterr().out
  assert 'is finished' in out and '--restart' in out, out
  assert (workdir / 'log.jsonl').read_text().startswith(log)
  assert final['step'] == json.loads(log.splitlines()[-1])['step']


# Every checkpoint path refuses what no IF network can run.

def _edited_pth(path: Path, key: str, value: float) -> str:
  """The resnet20 fixture with the first value of ``key`` set to ``value``
  (its storage found by its bytes; the zip rewritten)."""
  state = interop.read_torch_state_dict(str(TORCH_FIXTURE))
  target = np.ascontiguousarray(state[key], '<f4').tobytes()
  edited = 0
  with zipfile.ZipFile(TORCH_FIXTURE) as zin, \
       zipfile.ZipFile(path, 'w') as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      if '/data/' in item.filename and data == target and not edited:
        array = np.frombuffer(data, '<f4').copy()
        array[0] = value
        data, edited = array.tobytes(), 1
      zout.writestr(item, data)
  assert edited, key
  return str(path)


BAD_TORCH_VALUES = {
    'NaN conv weight': ('conv1.0.weight', math.nan, 'non-finite'),
    'infinite BN variance': ('conv1.1.running_var', math.inf, 'non-finite'),
    'negative BN variance': ('conv1.1.running_var', -1.0, 'negative'),
    'NaN threshold': ('conv1.2.up', math.nan, 'non-finite'),
    'negative threshold': ('conv1.2.up', -1.0, 'threshold <= 0'),
    'zero threshold': ('conv1.2.up', 0.0, 'threshold <= 0'),
}


@pytest.mark.parametrize('name', sorted(BAD_TORCH_VALUES))
def test_torch_checkpoint_with_bad_values_is_refused(tmp_path, capfd, name):
  key, value, words = BAD_TORCH_VALUES[name]
  path = _edited_pth(tmp_path / 'm_L4.pth', key, value)
  code, err = convert_in_process(capfd, torch_checkpoint=path,
                                 output_dir=str(tmp_path / 'out'))
  expect_usage_error(err, code, 'm_L4.pth', words)
  assert not (tmp_path / 'out').exists()


def test_native_checkpoint_with_negative_variance_is_refused(tiny, tmp_path,
                                                             capfd):
  def negative_variance(variables):
    stats = variables['batch_stats']
    stats[sorted(stats)[0]]['var'][0] = -1.0
  workdir = _variant(tiny, tmp_path,
                     lambda w: _resave_edited(w, negative_variance))
  code, err = convert_in_process(capfd, workdir=workdir,
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, 'negative BatchNorm variance')


# The library names the argument.

def _other_model_v0(m, v, x):
  other = cos_jax.models.get('small', num_classes=10, levels=4,
                             stages=((6,),), hidden=8)
  return cos_jax.init_v0(other, other.init(jax.random.key(1), x), x)


HOSTILE_LIBRARY_CASES = {
    'v0 of 1 image for a batch of 2': (lambda m, v, x: cos_jax.simulate(
        m, v, x, cos_jax.init_v0(m, v, x[:1]), T=2), 'v0.*batch of 2'),
    'v0 of another model': (lambda m, v, x: cos_jax.simulate(
        m, v, x, _other_model_v0(m, v, x), T=2), 'v0.*shape'),
    'an arbitrary pytree as v0': (lambda m, v, x: cos_jax.calibrate(
        m, v, x, {'a': [1, 2]}, rho=2), 'v0 has no leaf'),
    'NaN v0': (lambda m, v, x: cos_jax.simulate(
        m, v, x, jax.tree.map(lambda a: a * np.nan, cos_jax.init_v0(m, v, x)),
        T=2), 'v0 holds NaN'),
    'NaN images (evaluate_snn)': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x.at[0, 0, 0, 0].set(np.nan), T=2, rho=2),
                                  'images holds NaN or inf'),
    'infinite images (evaluate_snn)': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x.at[1, 2, 3, 0].set(np.inf), T=2, rho=2),
                                       'images holds NaN or inf'),
    'wrong image size': (lambda m, v, x: cos_jax.simulate(
        m, v, jnp.ones((2, 32, 32, 1)), T=2), 'images of shape'),
    'wrong channels (calibrate)': (lambda m, v, x: cos_jax.calibrate(
        m, v, jnp.ones((2, 28, 28, 3)), rho=2), 'images of shape'),
    'wrong channels (init_v0)': (lambda m, v, x: cos_jax.init_v0(
        m, v, jnp.ones((2, 28, 28, 3))), 'images of shape'),
    'wrong channels (layer_statistics)': (
        lambda m, v, x: cos_jax.analysis.layer_statistics(
            m, v, jnp.ones((2, 28, 28, 3)), T=2, rho=2), 'images of shape'),
    'no batch axis': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x[0], T=2, rho=2), 'no batch axis'),
    'images as a list': (lambda m, v, x: cos_jax.simulate(
        m, v, np.asarray(x).tolist(), T=2), 'images must be an array'),
    'variables without params': (lambda m, v, x: cos_jax.simulate(
        m, {'batch_stats': v.get('batch_stats', {})}, x, T=2),
                                 "variables must hold 'params'"),
    'num_classes 0': (lambda m, v, x: cos_jax.models.get(
        'small', num_classes=0, levels=4), 'num_classes'),
    'simulate T 10**6': (lambda m, v, x: cos_jax.simulate(m, v, x, T=10**6),
                         'T 1000000.*COS_JAX_MAX_STEPS'),
    'evaluate_snn T 10**7': (lambda m, v, x: cos_jax.evaluate_snn(
        m, v, x, T=10**7, rho=2), 'T 10000000.*bound'),
    'iterations 10**5': (lambda m, v, x: cos_jax.calibrate(
        m, v, x, rho=8, iterations=10**5), 'iterations 100000.*bound'),
    'rho so large XLA would ask for terabytes': (
        lambda m, v, x: cos_jax.calibrate(m, v, jnp.ones((512, 28, 28, 1)),
                                          rho=90000), 'rho 90000.*GiB'),
}


@pytest.mark.parametrize('name', sorted(HOSTILE_LIBRARY_CASES))
def test_library_names_the_argument(name):
  call, words = HOSTILE_LIBRARY_CASES[name]
  start = time.time()
  with pytest.raises(ValueError, match=words) as e:
    call(*_small())
  assert '\n' not in str(e.value)
  assert time.time() - start < 30


def test_numpy_integers_are_integers():
  model, variables, images = _small()
  run = cos_jax.evaluate_snn(model, variables, images, T=np.int64(3),
                             rho=np.int64(2), iterations=np.int64(2))
  same = cos_jax.evaluate_snn(model, variables, images, T=3, rho=2,
                              iterations=2)
  np.testing.assert_array_equal(run.outputs, same.outputs)
  assert cos_jax.models.get('small', num_classes=np.int64(10),
                            levels=np.int64(4)).num_classes == 10


def test_the_step_bound_can_be_raised(monkeypatch):
  model, variables, images = _small()
  monkeypatch.setenv('COS_JAX_MAX_STEPS', '10')
  with pytest.raises(cos_jax.SettingsError, match='COS_JAX_MAX_STEPS=11'):
    cos_jax.simulate(model, variables, images, T=11)
  monkeypatch.setenv('COS_JAX_MAX_STEPS', '11')
  assert cos_jax.simulate(model, variables, images, T=11).shape[0] == 11


# The programs: one line for the machine's refusals, signals, config files.

ENVIRONMENT_ERRORS = {
    'ENOSPC': (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                               '/data/out'), 'No space left'),
    'EROFS': (lambda: OSError(errno.EROFS, os.strerror(errno.EROFS),
                              '/ro/tfds'), 'Read-only file system'),
    'ENAMETOOLONG': (lambda: OSError(errno.ENAMETOOLONG, 'File name too long',
                                     '/x/.name.lock'), 'File name too long'),
    'EBUSY': (lambda: OSError(errno.EBUSY, 'Device or resource busy', '.'),
              'busy'),
    'Orbax wrapping ENOSPC': (lambda: _chained(
        ValueError('save failed'), OSError(errno.ENOSPC, 'No space left on '
                                           'device')), 'No space left'),
    'TensorStore text': (lambda: RuntimeError(
        'INTERNAL: Error writing "x": [OS error 30: Read-only file system]'),
                         'Read-only file system'),
    'truncated TFDS record': (lambda: _tf().errors.DataLossError(
        None, None, 'truncated record at 2048'), 'truncated or corrupted'),
    'read-only TFDS_DATA_DIR (TF)': (lambda: _tf().errors.PermissionDeniedError(
        None, None, '/ro/tfds/fashion_mnist; Permission denied'),
                                     'not writable'),
}


def _chained(outer, cause):
  outer.__cause__ = cause
  return outer


def _tf():
  from cos_jax.data._tensorflow import tf  # pylint: disable=g-import-not-at-top
  return tf


@pytest.mark.parametrize('name', sorted(ENVIRONMENT_ERRORS))
def test_environment_errors_are_one_line_exit_1(capfd, name):
  make, words = ENVIRONMENT_ERRORS[name]
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    with cli.one_line_errors('train.py'):
      raise make()
  err = capfd.readouterr().err
  assert e.value.code == 1
  assert len(err.strip().splitlines()) == 1 and words in err, err


def test_a_truncated_prepared_dataset_is_one_line_exit_1(tmp_path, capfd):
  """A real TFDS shard cut short: TensorFlow's DataLossError mid-run."""
  prepared = Path(tfds.builder('fashion_mnist').data_dir)
  shard = prepared / 'fashion_mnist-test.tfrecord-00000-of-00001'
  if not shard.exists():
    pytest.skip('fashion_mnist is not prepared here')
  copy = tmp_path / 'data' / 'fashion_mnist' / prepared.name
  copy.mkdir(parents=True)
  for name in ('dataset_info.json', 'features.json', 'label.labels.txt'):
    shutil.copy(prepared / name, copy / name)
  (copy / shard.name).write_bytes(shard.read_bytes()[:20000])  # ~35 images
  out = tmp_path / 'out'
  report.write_results(str(out), _RESULT, _SETTINGS, {'run': 'old'})
  before = contents(out)
  code, err = convert_in_process(capfd, data_dir=str(tmp_path / 'data'),
                                 num_examples=64, batch_size=8, T=2, rho=2,
                                 output_dir=str(out))
  assert code == 1, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('convert.py: error: a prepared dataset file is '
                         'truncated or corrupted (DataLossError: truncated '
                         'record'), last
  assert contents(out) == before


@pytest.mark.parametrize('signal_class, code', [(KeyboardInterrupt, 130),
                                                (runtime.Terminated, 143)])
def test_interrupts_are_one_line(capfd, signal_class, code):
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    with cli.one_line_errors('convert.py'):
      raise signal_class()
  err = capfd.readouterr().err
  assert e.value.code == code and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_an_error_after_a_stop_is_the_stop(capfd, monkeypatch, signum):
  """A library that turns the stop's exception into its own error (as a
  callback run from C may) still ends in the stop's line and exit code."""
  monkeypatch.setattr(runtime, '_STOP_SIGNALS', [signum])
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    with cli.one_line_errors('convert.py'):
      raise RuntimeError('UnknownError: KeyboardInterrupt in a callback')
  err = capfd.readouterr().err
  assert e.value.code == 128 + signum and len(err.strip().splitlines()) == 1
  assert 'earlier results' in err


@pytest.mark.parametrize('value, words', [
    ({'rho': 4}, 'returned dict'), (None, 'returned NoneType'),
    ('missing', "has no field 'T'")])
def test_config_files_of_the_wrong_type(value, words):
  from configs import convert as convert_config  # pylint: disable=g-import-not-at-top
  if value == 'missing':
    value = ml_collections.ConfigDict({'rho': 4})
  with pytest.raises(cos_jax.SettingsError, match=words):
    cli.check_config_type(value, convert_config.get_config())


_DROPPED_STOP = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # see _AS_FROM_A_TERMINAL
from cos_jax import runtime
runtime.stop_on_signals()
class Collected:
  def __del__(self):  # Python drops what a __del__ raises, as in a gc callback
    os.kill(os.getpid(), signal.{name})
Collected()
old = sys.argv[1]
try:
  runtime.write_atomic(old, 'new')
except BaseException as e:
  print(type(e).__name__)
"""


@pytest.mark.parametrize('name, raised', [('SIGTERM', 'Terminated'),
                                          ('SIGINT', 'KeyboardInterrupt')])
def test_a_stop_dropped_by_python_is_raised_at_the_next_commit(
    tmp_path, name, raised):
  """A signal whose exception Python drops (it arrived in a __del__ or a
  garbage-collection callback) still stops the run before it writes, and
  without an "Exception ignored" traceback."""
  old = tmp_path / 'results.json'
  old.write_text('old')
  proc = subprocess.run(
      [sys.executable, '-c', _DROPPED_STOP.format(name=name), str(old)],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.stdout.split() == [raised], proc
  assert 'Exception ignored' not in proc.stderr, proc.stderr
  assert old.read_text() == 'old'


# Runs a program as from a terminal, with Python's own Ctrl-C handler: a test
# run started in the background (a shell job without job control) ignores
# SIGINT, and a child inherits that. (A preexec_fn would fork a threaded
# process.)
_AS_FROM_A_TERMINAL = ('import runpy, signal, sys; '
                       'signal.signal(signal.SIGINT, signal.default_int_handler); '
                       'sys.argv = sys.argv[1:]; '
                       'runpy.run_path(sys.argv[0], run_name="__main__")')


def test_signals_and_config_files_in_real_processes(tmp_path):
  """Ctrl-C and SIGTERM in the middle of a conversion end in one line with
  130 / 143 and leave the old results; a --config returning a dict is one
  line with 2."""
  config = tmp_path / 'plain_dict.py'
  config.write_text('def get_config():\n  return {"rho": 4}\n')
  refused = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'convert.py'), f'--config={config}'],
      cwd=ROOT, stderr=subprocess.PIPE, text=True)
  running = {}
  for signum in (signal.SIGINT, signal.SIGTERM):
    out = tmp_path / f'out_{signum}'
    report.write_results(str(out), _RESULT, _SETTINGS, {'run': 'old'})
    running[signum] = (out, contents(out), subprocess.Popen(
        [sys.executable, '-c', _AS_FROM_A_TERMINAL,
         os.path.join(ROOT, 'convert.py'),
         f'--output_dir={out}', '--num_examples=64', '--T=4', '--rho=2',
         '--batch_size=8', '--host_devices=1'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for signum, (out, before, proc) in running.items():
    line = proc.stdout.readline()  # "Converting ...": the work has begun
    assert line.startswith('Converting'), (line, proc.stderr.read())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith('convert.py: error: ') and 'Traceback' not in err
    assert contents(out) == before
  expect_usage_error(refused.communicate(timeout=300)[1], refused.returncode,
                     '--config', 'dict')

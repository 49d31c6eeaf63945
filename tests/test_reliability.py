"""Hostile input and faults: every case ends in a one-line refusal (exit code 2,
nothing overwritten) or in a correct result.

Most cases run in-process through the programs' own error handler
(``cli.one_line_errors`` around ``conversion_job.convert`` or
``training.train_and_evaluate``); subprocesses run what only a real process
can show: TensorFlow's stderr on a forced-oneDNN CPU, locks that die with
their process, and SIGKILLs at every phase of an epoch end.

  python -m pytest tests/test_reliability.py -q   # docs/reliability.md's figures
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cos_jax
from cli_helpers import (ROOT, TINY_TRAIN, convert_in_process,
                         expect_usage_error, run_script, train_in_process)
from cos_jax import checkpoints, conversion, report, runtime, training
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


def _nan_params(workdir):
  """Re-saves the best checkpoint with a NaN weight (and valid digests)."""
  restored = checkpoints.restore(str(workdir))
  variables = jax.tree.map(np.array, restored.variables)
  kernel = variables['params']['Conv_0']['kernel']
  kernel.flat[0] = np.nan
  best = Path(workdir, 'best')
  shutil.rmtree(best)
  manager = checkpoints.Manager(str(best), max_to_keep=1, create=True,
                                async_save=False)
  manager.save(restored.step, variables=variables,
               metadata={'step': restored.step, 'test_accuracy': 0.5})
  manager.close()


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
                                                   name):
  fields, words = REFUSED_CONVERSIONS[name]
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.json').write_text('previous')
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
  assert sorted(texts) == sorted(report.FILES)
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

"""Tests of cos_jax.training, train.py and configs/.

In-process tests run the paper configs for a couple of steps on
`tfds.testing.mock_data`; subprocess tests run train.py on a few hundred real
Fashion-MNIST examples with a tiny net (resume after SIGKILL, 1/2/4 host
devices, bad input -> exit 2).
"""

from __future__ import annotations

import importlib
import json
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
import optax
import pytest

from cos_jax import checkpoints, data, runtime, train_config, training
from cli_helpers import TINY_TRAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ('cifar10_vgg16', 'cifar10_resnet18', 'cifar10_resnet20',
                 'cifar100_vgg16', 'cifar100_resnet20', 'imagenet_vgg16',
                 'imagenet_resnet34')

# A tiny run on real Fashion-MNIST: 192 train examples / batch 32 = 6 steps per
# epoch, 2 epochs; 100 test examples in eval batches of 40 (last one padded).
TINY = TINY_TRAIN_FLAGS
TINY_STEPS = 12


def load_config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def tree_allclose(a, b, **kw):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.allclose(np.asarray(x), np.asarray(y), **kw)
             for x, y in zip(la, lb))


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def snapshot(path: Path):
  """(relative path, size, mtime) of every file under path (None if absent)."""
  if not path.exists():
    return None
  return sorted((str(p.relative_to(path)), p.stat().st_size,
                 p.stat().st_mtime_ns) for p in path.rglob('*'))


def train_cmd(workdir, *args, host_devices=2):
  return [sys.executable, str(ROOT / 'train.py'), f'--workdir={workdir}',
          f'--host_devices={host_devices}', *args]


_JAX_CACHE = {}


@pytest.fixture(scope='session', autouse=True)
def _jax_cache_for_subprocesses(tmp_path_factory):
  # The train.py runs below compile the same programs again and again.
  _JAX_CACHE['dir'] = str(tmp_path_factory.mktemp('jax_cache'))


def env():
  e = dict(os.environ)
  e.pop('XLA_FLAGS', None)
  e['COS_JAX_OFFLINE'] = '1'
  e['TF_CPP_MIN_LOG_LEVEL'] = '3'
  e['PYTHONPATH'] = str(ROOT)
  if 'dir' in _JAX_CACHE:
    e['JAX_COMPILATION_CACHE_DIR'] = _JAX_CACHE['dir']
    e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return e


def run_train(workdir, *args, host_devices=2, check=True, timeout=300):
  proc = subprocess.run(train_cmd(workdir, *args, host_devices=host_devices),
                        capture_output=True, text=True, env=env(),
                        cwd=ROOT, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'train.py failed ({proc.returncode}):\n'
                         f'{proc.stderr[-3000:]}')
  return proc


def latest_variables(workdir):
  return checkpoints.load_checkpoint(str(workdir), which='latest')[2]


def log_records(workdir, drop=('epoch_seconds', 'images_per_second')):
  lines = [json.loads(l) for l in (Path(workdir) / 'log.jsonl').open()]
  return [{k: v for k, v in l.items() if k not in drop} for l in lines]


def final_record(workdir):
  return [l for l in log_records(workdir) if 'test_accuracy' in l][-1]


@pytest.fixture(scope='session')
def fmnist_available():
  from cos_jax.data import prepare
  try:
    prepare.get_builder('fashion_mnist')
  except data.DatasetUnavailableError as e:
    pytest.skip(f'Fashion-MNIST unavailable: {e}')


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory, fmnist_available):
  """The tiny run, uninterrupted, on 2 host devices."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  run_train(workdir, *TINY)
  return workdir


# ---------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize('name', ('default',) + PAPER_CONFIGS)
def test_config_fields(name):
  config = load_config(name)
  for field in ('dataset', 'model', 'model_kwargs', 'levels', 'stem',
                'batch_size', 'eval_batch_size', 'epochs', 'learning_rate',
                'momentum', 'weight_decay', 'seed', 'data_dir',
                'num_train_examples', 'num_test_examples',
                'checkpoint_every_steps', 'keep_checkpoints',
                'log_every_steps', 'stop_after_steps'):
    assert field in config, field
  assert config.data_dir is None and config.num_train_examples is None
  train_config.validate_config(config)


def test_paper_settings():
  for name in PAPER_CONFIGS:
    c = load_config(name)
    assert (c.momentum, c.epochs) == (0.9, 300)
    dataset, model = name.split('_')
    assert c.model == model
    if dataset == 'cifar10':
      assert (c.dataset, c.learning_rate, c.weight_decay, c.levels,
              c.batch_size) == ('cifar10', 0.1, 5e-4, 4, 128)
    elif dataset == 'cifar100':
      assert (c.dataset, c.learning_rate, c.weight_decay, c.levels,
              c.batch_size) == ('cifar100', 0.02, 5e-4, 4, 128)
    else:
      assert (c.dataset, c.learning_rate, c.weight_decay, c.levels,
              c.batch_size) == ('imagenet2012', 0.1, 1e-4, 8, 256)


def test_optimizer_is_torch_sgd_with_coupled_weight_decay():
  config = load_config('cifar10_resnet20')
  tx = training.create_optimizer(config, steps_per_epoch=10)
  schedule = training.learning_rate_schedule(config, 10)
  params = {'w': jnp.array([1.0, -2.0]), 'threshold': jnp.array(8.0)}
  grads = {'w': jnp.array([0.5, 0.25]), 'threshold': jnp.array(-1.0)}
  state = tx.init(params)
  p, buf = dict(params), {k: 0.0 for k in params}
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in p:  # torch.optim.SGD(momentum=0.9, weight_decay=5e-4)
      g = grads[k] + config.weight_decay * p[k]
      buf[k] = g if step == 0 else 0.9 * buf[k] + g
      p[k] = p[k] - schedule(step) * buf[k]
  assert tree_allclose(params, p, rtol=1e-6)
  assert float(schedule(config.epochs * 10)) == pytest.approx(0.0, abs=1e-9)


def test_validate_config_messages():
  config = load_config('default')
  for field, value, words in (('dataset', 'mnist', 'unknown dataset'),
                              ('model', 'resnet50', 'unknown architecture'),
                              ('levels', 0, 'levels'),
                              ('batch_size', 0, 'batch_size')):
    bad = load_config('default')
    bad[field] = value
    with pytest.raises(train_config.SettingsError, match=words) as e:
      train_config.validate_config(bad)
    assert '\n' not in str(e.value)
  with pytest.raises(train_config.ConfigError, match='divisible by the 3 devices'):
    train_config.check_devices(config, num_devices=3, num_processes=1)


def test_use_all_host_cores_is_harmless_after_init():
  jax.devices()  # backends initialised
  assert runtime.use_all_host_cores(0) is None
  assert runtime.use_all_host_cores(7) is None
  with pytest.raises(ValueError):
    runtime.use_all_host_cores(-1)


# ---------------------------------------------------------------------------
# Every paper config, a couple of steps on mock data.


# Shallow, narrow stand-ins of each architecture family: compiling the real
# VGG-16 / ResNet-18/34 train steps takes minutes on a 2-core CPU. Set
# COS_JAX_FULL_MODEL_TESTS=1 to run the configs' real architectures.
SMALL_VARIANTS = {
    'vgg16': {'blocks': ((8,),) * 5, 'hidden': 16},
    'resnet18': {'stage_sizes': (1, 1), 'stage_features': (8, 16)},
    'resnet20': {'stage_sizes': (1, 1, 1), 'stage_features': (8, 8, 16)},
    'resnet34': {'stage_sizes': (1, 1), 'stage_features': (8, 16)},
}


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_config_trains_on_mock_data(name, tmp_path):
  import tensorflow_datasets as tfds
  config = load_config(name)
  n = jax.device_count()
  batch = n
  config.batch_size = batch
  config.eval_batch_size = 2 * n
  config.num_train_examples = 2 * batch  # 2 steps
  config.num_test_examples = 3 * n       # the last eval batch is padded
  config.epochs = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  # mock_data swaps in a fake file system (process-wide) while a dataset is
  # opened; an Orbax save running in a background thread then fails.
  config.async_checkpointing = False
  if not os.environ.get('COS_JAX_FULL_MODEL_TESTS'):
    config.model_kwargs = SMALL_VARIANTS[config.model]
  with tfds.testing.mock_data(num_examples=16):
    metrics = training.train_and_evaluate(config, str(tmp_path))
  assert metrics['step'] == config.num_train_examples // batch
  assert metrics['test_examples'] == config.num_test_examples
  assert np.isfinite(metrics['train_loss']) and np.isfinite(
      metrics['test_loss'])
  assert 0 <= metrics['test_accuracy'] <= 1
  assert (tmp_path / 'config.json').exists()
  assert (tmp_path / 'log.jsonl').exists()
  _, model, variables = checkpoints.load_checkpoint(str(tmp_path), which='best')
  assert set(variables) == {'params', 'batch_stats'}


# ---------------------------------------------------------------------------
# Resume.


def test_stop_and_resume_in_process_equals_uninterrupted(tmp_path,
                                                         fmnist_available):
  config = load_config('default')
  n = jax.device_count()
  config.num_train_examples = 48 * n
  config.num_test_examples = 20
  config.batch_size = 8 * n
  config.eval_batch_size = 8 * n
  config.epochs = 2
  config.model_kwargs.stages = ((4,), (8,))
  config.model_kwargs.hidden = 16
  config.checkpoint_every_steps = 2
  full = training.train_and_evaluate(config, str(tmp_path / 'full'))
  assert full['step'] == 12
  config.stop_after_steps = 5  # inside epoch 0, after the checkpoint at 4
  part = training.train_and_evaluate(config, str(tmp_path / 'part'))
  assert part['step'] == 5 and part['stopped_early']
  config.stop_after_steps = None
  resumed = training.train_and_evaluate(config, str(tmp_path / 'part'))
  assert resumed['step'] == 12
  a = latest_variables(tmp_path / 'full')
  b = latest_variables(tmp_path / 'part')
  assert max_abs_diff(a, b) == 0.0
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'best_step', 'best_test_accuracy'):
    assert resumed[key] == full[key], key
  assert log_records(tmp_path / 'part') == log_records(tmp_path / 'full')
  # A finished run restarted does nothing but report.
  again = training.train_and_evaluate(config, str(tmp_path / 'part'))
  assert again['test_accuracy'] == full['test_accuracy']


def test_sigkill_mid_save_then_resume_equals_uninterrupted(tmp_path,
                                                           reference_run):
  workdir = tmp_path / 'killed'
  ckpts = workdir / 'checkpoints'
  proc = subprocess.Popen(train_cmd(workdir, *TINY), env=env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  killed_during_save = False
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    names = os.listdir(ckpts) if ckpts.is_dir() else []
    if any('tmp' in n for n in names):
      proc.send_signal(signal.SIGKILL)
      killed_during_save = True
      break
    time.sleep(0.002)
  proc.wait()
  if not killed_during_save:
    pytest.skip('the run finished before a save could be interrupted')
  assert proc.returncode == -signal.SIGKILL
  # Only finalized checkpoints count; the half-written one is ignored.
  rerun = run_train(workdir, *TINY)
  assert not any('tmp' in n for n in os.listdir(ckpts))
  assert max_abs_diff(latest_variables(workdir),
                      latest_variables(reference_run)) == 0.0
  # The same log, line for line (timings aside).
  assert log_records(workdir) == log_records(reference_run)
  assert 'final test accuracy' in rerun.stdout


# ---------------------------------------------------------------------------
# Device count.


def test_results_do_not_depend_on_device_count(tmp_path, reference_run):
  reference = latest_variables(reference_run)
  ref_loss = final_record(reference_run)['train_loss']
  procs = {devices: subprocess.Popen(
      train_cmd(tmp_path / f'dev{devices}', *TINY, host_devices=devices),
      env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for devices in (1, 4)}
  for devices, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f'{devices} cpu device(s)' in out
    workdir = tmp_path / f'dev{devices}'
    variables = latest_variables(workdir)
    diff = max_abs_diff(variables, reference)
    assert diff < 1e-3, (devices, diff)
    assert final_record(workdir)['train_loss'] == pytest.approx(ref_loss,
                                                                rel=1e-4)


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written.


def test_bad_input_exits_2_with_one_line(tmp_path, reference_run):
  incompatible = tmp_path / 'incompatible'
  shutil.copytree(reference_run, incompatible)
  cases = {
      'unknown dataset': (tmp_path / 'a', ['--config.dataset=mnist']),
      'unknown architecture': (tmp_path / 'b', ['--config.model=resnet50']),
      'levels': (tmp_path / 'c', ['--config.levels=0']),
      'cannot take fashion_mnist images': (
          tmp_path / 'g', ['--config=configs/cifar10_vgg16.py',
                           '--config.dataset=fashion_mnist']),
      'holds a run with': (incompatible, TINY + ['--config.levels=8']),
      'not divisible by the 3 devices': (
          tmp_path / 'e', TINY + ['--config.batch_size=32']),
      'cifar10 is not prepared': (
          tmp_path / 'f', ['--config.dataset=cifar10',
                           f'--config.data_dir={tmp_path / "tfds"}']),
  }
  before = {k: snapshot(w) for k, (w, _) in cases.items()}
  procs = {}
  for key, (workdir, args) in cases.items():
    devices = 3 if '3 devices' in key else 2
    procs[key] = subprocess.Popen(
        train_cmd(workdir, *args, host_devices=devices), env=env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for key, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2, (key, err[-2000:])
    assert len(lines) == 1, (key, err)
    assert lines[0].startswith('train.py: error: ') and key in lines[0], (
        key, lines)
    assert 'Traceback' not in err
    workdir = cases[key][0]
    assert snapshot(workdir) == before[key], key


# ---------------------------------------------------------------------------
# load_checkpoint for convert.py.


# Orbax's tensorstore threads complain after the corrupted read.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_load_checkpoint(tmp_path, reference_run):
  config, model, variables = checkpoints.load_checkpoint(str(reference_run))
  assert config.model == 'small' and config.levels == 4
  logits = model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False)
  assert logits.shape == (2, 10)

  with pytest.raises(checkpoints.CheckpointError, match='no workdir'):
    checkpoints.load_checkpoint(str(tmp_path / 'missing'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='config.json'):
    checkpoints.load_checkpoint(str(empty))
  shutil.copy(reference_run / 'config.json', empty / 'config.json')
  with pytest.raises(checkpoints.CheckpointError, match='no best checkpoint'):
    checkpoints.load_checkpoint(str(empty))

  # Another architecture's config over these checkpoints.
  other = tmp_path / 'other'
  shutil.copytree(reference_run, other)
  saved = json.loads((other / 'config.json').read_text())
  saved['model_kwargs']['hidden'] = 32
  (other / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(checkpoints.CheckpointError,
                     match='does not match the config') as e:
    checkpoints.load_checkpoint(str(other), which='latest')
  assert '\n' not in str(e.value)

  # Corrupt the stored arrays.
  broken = tmp_path / 'broken'
  shutil.copytree(reference_run, broken)
  for path in (broken / 'best').rglob('*'):
    if path.is_file() and 'variables' in str(path) and (
        'ocdbt' in path.name or path.parent.name == 'd'):
      path.write_bytes(b'garbage')
  with pytest.raises(checkpoints.CheckpointError, match='corrupted') as e:
    checkpoints.load_checkpoint(str(broken), which='best')
  assert '\n' not in str(e.value)


def test_a_new_run_starts_from_another_workdirs_best(tmp_path, reference_run):
  """init_from_workdir: the new run's first state holds the other run's best
  variables (not a fresh init), and the optimizer and step start at 0."""
  config = checkpoints.read_config(str(reference_run))
  config.init_from_workdir = str(reference_run)
  run = training.prepare(config, str(tmp_path / 'second'))
  manager = checkpoints.Manager(str(tmp_path / 'ckpt'), max_to_keep=1,
                                create=True)
  state, sums = training.restore_or_init(run, manager)
  manager.close()
  best = checkpoints.restore(str(reference_run), which='best').variables
  assert sums is None and int(jax.device_get(state.step)) == 0
  jax.tree.map(np.testing.assert_array_equal,
               {'params': state.params, 'batch_stats': state.batch_stats},
               jax.device_get(best))
  fresh = run.init_state()
  assert max_abs_diff(jax.device_get(fresh.params),
                      jax.device_get(best['params'])) > 0


def test_init_from_workdir_is_checked(tmp_path):
  config = load_config('default')
  config.init_from_workdir = str(tmp_path)  # no config.json there
  with pytest.raises(train_config.SettingsError,
                     match='not a train.py workdir'):
    train_config.validate_config(config)
  config.init_from_torch = str(Path(__file__))
  with pytest.raises(train_config.SettingsError, match='both set'):
    train_config.validate_config(config)

"""Conversion: convert.py end to end, its error contract, and the library on
mocked ImageNet.

The tiny checkpoint is trained in this process (Flax ``train_test.py`` style).
Subprocesses run only what is about the command line itself: the end-to-end
run and flag parsing. Bad settings, checkpoints and data go through the same
error path in-process (``cli.one_line_errors`` around ``conversion_job.convert``).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cos_jax
from cli_helpers import (convert_in_process, expect_usage_error,
                         run_script)
from configs import default as default_config
from cos_jax import checkpoints, conversion, ownership, plots, report, training
from cos_jax.data import pipeline


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny') / 'run')
  config = default_config.get_config()
  config.epochs = 1
  config.num_train_examples = 1024
  config.num_test_examples = 500
  config.batch_size = 128
  training.train_and_evaluate(config, workdir)
  return workdir


def test_convert_end_to_end(tiny_workdir, tmp_path):
  out = str(tmp_path / 'out')
  result = run_script('convert.py', '--workdir', tiny_workdir, '--rho', '4', '--T',
               '8', '--num_examples', '300', '--batch_size', '128',
               '--init', 'cos,half,random',
               '--output_dir', out, '--host_devices', '2')
  assert result.returncode == 0, result.stderr[-3000:]
  for name in report.FILES:
    assert os.path.getsize(os.path.join(out, name)) > 100
  with open(os.path.join(out, 'accuracy.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'results.json')) as f:
    doc = json.load(f)
  assert doc['examples'] == 300 and doc['devices'] == 2
  assert doc['config']['rho'] == 4 and doc['config']['T'] == 8
  # The histograms can be re-plotted from the JSON (str keys there).
  assert plots.offset_spike_figure(doc)[:8] == b'\x89PNG\r\n\x1a\n'
  # Calibrated methods are reported at T, the others up to T + ρ.
  assert len(doc['curves']['cos']) == 8
  assert len(doc['curves']['half']) == len(doc['curves']['random']) == 12
  for curve in doc['curves'].values():
    assert all(0 <= a <= 1 for a in curve)
  assert doc['table']['header'] == ['method', 'T=1', 'T=2', 'T=4', 'T=8']
  assert len(doc['table']['rows']) == 1 + 1 + 2 * 2
  layers = doc['layers']['after']
  # One entry per IF layer of the trained net (its activation slots).
  config, model, variables = checkpoints.load_checkpoint(tiny_workdir)
  assert len(layers) == len(jax.tree.leaves(cos_jax.init_v0(
      model, variables, np.zeros((1, 28, 28, 1), np.float32)))) >= 2
  for stats in layers.values():
    assert 0 <= stats['ratio'] <= 1 and stats['mse'] >= 0
    assert abs(sum(stats['histogram'].values()) - 1) < 1e-6
  with open(os.path.join(out, 'results.csv')) as f:
    assert len(f.read().strip().splitlines()) == 1 + 1 + 8 + 2 * 12
  assert 'ANN (QCFS)' in result.stdout and 'COS' in result.stdout
  assert 'ANN (ReLU)' not in result.stdout

  # Independent check in this process, on one device and another batch
  # size: the library's own accuracy of the same 300 images.
  batch = next(pipeline.make_dataset(config.dataset, 'test', batch_size=300,
                                     train=False, num_examples=300))
  labels = batch['label']
  ann = model.apply(variables, batch['image']).argmax(-1)
  assert doc['ann_accuracy'] == pytest.approx(np.mean(ann == labels))
  for init in ('cos', 'half'):
    steps = 8 if init == 'cos' else 12
    outputs = cos_jax.evaluate_snn(model, variables, batch['image'], T=steps,
                                   init=init, rho=4).outputs
    accuracy = [np.mean(np.asarray(outputs[:t].sum(0)).argmax(-1) == labels)
                for t in range(1, steps + 1)]
    # Allow one image of float-rounding difference across batchings.
    np.testing.assert_allclose(doc['curves'][init], accuracy, atol=1.01 / 300)


@pytest.mark.parametrize('fields, words', [
    ({'rho': 0}, ['--rho']),
    ({'rho': -3}, ['--rho']),
    ({'T': 0}, ['--T']),
    ({'iterations': 0}, ['--iterations']),
    ({'init': 'cos,best'}, ['--init', 'best']),
    ({'num_examples': 0}, ['--num_examples']),
    ({'time_chunk': -1}, ['--time_chunk']),
    ({'workdir': '/nonexistent/run'}, ['/nonexistent/run', 'train.py']),
])
def test_bad_settings_give_one_line_and_exit_2(tiny_workdir, tmp_path, capfd,
                                               fields, words):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.json').write_text('previous')
  (out / ownership.RESULTS_MARKER).write_text('')  # convert.py wrote it
  fields = {'workdir': tiny_workdir, 'output_dir': str(out), **fields}
  expect_usage_error(*reversed(convert_in_process(capfd, **fields)), *words)
  assert (out / 'results.json').read_text() == 'previous'
  assert sorted(os.listdir(out)) == [ownership.RESULTS_MARKER, 'results.json']


@pytest.mark.parametrize('args, words', [
    (['--rho', '1.5'], ['rho']),
    (['--bogus', '3'], ['bogus']),
    (['--config.bogus_field=3'], ['--config.bogus_field: no such']),
    (['extra'], ['unexpected arguments']),
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, args, words):
  out = tmp_path / 'out'
  result = run_script('convert.py', *args, '--output_dir', str(out))
  expect_usage_error(result.stderr, result.returncode, *words)
  assert not out.exists()


def _copy(workdir, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  return copy


def test_corrupted_checkpoint(tiny_workdir, tmp_path, capfd):
  workdir = _copy(tiny_workdir, tmp_path)
  # Damage every data file of the best checkpoint.
  for root, _, files in os.walk(os.path.join(workdir, 'best')):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and 'metadata' not in name:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 3)
  code, err = convert_in_process(capfd, workdir=workdir,
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, workdir)
  assert not os.path.exists(tmp_path / 'o')


def test_checkpoint_of_another_architecture(tiny_workdir, tmp_path, capfd):
  workdir = _copy(tiny_workdir, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['model'] = 'resnet20'
  with open(path, 'w') as f:
    json.dump(config, f)
  code, err = convert_in_process(capfd, workdir=workdir,
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, workdir)
  assert not os.path.exists(tmp_path / 'o')


def _tiny_mock_run(workdir, config_name, **overrides):
  """Trains one step of a config under TFDS mock data, in this process."""
  config = __import__(f'configs.{config_name}',
                      fromlist=['get_config']).get_config()
  config.epochs = 1
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_examples = 4
  config.num_test_examples = 4
  config.async_checkpointing = False
  for key, value in overrides.items():
    setattr(config, key, value)
  with tfds.testing.mock_data(num_examples=8):
    training.train_and_evaluate(config, workdir)
  return config


def test_dataset_not_available_offline(tmp_path, capfd, monkeypatch):
  workdir = str(tmp_path / 'c10')
  _tiny_mock_run(workdir, 'cifar10_resnet20', model='small')
  empty = tmp_path / 'tfds'
  empty.mkdir()
  monkeypatch.setenv('COS_JAX_OFFLINE', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', str(empty))
  code, err = convert_in_process(capfd, workdir=workdir, data_dir=str(empty),
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, 'cifar10')
  assert not os.path.exists(tmp_path / 'o')


def test_imagenet_conversion_on_mock_data(tmp_path):
  """The ImageNet path: 224x224 pipeline, a narrow ResNet-34 (full depth, 4-8
  channels, so CPU compile/run stay short), batches over devices."""
  workdir = str(tmp_path / 'imagenet')
  _tiny_mock_run(workdir, 'imagenet_resnet34', stem='imagenet',
                 model_kwargs={'stage_features': (4, 4, 8, 8)})
  config, model, variables = checkpoints.load_checkpoint(workdir)
  assert config.model == 'resnet34' and model.stem == 'imagenet'
  settings = conversion.ConversionSettings(
      calibration=cos_jax.Calibration(rho=2), T=2, methods=('cos',))
  with tfds.testing.mock_data(num_examples=6):
    batches = pipeline.make_dataset('imagenet2012', 'validation',
                                    batch_size=4, train=False, num_examples=6)
    result = conversion.convert_and_evaluate(model, variables, batches,
                                             settings)
  assert result['examples'] == 6          # 4 + a padded, masked batch of 2
  assert len(result['curves']['cos']) == 2
  assert len(result['layers']['after']) == 33
  first = next(iter(result['layers']['after'].values()))
  assert 0 <= first['ratio'] <= 1

"""cos_jax.interop against checkpoints written by the PyTorch reference itself.

Fixtures (tests/fixtures/torch/, each under 300 kB) were made once with real
PyTorch 2.13.0 (CPU) in a venv outside the project, running the model code of
hzc1208/ANN2SNN_COS at commit ecb3587cf7fad26d21ffb4d8bcdd415df6db0812
(``Models/VGG.py``, ``Models/ResNet.py``, ``modules.py``, ``utils.py``) from an
extracted copy of that repository::

  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  git -C <ANN2SNN_COS mirror> archive HEAD | tar -x -C /tmp/ref_cos
  cd /tmp/ref_cos && /tmp/torchvenv/bin/python <generator> tests/fixtures/torch

The generator (not committed: it imports the reference's code) did, per
fixture ``QCFS_<dataset>_<arch>_L<L>`` (their ``train_ann`` save name), with
seed = 1 (vgg16 CIFAR), 2 (resnet20), 3 (resnet18), 4 (resnet34), 5 (vgg16
ImageNet): ``torch.manual_seed(seed)`` (their constructors' own weight init),
then every other random number from one ``torch.Generator`` seeded with seed,
in this order:

1. Narrowing: while their ``vgg16(num_classes)`` / ``resnet20`` / ``resnet18``
   / ``resnet34`` constructor ran, the ``nn`` their module imported was
   replaced by torch.nn with subclasses of Conv2d/BatchNorm2d/Linear whose
   channel counts go through a map, so layer names, order and computation are
   theirs: VGG-16 CIFAR {64:4, 128:6, 256:8, 512:10, 4096:16}; VGG-16 ImageNet
   (num_classes=1000, so their 512·7·7 classifier) {64:2, 128:3, 256:4, 512:5,
   25088:245, 4096:8}; ResNet-20 {16:4, 32:6, 64:8}; ResNet-18/34
   {64:4, 128:6, 256:8, 512:10}. Then their ``replace_maxpool2d_by_avgpool2d``
   and ``replace_activation_by_floor(model, L)``.
2. Over ``model.modules()`` in order: every QCFS ``up`` (λ) ~ U[1, 8]; then
   every BN weight ~ λ/2·U[0.5, 1.5] and bias ~ λ·U[-0.25, 0.5] (λ of the
   activation after it), every Linear weight ×2 and every conv/linear bias ~
   U[-0.5, 0.5]. Running statistics: BN momentum None, three train-mode
   passes of 16 (ImageNet: 4) N(0, 1) images, momentum back to 0.1, eval
   mode. Then one more such batch, and each Linear feeding a QCFS, in order,
   rescaled per output feature so that its output on that batch has
   (unbiased) std λ/2 and mean λ·U[-0.25, 0.5].
3. ``torch.save(model.state_dict(), '<name>.pth')`` (float32).
4. Images: ``round(32·N(0, 1))`` clipped to int8 (``image_codes``, stored NHWC;
   the image is codes · ``image_scale`` = 1/32, exact in float64), 4 images on
   CIFAR, 2 at 224×224. ``logits``: ``model.double()`` on them (eval, QCFS).
5. VGG-16 and ResNet-20 only: their ``replace_activation_by_MPLayer(model,
   presim_len=4, sim_len=4, batchsize=B)`` (COS calibration, ρ = T = 4, one
   iteration) and one float64 forward pass with a forward hook on every
   MPLayer: ``spike_count_<k>`` (k in call order) = its output [T·B, ...]
   (time-major) / v_threshold, summed over the 4 steps (NHWC, uint8);
   ``snn_outputs`` = the final layer's outputs as [T, B, C].

No torch is needed to run these tests.
"""

import collections
import json
import io
import os
import pickle
import re
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import cos_jax
from cos_jax import interop
from cos_jax.checkpoints import CheckpointError

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'torch')
VGG_CIFAR = 'QCFS_CIFAR10_vgg16_L4'
RESNET20 = 'QCFS_CIFAR10_resnet20_L4'
# How each fixture was built (the generator's settings, not read from files).
FIXTURES = {
    VGG_CIFAR: dict(arch='vgg16', num_classes=10, levels=4, blocks=(
        (4, 4), (6, 6), (8, 8, 8), (10, 10, 10), (10, 10, 10)), hidden=16),
    RESNET20: dict(arch='resnet20', num_classes=10, levels=4,
                   stage_features=(4, 6, 8)),
    'QCFS_CIFAR100_resnet18_L4': dict(arch='resnet18', num_classes=100,
                                      levels=4, stage_features=(4, 6, 8, 10)),
    'QCFS_CIFAR10_resnet34_L4': dict(arch='resnet34', num_classes=10, levels=4,
                                     stage_features=(4, 6, 8, 10)),
    'QCFS_ImageNet_vgg16_L8': dict(arch='vgg16', num_classes=1000, levels=8,
                                   blocks=((2, 2), (3, 3), (4, 4, 4),
                                           (5, 5, 5), (5, 5, 5)), hidden=8),
}


def _path(name):
  return os.path.join(FIXTURE_DIR, name + '.pth')


def _reference(name):
  return dict(np.load(os.path.join(FIXTURE_DIR, name + '.npz')))


def _images(ref, dtype):
  return jnp.asarray(ref['image_codes'].astype(dtype) * ref['image_scale'])


def _load(name, source=None, **overrides):
  kwargs = {**FIXTURES[name], **overrides}
  return interop.load_torch_checkpoint(source or _path(name), **kwargs)


def _relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(CheckpointError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


# ------------------------------------------------ agreement with PyTorch --

@pytest.mark.parametrize('name', list(FIXTURES))
def test_ann_logits_match_pytorch_float64(name):
  ref = _reference(name)
  with jax.enable_x64(True):
    model, variables = _load(name)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {
        np.dtype(np.float64)}
    logits = jax.jit(model.apply)(variables, _images(ref, np.float64))
    assert _relative(logits, ref['logits']) <= 1e-9


@pytest.mark.parametrize('name', [RESNET20, 'QCFS_CIFAR100_resnet18_L4'])
def test_ann_logits_float32_shallow_nets(name):
  ref = _reference(name)
  model, variables = _load(name)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {
      np.dtype(np.float32)}
  logits = np.asarray(jax.jit(model.apply)(variables,
                                           _images(ref, np.float32)))
  assert logits.dtype == np.float32
  np.testing.assert_array_equal(logits.argmax(-1), ref['logits'].argmax(-1))
  assert _relative(logits, ref['logits']) <= 1e-3


def _layer_order(path):
  # Activation_k at the top level (VGG, the ResNet stem) come first, then
  # BasicBlock_k/Activation_j, by k then j: the order the layers run in.
  numbers = tuple(int(re.search(r'_(\d+)$', p)[1]) for p in path)
  return (len(path),) + numbers


@pytest.mark.parametrize('name', [VGG_CIFAR, RESNET20])
def test_cos_spike_counts_match_reference_snn(name):
  ref = _reference(name)
  with jax.enable_x64(True):
    model, variables = _load(name)
    run = cos_jax.evaluate_snn(model, variables, _images(ref, np.float64),
                               T=4, rho=4, record_steps=4)
  flat = traverse_util.flatten_dict(run.intermediates)
  ours = {path[:-1]: np.asarray(v[0]) for path, v in flat.items()
          if path[-1] == 'spike_count'}
  theirs = sorted(k for k in ref if k.startswith('spike_count_'))
  assert len(ours) == len(theirs) == (15 if 'vgg' in name else 19)
  for path, key in zip(sorted(ours, key=_layer_order), theirs):
    assert ours[path].shape == ref[key].shape, (path, key)
    agreement = np.mean(ours[path] == ref[key])
    assert agreement >= 0.999, (path, key, agreement)
  # For T <= ρ the two saturated-neuron rules agree exactly
  # (docs/semantics.md, "Saturated neurons"): same outputs too.
  np.testing.assert_allclose(run.outputs, ref['snn_outputs'], rtol=1e-9,
                             atol=1e-12)


@pytest.mark.parametrize('name', list(FIXTURES))
def test_inspect_reads_arch_classes_levels_and_widths(name):
  info = interop.inspect_torch_checkpoint(_path(name))
  expected = dict(FIXTURES[name])
  assert (info.arch, info.num_classes, info.levels) == (
      expected.pop('arch'), expected.pop('num_classes'), expected.pop('levels'))
  assert info.model_kwargs == expected


def test_full_width_resnet18_with_imagenet_stem():
  # The paper's widths, from the resnet18 fixture's keys with each channel
  # count mapped back (4, 6, 8, 10 -> 64, 128, 256, 512) and a 7x7 stem:
  # zero-cost broadcast arrays, only shapes matter here.
  full = {4: 64, 6: 128, 8: 256, 10: 512}
  state = interop.read_torch_state_dict(_path('QCFS_CIFAR100_resnet18_L4'))
  shapes = {k: tuple(full.get(n, n) if i < 2 else n
                     for i, n in enumerate(v.shape)) for k, v in state.items()}
  shapes['conv1.0.weight'] = (64, 3, 7, 7)
  shapes['fc.weight'] = (100, 512)
  synthetic = {k: np.broadcast_to(np.float32(0.5), s)
               for k, s in shapes.items()}
  info = interop.inspect_torch_checkpoint(synthetic)
  assert info == ('resnet18', 100, None, {'stem': 'imagenet'})
  model, variables = interop.load_torch_checkpoint(
      synthetic, arch='resnet18', num_classes=100, levels=8, stem='imagenet')
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, abstract)
  assert variables['params']['Conv_0']['kernel'].shape == (7, 7, 3, 64)


# ----------------------------------------------- state_dict conveniences --

def test_wrapped_dataparallel_and_mplayer_keys_load_the_same():
  state = interop.read_torch_state_dict(_path(RESNET20))
  renamed = {('module.' + k[:-len('.up')] + '.act.up' if k.endswith('.up')
              else 'module.' + k): v for k, v in state.items()}
  _, plain = _load(RESNET20)
  _, wrapped = _load(RESNET20, {'epoch': 7, 'state_dict': renamed})
  jax.tree.map(np.testing.assert_array_equal, wrapped, plain)


def test_params_land_in_zoo_layout():
  state = interop.read_torch_state_dict(_path(VGG_CIFAR))
  _, variables = _load(VGG_CIFAR)
  params = variables['params']
  np.testing.assert_array_equal(  # OIHW -> HWIO
      params['Conv_2']['kernel'][1, 2, 3, 5],
      state['layer2.0.weight'][5, 3, 1, 2])
  np.testing.assert_array_equal(params['Dense_2']['kernel'][7, 3],
                                state['classifier.7.weight'][3, 7])
  assert params['Activation_13']['threshold'] == state['classifier.2.up'][0]
  np.testing.assert_array_equal(variables['batch_stats']['BatchNorm_12']['var'],
                                state['layer5.9.running_var'])


# ---------------------------------------------------------------- errors --

class _Marker:
  """Pickles as a call of ``fn(*args)``: what a malicious file would do."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _torch_like_zip(path, pickled: bytes, storages=None):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', pickled)
    z.writestr('archive/byteorder', 'little')
    for key, data in (storages or {}).items():
      z.writestr(f'archive/data/{key}', data)


@pytest.mark.parametrize('call', ['os.system', 'builtins.exec', 'open'])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, call):
  marker = tmp_path / 'pwned'
  payload = {
      'os.system': _Marker(os.system, f'touch {marker}'),
      'builtins.exec': _Marker(exec, f'open({str(marker)!r}, "w").close()'),
      'open': _Marker(open, str(marker), 'w'),
  }[call]
  path = tmp_path / 'evil.pth'
  _torch_like_zip(path, pickle.dumps(collections.OrderedDict(w=payload)))
  message = _one_line_error(interop.load_torch_checkpoint, path,
                            arch='vgg16', num_classes=10, levels=4)
  assert 'refusing to load' in message
  assert call.split('.')[-1] in message
  assert not marker.exists()


class _FakeTorch:
  """Just enough of torch's module tree for ``pickle`` to write a torch.save
  style state_dict without PyTorch (globals are pickled by name)."""

  def __init__(self, monkeypatch):
    torch_mod = types.ModuleType('torch')
    utils_mod = types.ModuleType('torch._utils')

    def _rebuild_tensor_v2(*args):
      raise AssertionError('only pickled, never called')
    _rebuild_tensor_v2.__module__ = 'torch._utils'
    _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    self.storage_class = type('FloatStorage', (), {'__module__': 'torch'})
    torch_mod.FloatStorage = self.storage_class
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, 'torch', torch_mod)
    monkeypatch.setitem(sys.modules, 'torch._utils', utils_mod)
    self.rebuild = _rebuild_tensor_v2


def _dump_tensors(fake, tensors):
  """pickle bytes of ``{name: (storage key, offset, size, stride)}``."""
  class Storage:
    def __init__(self, key, numel):
      self.key, self.numel = key, numel

  class Tensor:
    def __init__(self, storage, offset, size, stride):
      self.args = (storage, offset, size, stride, False,
                   collections.OrderedDict())

    def __reduce__(self):
      return fake.rebuild, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ('storage', fake.storage_class, obj.key, 'cpu', obj.numel)
      return None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(collections.OrderedDict(
      (name, Tensor(Storage(key, numel), offset, size, stride))
      for name, (key, numel, offset, size, stride) in tensors.items()))
  return buffer.getvalue()


def test_reader_rebuilds_strided_views_like_numpy(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  storage = np.arange(24, dtype='<f4')
  pickled = _dump_tensors(fake, {
      'contiguous': ('0', 24, 0, (2, 3, 4), (12, 4, 1)),
      'transposed': ('0', 24, 1, (3, 2), (1, 12)),
      'scalar': ('0', 24, 5, (), ()),
  })
  path = tmp_path / 'views.pth'
  _torch_like_zip(path, pickled, {'0': storage.tobytes()})
  state = interop.read_torch_state_dict(path)
  np.testing.assert_array_equal(state['contiguous'], storage.reshape(2, 3, 4))
  np.testing.assert_array_equal(state['transposed'],
                                storage.reshape(2, 12)[:, 1:4].T)
  assert state['scalar'].shape == () and state['scalar'] == 5


def test_reader_refuses_a_view_past_its_storage(tmp_path, monkeypatch):
  fake = _FakeTorch(monkeypatch)
  pickled = _dump_tensors(fake, {'w': ('0', 4, 2, (4,), (1,))})
  path = tmp_path / 'overrun.pth'
  _torch_like_zip(path, pickled, {'0': np.zeros(4, '<f4').tobytes()})
  assert 'past its storage' in _one_line_error(
      interop.read_torch_state_dict, path)


def test_not_a_checkpoint(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint\n')
  assert 'not a PyTorch checkpoint' in _one_line_error(
      _load, VGG_CIFAR, text)
  empty_zip = tmp_path / 'empty.pth'
  zipfile.ZipFile(empty_zip, 'w').close()
  assert 'data.pkl' in _one_line_error(_load, VGG_CIFAR, empty_zip)
  assert 'no checkpoint file' in _one_line_error(
      _load, VGG_CIFAR, tmp_path / 'absent.pth')


def test_keys_of_no_zoo_architecture():
  state = {'features.0.weight': np.zeros((8, 3, 3, 3), np.float32)}
  message = _one_line_error(interop.inspect_torch_checkpoint, state)
  assert 'match none of' in message and "'features.0.weight'" in message


def test_wrong_arch_names_the_first_missing_key():
  message = _one_line_error(interop.load_torch_checkpoint, _path(RESNET20),
                            arch='vgg16', num_classes=10, levels=4)
  assert "no key 'layer1.0.weight'" in message
  assert "'conv1.0.weight'" in message and 'looks like resnet20' in message


def test_missing_and_extra_keys_are_named():
  state = interop.read_torch_state_dict(_path(VGG_CIFAR))
  missing = {k: v for k, v in state.items() if k != 'layer3.5.running_var'}
  assert "no key 'layer3.5.running_var'" in _one_line_error(
      _load, VGG_CIFAR, missing)
  extra = {**state, 'classifier.9.weight': np.zeros((3, 3), np.float32)}
  assert "unexpected key 'classifier.9.weight'" in _one_line_error(
      _load, VGG_CIFAR, extra)


def test_shape_mismatch_names_key_and_both_shapes():
  message = _one_line_error(_load, VGG_CIFAR, num_classes=100)
  assert "'classifier.7.weight'" in message
  assert '(10, 16)' in message and '(100, 16)' in message
  message = _one_line_error(_load, RESNET20, stage_features=(16, 32, 64))
  assert "'conv1.0.weight'" in message and '(4, 3, 3, 3)' in message


def test_use_torch_without_torch_is_a_clear_error():
  if _torch_installed():
    pytest.skip('PyTorch is installed here')
  with pytest.raises(ValueError, match='needs PyTorch'):
    _load(RESNET20, use_torch=True)


def _torch_installed():
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec('torch') is not None


# ---------------------------------------------------------------------------
# convert.py --torch_checkpoint and train.py fine-tuning (TFDS mock images).

def test_convert_runs_on_a_torch_checkpoint(tmp_path, capfd):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from cli_helpers import convert_in_process  # pylint: disable=import-outside-toplevel
  from cos_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  path = os.path.join(FIXTURE_DIR, 'QCFS_CIFAR10_resnet20_L4.pth')
  out = tmp_path / 'out'
  with tfds.testing.mock_data(num_examples=8):
    code, err = convert_in_process(capfd, torch_checkpoint=path, T=4, rho=4,
                                   num_examples=8, output_dir=str(out))
    batch = next(pipeline.make_dataset('cifar10', 'test', batch_size=8,
                                       train=False, num_examples=8))
  assert code == 0, err
  doc = json.loads((out / 'results.json').read_text())
  assert (doc['model'], doc['levels'], doc['dataset']) == ('resnet20', 4,
                                                           'cifar10')
  assert doc['checkpoint_step'] is None and not doc['checkpoint_verified']
  info = interop.inspect_torch_checkpoint(path)
  model, variables = interop.load_torch_checkpoint(
      path, arch='resnet20', num_classes=10, levels=4, **info.model_kwargs)
  ann = np.asarray(model.apply(variables, batch['image'])).argmax(-1)
  assert doc['ann_accuracy'] == pytest.approx(np.mean(ann == batch['label']))


def test_convert_asks_for_L_when_the_file_does_not_say(tmp_path, capfd):
  from cli_helpers import convert_in_process, expect_usage_error  # pylint: disable=import-outside-toplevel
  renamed = tmp_path / 'model.pth'
  renamed.write_bytes(open(os.path.join(
      FIXTURE_DIR, 'QCFS_CIFAR10_resnet20_L4.pth'), 'rb').read())
  code, err = convert_in_process(capfd, torch_checkpoint=str(renamed),
                                 output_dir=str(tmp_path / 'o'))
  expect_usage_error(err, code, '--levels')


def test_fine_tuning_starts_from_the_torch_weights(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from configs import paper  # pylint: disable=import-outside-toplevel
  from cos_jax import checkpoints, training  # pylint: disable=import-outside-toplevel
  path = os.path.join(FIXTURE_DIR, 'QCFS_CIFAR10_resnet20_L4.pth')
  config = paper.paper_config('cifar10', 'resnet20')
  config.model_kwargs = {'stage_features': (4, 6, 8)}
  config.init_from_torch = path
  config.update(batch_size=4, eval_batch_size=4, num_train_examples=8,
                num_test_examples=4, epochs=1, async_checkpointing=False)
  with tfds.testing.mock_data(num_examples=8):
    run = training.prepare(config, str(tmp_path / 'run'))
    manager = checkpoints.Manager(str(tmp_path / 'ckpt'), max_to_keep=1,
                                  create=True)
    state, sums = training.restore_or_init(run, manager)
    manager.close()
  _, expected = interop.load_torch_checkpoint(
      path, arch='resnet20', num_classes=10, levels=4,
      stage_features=(4, 6, 8))
  assert sums is None
  jax.tree.map(np.testing.assert_array_equal,
               {'params': state.params, 'batch_stats': state.batch_stats},
               expected)

"""Cost counting: fan-outs, synaptic operations, MACs and energy (cos_jax.cost).

Every expected count here comes from an independent derivation: loops over
kernel taps in NumPy, layer-shape loops for MACs, the Jacobian of the real
network (random weights) for fan-outs across the zoo, and spike trains read
off the SNN's activation outputs.
"""

import copy
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import (conversion, correction, cost, fanout, methods, plots,
                     report, runtime, snn)
from cos_jax.activation import Activation, SpikingConfig
from cos_jax.models.common import QCFSNet
from cos_jax.settings import Calibration, SettingsError
from configs import convert as convert_config
from model_helpers import random_variables

IMAGE = (7, 5, 2)  # odd and unequal sides: padding and axis order both show


class Toy(QCFSNet):
  """image -> conv 1x1 (4) -> BN -> IF -> conv 3x3 stride 2 pad 1 (6) ->
  IF -> dense (10). The IF layers see 7x5x4 and 4x3x6 neurons."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers = self.layers(train)
    x = layers.act(static_input=True)(layers.norm()(layers.conv(4, (1, 1))(
        x)))
    x = layers.act()(layers.conv(6, (3, 3), strides=2, padding=1)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def conv_fanout(size, out_size, kernel=3, stride=2, pad=1):
  """Per input index: output indices whose window holds it (tap loop)."""
  count = np.zeros(size, np.int64)
  for j in range(out_size):
    for k in range(kernel):
      i = j * stride + k - pad
      if 0 <= i < size:
        count[i] += 1
  return count


def toy_fanout():
  """The hand count: a spike of the 7x5x4 layer reaches 6 channels at every
  output position whose 3x3/2 window (padding 1) holds it; one of the 4x3x6
  layer reaches the 10 outputs."""
  rows, cols = conv_fanout(7, 4), conv_fanout(5, 3)
  return np.outer(rows, cols) * 6, np.full((4, 3), 10)


@pytest.fixture(scope='module')
def toy():
  model = Toy(num_classes=10, levels=4, threshold_init=1.0)
  images = jax.random.uniform(jax.random.key(0), (6,) + IMAGE)
  variables = random_variables(model, IMAGE)
  return model, variables, images


def test_toy_fanout_and_sops_by_hand(toy):
  model, variables, images = toy
  network = cost.analyse(model, variables, IMAGE)
  first, second = toy_fanout()
  assert (first[0, 0], first[2, 2], first[3, 2], first[3, 1]) == (6, 6, 12, 24)
  np.testing.assert_array_equal(network.fanout['Activation_0'], first)
  np.testing.assert_array_equal(network.fanout['Activation_1'], second)
  assert network.targets == {'Activation_0': ('Activation_1',),
                             'Activation_1': (fanout.OUTPUT,)}
  assert network.input_macs == 7 * 5 * 4 * 2
  assert network.ann_macs == {'Conv_0': 280, 'Conv_1': 4 * 3 * 6 * 9 * 4,
                              'Dense_0': 72 * 10}
  # Known spikes, masked rows, SOPs counted by NumPy from the full trains.
  rng = np.random.default_rng(0)
  steps, batch = 5, 4
  spikes = {'Activation_0': rng.random((steps, batch, 7, 5, 4)) < 0.3,
            'Activation_1': rng.random((steps, batch, 4, 3, 6)) < 0.3}
  mask = np.array([1, 0, 1, 1])
  intermediates = {k: {'step_spikes': (jnp.asarray(v.sum(-1), jnp.float32),)}
                   for k, v in spikes.items()}
  onehots = {k: jnp.asarray(o) for k, (o, _) in
             cost.fanout_classes(network).items()}
  counts = jax.jit(cost.class_counts)(intermediates, onehots, jnp.asarray(mask))
  summary = cost.summarize(network, [(3, {'half': jax.device_get(counts)})],
                           {'half': (methods.METHODS['half'], steps)},
                           model=cost.COST_MODELS['45nm'])
  assert summary['examples'] == 3
  assert summary['methods']['half']['sops_stderr'] is None  # one batch
  for layer, synapses in (('Activation_0', first), ('Activation_1', second)):
    per_step = np.einsum('tbhwc,b,hw->t', spikes[layer], mask, synapses)
    np.testing.assert_allclose(summary['methods']['half']['layers'][layer][
        'sops'], np.cumsum(per_step) / 3)
    rate = np.cumsum(np.einsum('tbhwc,b->t', spikes[layer], mask)) / (
        3 * spikes[layer][0, 0].size * np.arange(1, steps + 1))
    np.testing.assert_allclose(
        summary['methods']['half']['layers'][layer]['rate'], rate)
  total = sum(np.einsum('tbhwc,b,hw->', spikes[k], mask, f) for k, f in
              (('Activation_0', first), ('Activation_1', second))) / 3
  half = summary['methods']['half']
  assert half['sops'][-1] == pytest.approx(total)
  assert half['relative_energy'][-1] == pytest.approx(
      (4.6 * 280 + 0.9 * total) / (4.6 * (280 + 2592 + 720)))


def _activation_spikes(model, variables, images, v0, steps):
  """{layer: [steps, B, ...]} spike trains read off each Activation's output
  (s·θ, time folded sample-major) in a plain spiking apply."""
  _, state = snn.spiking(model, SpikingConfig(steps=steps)).apply(
      {**variables, 'v0': v0}, images, capture_intermediates=lambda m, name: (
          isinstance(m, Activation) and name == '__call__'), mutable=['intermediates'])
  flat = jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
  out = {}
  for path, value in flat:
    keys = [p.key for p in path if hasattr(p, 'key')]
    name = '/'.join(keys[:-1])
    theta = variables['params'][keys[0]]['threshold'] if len(keys) == 2 else (
        None)
    trains = value.reshape((images.shape[0], steps) + value.shape[1:])
    out[name] = np.moveaxis(np.asarray(trains / theta), 1, 0)
  return out


@pytest.mark.parametrize('method, calibration', [
    ('half', None),
    ('cos', Calibration(4, schedule='layerwise')),
    ('cos', Calibration(2, iterations=2, schedule='global'))])
def test_counted_steps_are_the_runs_spikes(toy, method, calibration):
  """step_spikes of a chunked run (T = 7, chunks of 3) match the spike trains
  of the same network simulated plainly from the run's v0; the global
  schedule's probe passes come first."""
  model, variables, images = toy
  method = methods.METHODS[method].bind(calibration)
  run = snn.run_method(model, variables, images, None, T=7, method=method,
                       time_chunk=3, count_steps=True)
  probe, main = method.counted(7)
  trains = _activation_spikes(model, variables, images, run.v0, main)
  for layer, train in trains.items():
    counted = np.asarray(run.intermediates[layer]['step_spikes'][0])
    assert counted.shape == (probe + main, 6) + train.shape[2:-1]
    np.testing.assert_array_equal(counted[probe:], train.sum(-1))
    if probe:  # the first global pass runs from θ/2: the baseline's start
      start = _activation_spikes(model, variables, images, cos_jax.init_v0(
          model, variables, images), 2)[layer]
      np.testing.assert_array_equal(counted[:2], start.sum(-1))


def test_ann_macs_match_the_published_counts():
  """ResNet-20 (about 41 M MACs) and VGG-16 (313 M in its convs) at 32x32,
  against a loop over the layer shapes."""
  def resnet20():
    total, cin, size = 32 * 32 * 16 * 9 * 3, 16, 32
    for stage, cout in enumerate((16, 32, 64)):
      for block in range(3):
        stride = 2 if stage and not block else 1
        size //= stride
        total += size * size * cout * 9 * (cin + cout)
        if stride == 2:
          total += size * size * cout * cin
        cin = cout
    return total + 64 * 10

  def vgg16_convs():
    total, cin, size = 0, 3, 32
    for block in ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3):
      for cout in block:
        total, cin = total + size * size * cout * 9 * cin, cout
      size //= 2
    return total

  image = (32, 32, 3)
  for name, expected, published in (('resnet20', resnet20(), 41e6),
                                    ('vgg16', vgg16_convs(), 313e6)):
    model = cos_jax.models.get(name, num_classes=10, levels=4)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1,) + image))
    macs = cost.ann_macs(model, variables, image)
    counted = sum(macs.values())
    if name == 'vgg16':
      counted -= sum(v for k, v in macs.items() if k.startswith('Dense'))
      assert sum(v for k, v in macs.items() if k.startswith('Dense')) == (
          512 * 4096 + 4096 * 4096 + 4096 * 10)
    assert counted == expected
    assert abs(counted - published) / published < 0.01


def _jacobian_fanouts(model, variables, image_shape, shapes):
  """Oracle: per neuron of each IF layer in ``shapes``, the nonzero entries
  of the Jacobian of every IF layer's input and the logits with respect to
  its output (the real network, random weights; IF layers output what
  they are given, whatever their input)."""
  def targets(outputs):
    inputs = []
    def intercept(next_fun, args, kwargs, context):
      if isinstance(context.module, Activation):
        inputs.append(args[0].reshape(-1))
        name = '/'.join(context.module.path)
        return outputs[name][None] if name in outputs else jnp.zeros_like(
            args[0])
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(intercept):
      logits = model.apply(variables, jnp.zeros((1,) + image_shape))
    return jnp.concatenate(inputs + [logits.reshape(-1)])
  jacobians = jax.jit(jax.jacfwd(targets))(
      {name: jnp.zeros(shape) for name, shape in shapes.items()})
  return {name: np.asarray((j != 0).sum(0)) for name, j in jacobians.items()}


@pytest.mark.parametrize('name, kwargs, image, layers', [
    ('small', {'stages': ((2,), (3, 3), (4,)), 'hidden': 5}, (28, 28, 1),
     ('Activation_0', 'Activation_3', 'Activation_4')),
    ('vgg16', {'blocks': ((2, 2), (2, 2), (2, 2, 2), (3, 3, 3), (3, 3, 3)),
               'hidden': 6}, (32, 32, 3), ('Activation_1', 'Activation_12')),
    ('resnet20', {'stage_features': (2, 3, 4)}, (16, 16, 3),
     ('BasicBlock_2/Activation_1', 'BasicBlock_8/Activation_1')),
    ('resnet18', {'stage_features': (2, 2, 3, 3), 'stem': 'imagenet'},
     (28, 28, 3), ('Activation_0', 'BasicBlock_3/Activation_1')),
    ('resnet34', {'stage_features': (2, 2, 3, 3)}, (8, 8, 3),
     ('Activation_0', 'BasicBlock_6/Activation_1')),
])
def test_zoo_fanouts_match_the_jacobian(name, kwargs, image, layers):
  """Across the zoo: stride-2 convs and 1x1 shortcuts, identity shortcuts,
  the ImageNet stem's overlapping 3x3/2 pool (a neuron reaches some outputs
  through two windows: counted once), VALID pools that drop a row, flatten
  and global mean before dense layers."""
  model = cos_jax.models.get(name, num_classes=7, levels=4, **kwargs)
  variables = random_variables(model, image)
  network = cost.analyse(model, variables, image)
  assert network.depth == len(network.layers)  # every IF layer is on a chain
  sown = jax.eval_shape(lambda: model.apply(
      variables, jnp.zeros((1,) + image), mutable=['intermediates'])
  )[1]['intermediates']
  shapes = {}
  for layer in layers:
    shape = sown
    for key in layer.split('/'):
      shape = shape[key]
    shapes[layer] = shape['ann_output'][0].shape[1:]
  for layer, oracle in _jacobian_fanouts(model, variables, image,
                                         shapes).items():
    np.testing.assert_array_equal(
        oracle, np.broadcast_to(network.fanout[layer][..., None],
                                shapes[layer]), err_msg=layer)


def _sharded_counts(model, variables, images, onehots, devices):
  mesh = runtime.make_mesh(jax.devices()[:devices])
  replicated, sharding = runtime.shardings(mesh)
  batch = runtime.to_global(runtime.pad_batch(
      {'image': np.asarray(images), 'label': np.zeros(len(images), np.int32)},
      -(-len(images) // devices) * devices), sharding)
  return conversion._snn_correct(  # pylint: disable=protected-access
      model, jax.device_put(variables, replicated), batch['image'],
      batch['label'], batch['mask'], None,
      jax.device_put(onehots, replicated),
      method=methods.METHODS['cos'].bind(Calibration(2)), T=3,
      time_chunk=2)[1]


def test_counts_identical_on_1_2_and_4_devices(toy):
  model, variables, images = toy
  images = jnp.concatenate([images, images[:1]])  # 7 rows: 4 devices pad 1
  network = cost.analyse(model, variables, IMAGE)
  onehots = {k: o for k, (o, _) in cost.fanout_classes(network).items()}
  counts = [jax.tree.map(np.asarray, _sharded_counts(
      model, variables, images, onehots, n)) for n in (1, 2, 4)]
  assert counts[0]['Activation_0'].sum() > 0
  for other in counts[1:]:
    jax.tree.map(np.testing.assert_array_equal, counts[0], other)


def _settings(**fields):
  config = convert_config.get_config()
  config.update({**dict(rho=4, T=2, init='cos,half', time_chunk=2),
                 **fields})
  return conversion.ConversionSettings.from_config(config)


def _without_spread(costs: dict) -> dict:
  """A cost summary less what depends on the batching (batches, errors)."""
  costs = copy.deepcopy(costs)
  del costs['batches']
  for method in costs['methods'].values():
    del method['sops_stderr']
  return costs


def test_convert_and_evaluate_counts_without_padding_rows(toy):
  """The same 6 images as one batch on 4 devices (2 padding rows) and in
  batches of 4 + 2 on one device give the same costs; the result holds the
  layerwise deployment latency and the report's tables and files."""
  model, variables, images = toy
  labels = np.arange(6) % 10
  settings = _settings()
  batches = lambda *sizes: [
      {'image': np.asarray(images[a:b]), 'label': labels[a:b]}
      for a, b in itertools.pairwise(np.cumsum((0,) + sizes))]
  padded = conversion.convert_and_evaluate(
      model, variables, batches(6), settings,
      mesh=runtime.make_mesh(jax.devices()[:4]))
  plain = conversion.convert_and_evaluate(
      model, variables, batches(4, 2), settings,
      mesh=runtime.make_mesh(jax.devices()[:1]))
  assert _without_spread(padded['cost']) == _without_spread(plain['cost'])
  assert (padded['cost']['batches'], plain['cost']['batches']) == (1, 2)
  cos, half = padded['cost']['methods']['cos'], padded['cost']['methods'][
      'half']
  assert len(cos['sops']) == 2 and len(half['sops']) == 2 + 4
  # ρ = 4 > T: the fused run's 4 steps are what it costs at T = 1 and 2; as
  # deployed, the last IF layer emits only T steps into the output.
  layers = cos['layers']
  assert cos['sops'][0] == cos['sops'][1] >= sum(
      layers[k]['sops'][0] for k in layers)
  assert cos['deployment']['latency'] == [2 * 4 + 1, 2 * 4 + 2]
  deployed, last = cos['deployment']['sops'], layers['Activation_1']['sops']
  assert deployed[1] - deployed[0] == pytest.approx(last[1] - last[0])
  assert deployed[0] < cos['sops'][0] and deployed[1] <= cos['sops'][1]
  assert half['deployment']['sops'] == half['sops']
  assert 'energy relative to the ANN' in report.format_costs(padded, settings)
  assert 'Activation_1' in report.format_cost_layers(padded, settings)
  assert plots.accuracy_energy_figure(padded, settings)[:4] == b'\x89PNG'
  csv_rows = report._csv(padded).splitlines()  # pylint: disable=protected-access
  assert csv_rows[0].endswith('latency_steps') and len(csv_rows) == 2 + 2 + 6


def test_cost_model_setting():
  assert _settings().cost_model == '45nm'
  assert _settings(cost_model='77fj').cost_model == '77fj'
  assert _settings(cost_model='none').cost_model is None
  with pytest.raises(SettingsError, match='cost_model') as error:
    _settings(cost_model='7nm')
  assert error.value.field == 'cost_model'


def test_cost_examples_counts_the_first_batches_with_their_spread(toy):
  """cost_examples=3 over batches of 2 counts the first two batches: the same
  costs as a run over only those images, and a standard error that matches
  the ratio-estimator formula over the two batches' own costs."""
  model, variables, images = toy
  labels = np.arange(6) % 10
  batches = lambda a, b: [
      {'image': np.asarray(images[i:i + 2]), 'label': labels[i:i + 2]}
      for i in range(a, b, 2)]
  mesh = runtime.make_mesh(jax.devices()[:1])
  run = lambda parts, **fields: conversion.convert_and_evaluate(
      model, variables, parts, _settings(**fields), mesh=mesh)['cost']
  sampled = run(batches(0, 6), cost_examples=3)
  assert (sampled['examples'], sampled['batches']) == (4, 2)
  assert _without_spread(sampled) == _without_spread(
      run(batches(0, 4), cost_examples=0))
  for name, method in sampled['methods'].items():
    each = np.array([run(batches(i, i + 2))['methods'][name]['sops']
                     for i in (0, 2)])
    mean = each.mean(0)
    np.testing.assert_allclose(method['sops'], mean)
    expected = np.sqrt(2 * np.sum((2 * (each - mean)) ** 2, 0)) / 4
    np.testing.assert_allclose(method['sops_stderr'], expected)
    assert max(expected) > 0


def test_cost_examples_setting():
  assert _settings().cost_examples == cost.DEFAULT_COST_EXAMPLES
  assert _settings(cost_examples=0).cost_examples is None
  assert _settings(cost_examples=5).cost_examples == 5
  with pytest.raises(SettingsError, match='cost_examples'):
    _settings(cost_examples=-1)


@pytest.mark.parametrize('schedule, names, T', [
    ('layerwise', 'cos,half,zero,random,lightweight', 2),
    ('global', 'cos,half,zero,random,lightweight', 2),
    ('layerwise', 'half,srp,pc,bc', 1)])
def test_every_method_is_counted_as_its_own_run_spikes(toy, schedule, names,
                                                      T):
  """convert_and_evaluate counts the methods that run from their v0 with one
  program over the longest run (T + ρ = 6 steps here), from the v0 each run
  returned or its rule; the costs equal those of each method's own counting
  run (checked against plain spike trains in
  test_counted_steps_are_the_runs_spikes)."""
  model, variables, images = toy
  settings = _settings(init=names, schedule=schedule, T=T)
  mesh = runtime.make_mesh(jax.devices()[:1])
  calibration = images[::-1] * 0.9  # stands for training images
  result = conversion.convert_and_evaluate(
      model, variables, [{'image': np.asarray(images),
                          'label': np.arange(6) % 10}], settings, mesh=mesh,
      calibration_images=calibration)
  network = cost.analyse(model, variables, IMAGE)
  onehots = {k: o for k, (o, _) in cost.fanout_classes(network).items()}
  _, batch_key = jax.random.split(jax.random.key(settings.seed))
  runs = settings.runs()
  own = {name: runtime.to_host(conversion._snn_correct(  # pylint: disable=protected-access
      model, variables, images, np.arange(6) % 10, np.ones(6, np.int32),
      batch_key, onehots, correction.measure(
          model, variables, calibration, method=method, T=T,
          time_chunk=settings.time_chunk) if method.corrected else None,
      method=method, T=T, time_chunk=settings.time_chunk)[1])
         for name, (method, T) in runs.items()}
  expected = cost.summarize(network, [(6, own)], runs,
                            cost.COST_MODELS[settings.cost_model])
  assert _without_spread(result['cost']) == _without_spread(expected)
  assert len(set(str(m['sops']) for m in expected['methods'].values())) == (
      len(settings.methods))
  if 'srp' in names:
    # SRP counts its τ = 4 pre-simulation steps on top of its T; pc and bc
    # have one run per reported T (here T = 1).
    srp, half = expected['methods']['srp'], expected['methods']['half']
    assert srp['deployment']['latency'] == [5]
    assert srp['sops'][0] > half['sops'][0]
    assert [len(result['curves'][n]) for n in ('pc', 'bc')] == [1, 1]

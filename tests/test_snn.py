"""Model zoo and network-level SNN: one parameter tree, two worlds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import cos_jax
from cos_jax import analysis


def data_init(model, images, seed=1):
  """Random weights with BN running stats set to this batch's statistics.

  Makes every layer's pre-activation roughly unit-variance, so a random net
  has realistic firing (about 20% of neurons active per step) instead of a
  silent one.
  """
  variables = model.init(jax.random.key(seed), images)
  _, state = model.apply(variables, images, train=True,
                         mutable=['batch_stats'])
  # One train-mode step sets running = 0.9·old + 0.1·batch; solve for batch.
  batch_stats = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1,
                             state['batch_stats'], variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': batch_stats}


@pytest.fixture(scope='module')
def small():
  model = cos_jax.models.get('small', num_classes=10, levels=4,
                             threshold_init=2.0)
  images = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
  return model, data_init(model, images), images


# ------------------------------------------------------------------ the zoo

def _param_count(model, shape):
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      variables['params']))


def _resnet_cifar_count(stage_sizes, widths, classes):
  """Independent count: conv weights + BN (scale, bias) + head + thresholds."""
  conv_bn = lambda k, cin, cout: k * k * cin * cout + 2 * cout
  total, cin, acts = conv_bn(3, 3, widths[0]), widths[0], 1
  for stage, (blocks, cout) in enumerate(zip(stage_sizes, widths)):
    for block in range(blocks):
      total += conv_bn(3, cin, cout) + conv_bn(3, cout, cout)
      if stage > 0 and block == 0:
        total += conv_bn(1, cin, cout)
      cin, acts = cout, acts + 2
  return total + cin * classes + classes + acts


@pytest.mark.parametrize('name, expected', [
    # PyTorch CIFAR reference counts (kuangliu/pytorch-cifar layouts, same
    # stems and 1x1 conv+BN shortcuts) plus one threshold per activation.
    ('resnet18', 11_173_962 + 17),
    ('resnet34', 21_282_122 + 33),
    # VGG-16 convs with bias+BN (14,723,136) + 512-4096-4096-10 classifier.
    ('vgg16', 14_723_136 + 18_923_530 + 15),
    ('resnet20', _resnet_cifar_count((3, 3, 3), (16, 32, 64), 10)),
])
def test_cifar_parameter_counts(name, expected):
  model = cos_jax.models.get(name, num_classes=10, levels=4)
  assert _param_count(model, (1, 32, 32, 3)) == expected


def test_resnet18_count_formula_agrees_with_reference_number():
  # Guards the independent formula used for ResNet-20 above.
  assert _resnet_cifar_count((2, 2, 2, 2), (64, 128, 256, 512), 10) == (
      11_173_962 + 17)


def test_get_rejects_bad_names_and_levels():
  with pytest.raises(ValueError, match='unknown architecture'):
    cos_jax.models.get('alexnet', num_classes=10, levels=4)
  with pytest.raises(ValueError, match='levels'):
    cos_jax.models.get('small', num_classes=10, levels=0)


@pytest.mark.parametrize('name, shape, kwargs', [
    ('small', (2, 28, 28, 1), {}),
    ('vgg16', (2, 32, 32, 3), {}),
    ('resnet18', (2, 32, 32, 3), {'stem': 'imagenet'}),
    ('resnet20', (2, 16, 16, 3), {}),
    ('resnet34', (2, 16, 16, 3), {}),
])
def test_every_model_runs_as_ann_and_snn(name, shape, kwargs):
  model = cos_jax.models.get(name, num_classes=7, levels=4, **kwargs)
  images = jax.random.normal(jax.random.key(0), shape)
  variables = model.init(jax.random.key(1), images)
  logits = model.apply(variables, images)
  run = cos_jax.evaluate_snn(model, variables, images, T=3, rho=2)
  assert logits.shape == (2, 7) and run.outputs.shape == (3, 2, 7)
  assert np.all(np.isfinite(run.outputs))
  n_acts = sum(1 for path in jax.tree_util.tree_flatten_with_path(
      variables['params'])[0] if path[0][-1].key == 'threshold')
  assert len(jax.tree.leaves(run.v0)) == n_acts


# ------------------------------------------------------- v0 and inits

def test_init_v0_is_half_threshold_per_sample_and_layer(small):
  model, variables, images = small
  v0 = cos_jax.init_v0(model, variables, images)
  flat = jax.tree_util.tree_flatten_with_path(v0)[0]
  assert len(flat) == 5
  first = v0['Activation_0']['v0']
  assert first.shape == (16, 28, 28, 32)
  theta = variables['params']['Activation_0']['threshold']
  np.testing.assert_allclose(first, theta / 2)
  assert v0['Activation_4']['v0'].shape == (16, 256)


def test_default_v0_is_the_qcfs_baseline(small):
  model, variables, images = small
  v0 = cos_jax.init_v0(model, variables, images)
  np.testing.assert_array_equal(
      cos_jax.simulate(model, variables, images, T=4),
      cos_jax.simulate(model, variables, images, v0, T=4))
  np.testing.assert_array_equal(
      cos_jax.simulate(model, variables, images, T=4),
      cos_jax.evaluate_snn(model, variables, images, T=4, init='half').outputs)


def test_comparison_inits(small):
  model, variables, images = small
  zero = cos_jax.evaluate_snn(model, variables, images, T=2, init='zero').v0
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(zero))
  rand = cos_jax.evaluate_snn(model, variables, images, T=2, init='random',
                              key=jax.random.key(3)).v0
  theta = variables['params']['Activation_1']['threshold']
  leaf = rand['Activation_1']['v0']
  assert float(leaf.min()) >= 0 and float(leaf.max()) < theta
  assert float(leaf.std()) > 0.2 * theta  # spread over [0, θ), not constant
  with pytest.raises(ValueError, match='key'):
    cos_jax.evaluate_snn(model, variables, images, T=2, init='random')


def test_lightweight_v0_is_the_probe_residual(small):
  """v0 ← v(ρ): on the first layer (static input) we can recompute it."""
  model, variables, images = small
  rho = 3
  light = cos_jax.evaluate_snn(model, variables, images, T=2, rho=rho,
                               init='lightweight').v0['Activation_0']['v0']
  # First-layer current: the ANN's pre-activation, via a capture of its input.
  _, state = model.apply(variables, images, capture_intermediates=(
      lambda mdl, name: type(mdl).__name__ == 'BatchNorm'),
                         mutable=['intermediates'])
  current = state['intermediates']['BatchNorm_0']['__call__'][0]
  theta = variables['params']['Activation_0']['threshold']
  expected = cos_jax.probe(jnp.broadcast_to(current, (rho,) + current.shape),
                           theta).v
  np.testing.assert_allclose(light, expected, atol=1e-5)


# ------------------------------------------------ calibration behaviour

def test_calibration_ratio_rises_to_exact_with_iterations(small):
  """ρ = L = T, each layer judged on the SNN's actual input (constrained)."""
  model, variables, images = small
  ratios, mses = [], []
  for init, iterations in (('half', 1), ('cos', 1), ('cos', 2), ('cos', 4)):
    stats, _ = analysis.layer_statistics(model, variables, images, T=4,
                                         init=init, rho=4,
                                         iterations=iterations)
    final = analysis.finalize(analysis.accumulate(None, stats), T=4)
    # Activation_0 gets the exact static input: ψ = 0 from θ/2 already.
    assert final['Activation_0']['ratio_constrained'] == 1.0
    ratios.append([r['ratio_constrained'] for r in final.values()])
    mses.append([r['mse_constrained'] for r in final.values()])
  ratios, mses = np.array(ratios), np.array(mses)
  assert ratios[0].min() < 0.95          # the baseline really has offsets
  assert np.all(np.diff(ratios, axis=0) >= -1e-4)
  assert np.all(np.diff(mses, axis=0) <= 1e-6)
  assert ratios[1:].min() >= 0.99
  assert ratios[-1].min() == 1.0


def test_fused_equals_simulate_of_calibrate_including_rho_above_T(small):
  model, variables, images = small
  for rho, T, schedule in ((4, 8, 'layerwise'), (8, 4, 'layerwise'),
                           (4, 4, 'global')):
    run = cos_jax.evaluate_snn(model, variables, images, T=T, rho=rho,
                               iterations=2, schedule=schedule)
    v0 = cos_jax.calibrate(model, variables, images, rho=rho, iterations=2,
                           schedule=schedule)
    outputs = cos_jax.simulate(model, variables, images, v0, T=T)
    assert run.outputs.shape == (T, 16, 10)
    np.testing.assert_allclose(run.outputs, outputs, rtol=1e-5, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
                 run.v0, v0)


def test_time_chunks_do_not_change_the_run(small):
  """Carrying membrane potentials across time chunks reproduces one long run,
  including chunks shorter than ρ, a remainder chunk and recorded steps."""
  model, variables, images = small
  whole = cos_jax.simulate(model, variables, images, T=11, time_chunk=None)
  for chunk in (1, 3, 8):
    np.testing.assert_allclose(
        cos_jax.simulate(model, variables, images, T=11, time_chunk=chunk),
        whole, rtol=1e-5, atol=1e-5)
  for init in ('cos', 'lightweight', 'half'):
    runs = [cos_jax.evaluate_snn(model, variables, images, T=10, rho=4,
                                 init=init, record_steps=5, time_chunk=chunk)
            for chunk in (None, 3)]
    np.testing.assert_allclose(runs[1].outputs, runs[0].outputs, rtol=1e-5,
                               atol=1e-5)
    for a, b in ((runs[1].v0, runs[0].v0),
                 (runs[1].intermediates, runs[0].intermediates)):
      jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
                   a, b)
  with pytest.raises(ValueError, match='time_chunk'):
    cos_jax.simulate(model, variables, images, T=4, time_chunk=0)


def test_one_step_from_half_threshold_is_the_binary_ann(small):
  """At T = 1 from θ/2 a neuron fires iff I ≥ θ/2, i.e. floor(I/θ + 1/2) ≥ 1:
  the SNN equals the same network as a QCFS ANN with L = 1 (an independent
  path: no scan, no time folding). This is what bounds every method at T = 1."""
  model, variables, images = small
  binary_ann = model.clone(levels=1).apply(variables, images)
  np.testing.assert_allclose(cos_jax.simulate(model, variables, images, T=1)[0],
                             binary_ann, rtol=1e-4, atol=1e-4)
  # And it is not the L = 4 ANN, so the comparison can fail.
  assert not np.allclose(binary_ann, model.apply(variables, images), atol=1e-2)


def test_calibration_changes_v0_and_global_differs_from_layerwise(small):
  model, variables, images = small
  half = cos_jax.init_v0(model, variables, images)
  layerwise = cos_jax.calibrate(model, variables, images, rho=4)
  global_ = cos_jax.calibrate(model, variables, images, rho=4,
                              schedule='global')
  moved = lambda a: sum(float(jnp.mean(x != y)) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(half)))
  assert moved(layerwise) > 0.01 and moved(global_) > 0.01
  # Layer 1 sees the same (static) input in both schedules.
  np.testing.assert_array_equal(layerwise['Activation_0']['v0'],
                                global_['Activation_0']['v0'])


def test_large_T_snn_mean_output_approaches_ann():
  model = cos_jax.models.get('small', num_classes=10, levels=32,
                             threshold_init=3.0)
  images = jax.random.normal(jax.random.key(5), (8, 28, 28, 1))
  variables = data_init(model, images)
  ann = model.apply(variables, images)
  errors = []
  for T in (8, 64, 256):
    mean = cos_jax.simulate(model, variables, images, T=T).mean(0)
    errors.append(float(jnp.linalg.norm(mean - ann) / jnp.linalg.norm(ann)))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.1


def test_samples_are_independent_of_batch_composition(small):
  """No batch-size guessing: a 3-image batch gives the same per-sample result
  as the same images inside the full batch (the reference's small-last-batch
  bug), for T = 1 too, where T·B = B."""
  model, variables, images = small
  for T in (1, 4):
    full = cos_jax.evaluate_snn(model, variables, images, T=T, rho=4).outputs
    part = cos_jax.evaluate_snn(model, variables, images[:3], T=T,
                                rho=4).outputs
    np.testing.assert_allclose(part, full[:, :3], rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors(small):
  model, variables, images = small
  with pytest.raises(ValueError, match='rho'):
    cos_jax.calibrate(model, variables, images, rho=0)
  with pytest.raises(ValueError, match='T must'):
    cos_jax.simulate(model, variables, images, T=0)
  with pytest.raises(ValueError, match='schedule'):
    cos_jax.calibrate(model, variables, images, rho=2, schedule='online')
  with pytest.raises(ValueError, match='init'):
    cos_jax.evaluate_snn(model, variables, images, T=2, init='best')


# ------------------------------------------------------------ devices

@pytest.mark.parametrize('devices', [2, 4])
def test_sharded_and_pmap_match_single_device(small, devices):
  model, variables, images = small
  images = images[:8]
  single_v0 = cos_jax.calibrate(model, variables, images, rho=4)
  single = cos_jax.simulate(model, variables, images, single_v0, T=4)

  mesh = Mesh(np.array(jax.devices()[:devices]), ('data',))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  sharded_v0 = cos_jax.calibrate(model, replicated, sharded_images, rho=4)
  sharded = cos_jax.simulate(model, replicated, sharded_images, sharded_v0,
                             T=4)
  assert len(sharded.sharding.device_set) == devices

  def per_device(x):
    v0 = cos_jax.calibrate(model, variables, x, rho=4)
    return cos_jax.simulate(model, variables, x, v0, T=4)
  split = images.reshape((devices, -1) + images.shape[1:])
  pmapped = jax.pmap(per_device, devices=jax.devices()[:devices])(split)
  pmapped = jnp.moveaxis(pmapped, 0, 1).reshape(single.shape)

  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pmapped, single, rtol=1e-5, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
               sharded_v0, single_v0)

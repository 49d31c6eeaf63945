"""The rival methods against independent re-derivations, in float64.

* SRP: the authors' MPLayer (hzc1208/ANN2SNN_SRP, ``modules.py``) stepped the
  way their ``mp_test`` steps it: the whole network called once per time-step,
  each IF layer a stateful NumPy neuron in units of θ (``x / θ``, fire at
  ``v ≥ 1``, soft reset, v(0) = 0.5 by one 0.5 input, mask ``v > 1e-3`` after
  step τ, reset to 0.5, outputs masked after τ). Only the network's linear
  layers are shared with cos_jax (the ANN's own modules, with every
  Activation intercepted): no time folding, chunks, scans or collections.
* pc and bc: the formulas of yhhhli/SNN_Calibration ``emp_bias_corr``
  computed directly in NumPy on a net of dense layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import conversion, correction, methods
from cos_jax.activation import Activation
from cos_jax.models.common import QCFSNet
from cos_jax.settings import SettingsError
from configs import convert as convert_config


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


class DenseToy(QCFSNet):
  """[B, 3, 4] -> dense 5 -> IF -> dense 6 -> IF -> flatten -> dense C. The
  IF layers have a spatial axis of 3, so per-channel means span space."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = self.layers(train).act
    x = act(static_input=True)(nn.Dense(5)(x))
    x = act()(nn.Dense(6)(x))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _toy(seed=0, batch=7):
  model = DenseToy(num_classes=3, levels=4, threshold_init=1.0)
  images = jax.random.normal(jax.random.key(seed), (batch, 3, 4), jnp.float64)
  variables = model.init(jax.random.key(seed + 1), images)
  return model, _float64(variables), images


def _zoo(name, size=16, **kwargs):
  from test_snn import data_init  # pylint: disable=g-import-not-at-top
  model = cos_jax.models.get(name, num_classes=5, levels=4,
                             threshold_init=2.0, **kwargs)
  images = jax.random.normal(jax.random.key(0), (3, size, size, 3))
  return model, _float64(data_init(model, images)), jnp.asarray(
      images, jnp.float64)


def authors_srp(model, variables, images, tau, T):
  """[T, B, C]: the network's outputs at steps τ+1..τ+T of the authors'
  MPLayer, stepped as their mp_test does (module docstring)."""
  neurons = {}

  def mp_layer(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, Activation)
            and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    theta = float(module.get_variable('params', 'threshold'))
    x = np.asarray(args[0], np.float64) / theta
    state = neurons.setdefault(module.scope.path, {'t': 0})
    if state['t'] == 0:
      state['v'] = np.zeros_like(x) + 0.5      # neuron(0.5) from v = 0
    u = state['v'] + x
    spike = (u >= 1.0).astype(np.float64)
    state['v'] = u - spike
    state['t'] += 1
    if state['t'] == tau:
      state['mask'] = (state['v'] > 1e-3).astype(np.float64)
      state['v'] = np.zeros_like(x) + 0.5      # reset, then neuron(0.5)
    if state['t'] > tau:
      spike = spike * state['mask']
    state.setdefault('passed', []).append(spike.sum(-1))  # spikes that travel
    return jnp.asarray(spike * theta)

  outputs = []
  ann = model.clone(spiking=None)
  for t in range(tau + T):
    with nn.intercept_methods(mp_layer):
      out = ann.apply(variables, images, train=False)
    if t >= tau:
      outputs.append(np.asarray(out))
  return np.stack(outputs), neurons


@pytest.mark.parametrize('net', ['toy', 'vgg16', 'resnet20'])
def test_srp_equals_the_authors_mplayer_per_step(net):
  if net == 'toy':
    model, variables, images = _toy()
  elif net == 'vgg16':
    model, variables, images = _zoo(
        'vgg16', size=32, hidden=8,
        blocks=((4, 4), (4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4)))
  else:
    model, variables, images = _zoo('resnet20', stage_features=(4, 8, 8))
  tau, T = 3, 5
  expected, neurons = authors_srp(model, variables, images, tau, T)
  # Chunks on the toy (the mask must reach every chunk); one block on the
  # zoo nets (compiling their chunked run costs a minute on two cores).
  run = cos_jax.evaluate_snn(model, variables, images, T=T, rho=tau,
                             init='srp', time_chunk=2 if net == 'toy' else None)
  assert run.outputs.shape == expected.shape and run.outputs.dtype == (
      jnp.float64)
  np.testing.assert_allclose(run.outputs, expected, rtol=1e-10, atol=1e-10)
  # The mask matters: some neurons are masked off, and the plain run from
  # θ/2 (the same dynamics unmasked) differs.
  masks = np.concatenate([s['mask'].ravel() for s in neurons.values()])
  assert 0 < masks.mean() < 1
  half = cos_jax.evaluate_snn(model, variables, images, T=T, init='half')
  assert not np.allclose(half.outputs, expected)
  if net == 'toy':  # the cost counts the τ steps, then only unmasked spikes
    counted = cos_jax.snn.run_method(
        model, variables, images, None, T=T, method=methods.resolve(
            'srp', tau), time_chunk=2, count_steps=True).intermediates
    for path, state in neurons.items():
      np.testing.assert_array_equal(
          counted[path[-1]]['step_spikes'][0], np.stack(state['passed']))


def test_srp_run_shape():
  srp = methods.resolve('srp', 4)
  assert (srp.steps(8), srp.counted(8), srp.latency(8, 5)) == (8, (4, 8), 12)
  assert srp.shifts() == (0,) and srp.masked


def _qcfs(z, theta, levels):
  return theta / levels * np.clip(np.floor(z * levels / theta + 0.5), 0,
                                  levels)


def _if_rate(currents, theta, v0):
  """Mean output θ·Σs/T of IF neurons over currents [T, ...] from v0."""
  v, total = np.array(v0, np.float64), 0.0
  for current in currents:
    u = v + current
    spike = (u >= theta).astype(np.float64)
    v = u - spike * theta
    total = total + spike
  return theta * total / len(currents), total


def numpy_correction(variables, images, rule, T):
  """emp_bias_corr on DenseToy in NumPy: (per IF layer, its correction)."""
  p = jax.tree.map(np.asarray, variables['params'])
  x = np.asarray(images)
  th = [float(p[f'Activation_{i}']['threshold']) for i in (0, 1)]
  dense = lambda i, h: h @ p[f'Dense_{i}']['kernel'] + p[f'Dense_{i}']['bias']
  # The ANN.
  z1 = dense(0, x)
  a1 = _qcfs(z1, th[0], 4)
  a2 = _qcfs(dense(1, a1), th[1], 4)
  # Layer 1: its current is z1 at every step.
  r1, _ = _if_rate(np.broadcast_to(z1, (T,) + z1.shape), th[0], th[0] / 2)
  if rule == 'pc':
    c1 = th[0] / 2 + T * (a1 - r1).mean(0, keepdims=True)
    v1, shift1 = c1, 0.0
  else:
    c1 = -(r1 - a1).mean((0, 1))
    v1, shift1 = th[0] / 2, c1
  # Layer 2 on corrected layer 1's spikes, step by step.
  _, _ = None, None
  v, spikes1 = np.broadcast_to(v1, z1.shape).copy(), []
  for _ in range(T):
    u = v + z1 + shift1
    s = (u >= th[0]).astype(np.float64)
    v = u - s * th[0]
    spikes1.append(s * th[0])
  currents2 = np.stack([dense(1, s) for s in spikes1])
  r2, _ = _if_rate(currents2, th[1], th[1] / 2)
  if rule == 'pc':
    c2 = th[1] / 2 + T * (a2 - r2).mean(0, keepdims=True)
  else:
    c2 = -(r2 - a2).mean((0, 1))
  return c1, c2


@pytest.mark.parametrize('rule', ['pc', 'bc'])
@pytest.mark.parametrize('T', [1, 3])
def test_corrections_match_the_formulas(rule, T):
  model, variables, images = _toy(seed=2, batch=16)
  got = correction.measure(model, variables, images, method=methods.METHODS[
      rule], T=T)
  tree = got['v0' if rule == 'pc' else 'shift']
  c1, c2 = numpy_correction(variables, images, rule, T)
  np.testing.assert_allclose(tree['Activation_0']['v0'], c1, atol=1e-10)
  np.testing.assert_allclose(tree['Activation_1']['v0'], c2, atol=1e-10)
  # Not a no-op: the correction moves something.
  baseline = 0.5 * float(variables['params']['Activation_1']['threshold'])
  assert np.abs(np.asarray(c2) - (baseline if rule == 'pc' else 0)).max() > 0


def test_corrected_run_uses_the_correction():
  """evaluate_snn(init='pc') runs from θ/2 + the correction: the same as
  simulate from that v0; 'bc' and 'pc' refuse to run without training
  images."""
  model, variables, images = _toy(seed=3, batch=8)
  calib = images[::-1] * 1.5
  run = cos_jax.evaluate_snn(model, variables, images, T=3, init='pc',
                             calibration_images=calib)
  v0 = correction.measure(model, variables, calib, method=methods.METHODS[
      'pc'], T=3)['v0']
  v0 = jax.tree.map(lambda v: jnp.broadcast_to(v, (8,) + v.shape[1:]), v0)
  np.testing.assert_allclose(
      run.outputs, cos_jax.simulate(model, variables, images, v0, T=3),
      atol=1e-10)
  with pytest.raises(ValueError, match='calibration_images'):
    cos_jax.evaluate_snn(model, variables, images, T=3, init='bc')


def test_convert_settings_take_the_rivals():
  config = convert_config.get_config()
  config.update(init='cos,srp,pc,bc,half', rho=4, T=4)
  settings = conversion.ConversionSettings.from_config(config)
  runs = settings.runs()
  assert list(runs) == ['cos', 'srp', 'pc@1', 'pc@2', 'pc@4', 'bc@1', 'bc@2',
                        'bc@4', 'half']
  assert [m.steps(4) for m in settings.methods] == [4, 4, 4, 4, 8]
  config.update(calibration_examples=0)
  with pytest.raises(SettingsError, match='calibration_examples'):
    conversion.ConversionSettings.from_config(config)


def test_pc_and_bc_refused_without_a_training_split(tmp_path, capfd):
  """Evaluating the training split leaves none to calibrate on: one line,
  exit 2, before anything is measured or written (the shipped net)."""
  from cli_helpers import convert_in_process, expect_usage_error  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  expect_usage_error(*reversed(convert_in_process(
      capfd, init='cos,pc', split='train', output_dir=str(out))),
                     '--init', 'training')
  assert not out.exists()

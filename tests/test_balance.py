"""Per-channel thresholds, the strict firing rule and threshold balancing
(issue 24), each against an independent oracle:

* an IF layer with ``[C]`` thresholds equals, channel for channel, C runs with
  that channel's scalar threshold, under every deterministic v(0) method,
  both firing rules, and in the cost counts' per-step spikes (float64);
* ``balance_thresholds`` equals a NumPy loop of Bu et al.'s
  ``SpikingNeuron*.optimize`` on a small net (dense and "spatial" layers);
* the strict rule with balanced thresholds and v(0) = θ/2 equals the
  authors' SNN neuron (``SpikingNeuron.forward``, mode 'snn') stepped in
  NumPy, output for output;
* convert.py converts a plain-ReLU Flax NNX and Linen network
  (``'balance': True``) training-free, with the accuracy per T (delayed
  readout included) of the same conversion done by the library.
"""

import functools
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import balance, methods, neuron
from cos_jax.activation import Activation, SpikingConfig

from cli_helpers import convert_in_process, expect_usage_error


@functools.partial(jax.jit, static_argnames=('method', 'strict', 'count'))
def _layer(currents, threshold, method, strict, count=False):
  """One IF layer on currents [T, B, ..., C] (folded sample-major, as a
  model feeds it) under ``method``; outputs [T, B, ..., C]."""
  config = SpikingConfig(steps=currents.shape[0], count_steps=count,
                         method=methods.resolve(method, 4, iterations=2))
  layer = Activation(4, config, strict=strict)
  steps = currents.shape[0]
  folded = jnp.moveaxis(currents, 0, 1).reshape((-1,) + currents.shape[2:])
  out, state = layer.apply({'params': {'threshold': threshold}}, folded,
                           mutable=['v0', 'intermediates'])
  out = out.reshape((-1, steps) + out.shape[1:])   # [B, T, ...]
  return jnp.moveaxis(out, 1, 0), state


@pytest.mark.parametrize('strict', [False, True])
def test_per_channel_layer_equals_each_channel_alone(strict):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    channels = 3
    currents = jnp.asarray(rng.normal(0.3, 1.0, (6, 3, 4, channels)))
    theta = jnp.asarray(rng.uniform(0.2, 2.0, channels))
    # Currents on the threshold exactly: where the two rules differ.
    currents = currents.at[0, 0, 0].set(theta)
    for method in ('cos', 'half', 'lightweight'):
      out, state = _layer(currents, theta, method, strict, count=True)
      assert out.dtype == jnp.float64
      step_spikes = 0
      for c in range(channels):
        alone, alone_state = _layer(currents[..., c:c + 1], theta[c], method,
                                    strict, count=True)
        np.testing.assert_array_equal(out[..., c:c + 1], alone,
                                      err_msg=f'{method} channel {c}')
        np.testing.assert_array_equal(state['v0']['v0'][..., c:c + 1],
                                      alone_state['v0']['v0'])
        step_spikes += alone_state['intermediates']['step_spikes'][0]
      np.testing.assert_array_equal(
          state['intermediates']['step_spikes'][0], step_spikes)


def test_strict_rule_differs_only_on_the_threshold():
  currents = jnp.array([[0.5], [1.0], [0.25]])   # from v(0) = 0.5
  # u ≥ θ: u = 1, 1, 0.25 fires, fires, not.
  assert neuron.if_neuron(currents, 1.0).spikes[:, 0].tolist() == [1, 1, 0]
  # u > θ: u = 1 does not fire, then u = 2 and 1.25 fire.
  strict = neuron.if_neuron(currents, 1.0, strict=True)
  assert strict.spikes[:, 0].tolist() == [0, 1, 1]
  with neuron.firing_rule(True):
    np.testing.assert_array_equal(neuron.spike_train(currents, 1.0),
                                  strict.spikes)
  np.testing.assert_array_equal(neuron.spike_train(currents, 1.0),
                                [[1.], [1.], [0.]])   # and back to u ≥ θ
  # A strict layer's v(0) method probes by its rule too: lightweight's
  # v(0) ← v(ρ), two rounds from θ/2 on 0.25, 0, 0, 0: 0.75, then u = 1 at
  # step 1 of round 2, silent strictly (v(ρ) = 1), else fired (0).
  held = jnp.array([0.25, 0., 0., 0.])[:, None, None]
  for strict, want in ((False, 0.0), (True, 1.0)):
    _, state = _layer(held, jnp.float32(1.0), 'lightweight', strict)
    assert state['v0']['v0'].ravel().tolist() == [want]


def _net(p, x):
  """A 1x1 conv (spatial), average pool and two dense layers."""
  h = jax.nn.relu(x @ p['w1'] + p['b1'])           # [B, 4, 4, 6]
  h = h.reshape(h.shape[0], 2, 2, 2, 2, -1).mean((2, 4))
  h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p['w2'] + p['b2'])
  return h @ p['w3']


def _params(rng, dtype):
  shapes = {'w1': (3, 6), 'b1': (6,), 'w2': (24, 7), 'b2': (7,),
            'w3': (7, 4)}
  p = {k: rng.normal(0, 1, s) / (np.sqrt(s[0]) if len(s) > 1 else 4)
       for k, s in shapes.items()}
  p['b2'][0] = -50.0   # a dead channel: its input is never positive
  return {k: jnp.asarray(v, dtype) for k, v in p.items()}


def _numpy_balance(p, batches, rate):
  """The authors' loop, in NumPy: per layer θ += c·mean(2(x−θ)[x>θ]), then
  the clip x = θ − relu(θ − relu(x)) with the new θ."""
  p = {k: np.asarray(v) for k, v in p.items()}
  relu = lambda z: np.maximum(z, 0)
  theta = [np.zeros(6), np.zeros(7)]

  def site(k, x):
    ub = theta[k]
    theta[k] = ub + rate * (2 * (x - ub) * (x > ub)).mean(
        tuple(range(x.ndim - 1)))
    return theta[k] - relu(theta[k] - relu(x))

  for x in batches:
    h = site(0, x @ p['w1'] + p['b1'])
    h = h.reshape(h.shape[0], 2, 2, 2, 2, -1).mean((2, 4))
    site(1, h.reshape(h.shape[0], -1) @ p['w2'] + p['b2'])
  return theta


def test_balance_thresholds_is_the_authors_rule():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    p = _params(rng, jnp.float64)
    batches = [rng.normal(0.2, 1.0, (5, 4, 4, 3)) for _ in range(4)]
    model, variables = cos_jax.trace(_net, p, jnp.asarray(batches[0]),
                                     levels=4)
    for rate, num_batches in ((1.0, 3), (0.5, 4)):
      balanced = cos_jax.balance_thresholds(
          model, variables, (jnp.asarray(b) for b in batches),
          num_batches=num_batches, rate=rate)
      expected = _numpy_balance(p, batches[:num_batches], rate)
      for k, (name, want) in enumerate(zip(model.sites, expected)):
        got = balanced['params'][name]['threshold']
        assert got.shape == want.shape and got.dtype == jnp.float64
        alive = want > 0
        assert alive.all() == (k == 0)   # site 1 has b2's dead channel
        np.testing.assert_allclose(got[alive], want[alive], rtol=1e-12)
        np.testing.assert_allclose(got[~alive],
                                   want.max() * balance.DEAD_FRACTION)
      assert balanced['params']['net'] is variables['params']['net']


def _numpy_snn(p, theta, x, steps):
  """The authors' SpikingNeuron in 'snn' mode stepped per time-step:
  mem = θ/2 at t = 0; mem += x; s = (mem − θ > 0); out = s·θ; mem −= out."""
  p = {k: np.asarray(v) for k, v in p.items()}
  mem = [0.5 * theta[0], 0.5 * theta[1]]

  def site(k, z):
    mem[k] = mem[k] + z
    out = (mem[k] - theta[k] > 0) * theta[k]
    mem[k] = mem[k] - out
    return out

  outs = []
  for _ in range(steps):
    h = site(0, x @ p['w1'] + p['b1'])
    h = h.reshape(h.shape[0], 2, 2, 2, 2, -1).mean((2, 4))
    h = site(1, h.reshape(h.shape[0], -1) @ p['w2'] + p['b2'])
    outs.append(h @ p['w3'])
  return np.stack(outs)


def test_strict_balanced_snn_is_the_authors_snn():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    p = _params(rng, jnp.float64)
    train = [jnp.asarray(rng.normal(0.2, 1.0, (8, 4, 4, 3)))
             for _ in range(2)]
    x = jnp.asarray(rng.normal(0.2, 1.0, (6, 4, 4, 3)))
    model, variables = cos_jax.trace(_net, p, x, levels=4)
    balanced = cos_jax.balance_thresholds(model, variables, train)
    theta = [np.asarray(balanced['params'][s]['threshold'])
             for s in model.sites]
    want = _numpy_snn(p, theta, np.asarray(x), 12)
    got = cos_jax.evaluate_snn(model.clone(strict=True), balanced, x, T=12,
                               init='half', time_chunk=5).outputs
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # θ/2 per channel from init_v0 too: simulate from it is the same run.
    v0 = cos_jax.init_v0(model, balanced, x)
    np.testing.assert_array_equal(v0[model.sites[1]]['v0'],
                                  np.broadcast_to(theta[1] / 2, (6, 7)))
    np.testing.assert_allclose(   # time chunks of 8, not 5: float rounding
        cos_jax.simulate(model.clone(strict=True), balanced, x, v0, T=12),
        got, rtol=1e-12, atol=1e-15)
    # COS runs on the balanced per-channel thresholds, at every T.
    cos = cos_jax.evaluate_snn(model.clone(strict=True), balanced, x, T=12,
                               rho=4).outputs
    assert cos.shape == want.shape and np.isfinite(cos).all()


def test_balance_refuses_bad_settings():
  model, variables = cos_jax.trace(_net, _params(np.random.default_rng(0),
                                                 jnp.float32),
                                   jnp.ones((1, 4, 4, 3)), levels=4)
  for kwargs, field in (({'num_batches': 0}, 'num_batches'),
                        ({'rate': 0.0}, 'rate'), ({'rate': True}, 'rate')):
    with pytest.raises(cos_jax.SettingsError) as error:
      cos_jax.balance_thresholds(model, variables, [jnp.ones((1, 4, 4, 3))],
                                 **kwargs)
    assert error.value.field == field
  with pytest.raises(cos_jax.SettingsError, match='batches'):
    cos_jax.balance_thresholds(model, variables, [])


def test_a_threshold_of_another_shape_is_refused():
  layer = Activation(4)
  with pytest.raises(ValueError, match='one value per channel'):
    layer.apply({'params': {'threshold': jnp.ones(3)}}, jnp.ones((2, 5)))


# ------------------------------------------------ convert.py, training-free --

MODEL_FILE = textwrap.dedent('''
    import flax.linen as nn
    import jax, jax.numpy as jnp
    from flax import nnx

    class NNXNet(nnx.Module):
      def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.fc1 = nnx.Linear(14 * 14 * 4, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, rngs=rngs)

      def __call__(self, x):
        h = jax.nn.relu(self.conv(x))
        h = jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))
        return self.fc2(h)

    class LinenNet(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = jax.nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        h = jax.nn.relu(nn.Dense(16)(h.reshape(h.shape[0], -1)))
        return nn.Dense(10)(h)

    def nnx_model():
      graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
      fn = lambda state, x: nnx.merge(graphdef, state)(x)
      return {'fn': fn, 'variables': state, 'levels': 4, 'balance': True}

    def linen_model():
      net = LinenNet()
      variables = net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      return {'fn': net.apply, 'variables': variables, 'levels': 4,
              'balance': True}
''')


@pytest.fixture
def model_file(tmp_path):
  path = tmp_path / 'relunets.py'
  path.write_text(MODEL_FILE)
  return str(path)


def _library_curve(model_file, name, readout_from):
  """The same conversion by the library: balance on the first 2 batches of
  32 training images, COS ρ = 2 on the first 64 test images."""
  from cos_jax import user_model
  from cos_jax.data import pipeline
  restored = user_model.restore(f'{model_file}:{name}',
                                dataset='fashion_mnist')
  train = pipeline.make_dataset('fashion_mnist', 'train', batch_size=32,
                                train=False, shard_index=0, num_shards=1)
  variables = cos_jax.balance_thresholds(
      restored.model, restored.variables, (b['image'] for b in train),
      num_batches=2)
  test = next(pipeline.make_dataset('fashion_mnist', 'test', batch_size=64,
                                    train=False, num_examples=64))
  outputs = cos_jax.evaluate_snn(restored.model, variables, test['image'],
                                 T=4 + readout_from, rho=2).outputs
  predictions = np.cumsum(outputs[readout_from:], 0).argmax(-1)
  return (predictions == test['label']).mean(1)


@pytest.mark.parametrize('name, readout_from', [('nnx_model', 0),
                                                ('linen_model', 1)])
def test_a_traced_plain_relu_net_converts_training_free(
    model_file, tmp_path, capfd, name, readout_from):
  out = tmp_path / 'out'
  code, err = convert_in_process(
      capfd, model=f'{model_file}:{name}', dataset='fashion_mnist',
      num_examples=64, T=4, rho=2, init='cos', balance_batches=2,
      balance_batch_size=32, readout_from=readout_from, cost_model='none',
      batch_size=64, output_dir=str(out))
  assert code == 0, err[-2000:]
  result = json.loads((out / 'results.json').read_text())
  assert result['ann'] == 'ReLU'  # the table's ANN row says ANN (ReLU)
  curve = result['curves']['cos']
  assert len(curve) == 4 and all(0 <= a <= 1 for a in curve)
  np.testing.assert_allclose(curve, _library_curve(model_file, name,
                                                   readout_from))


def test_plain_relu_conversion_refusals(model_file, tmp_path, capfd):
  base = dict(model=f'{model_file}:linen_model', dataset='fashion_mnist',
              output_dir=str(tmp_path / 'out'))
  for fields, field, words in (
      ({'split': 'train'}, 'model', ['training split']),
      ({'readout_from': 2}, 'readout_from', ['cost_model none']),
      ({'balance_rate': 0.0}, 'balance_rate', ['> 0'])):
    code, err = convert_in_process(capfd, **base, **fields)
    expect_usage_error(err, code, f'--{field}', *words)
  assert not (tmp_path / 'out').exists()


def test_a_reference_checkpoint_with_per_channel_thresholds_loads():
  from cos_jax import interop
  path = 'tests/fixtures/torch/QCFS_CIFAR10_vgg16_L4.pth'
  state = interop.read_torch_state_dict(path)
  channels = state['layer1.1.weight'].shape[0]
  theta = np.linspace(0.5, 2.0, channels).astype(np.float32)
  state['layer1.2.up'] = theta.reshape(1, channels, 1, 1)   # [1, C, 1, 1]
  kwargs = dict(arch='vgg16', num_classes=10, levels=4,
                **interop.inspect_torch_checkpoint(path).model_kwargs)
  model, variables = interop.load_torch_checkpoint(state, **kwargs)
  np.testing.assert_array_equal(
      variables['params']['Activation_0']['threshold'], theta)
  assert variables['params']['Activation_1']['threshold'].shape == ()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  assert jax.eval_shape(model.apply, variables, x).shape == (1, 10)
  wrong = jax.tree.map(lambda v: v, variables)
  wrong['params']['Activation_0']['threshold'] = jnp.ones(channels + 1)
  with pytest.raises(ValueError, match='one value per channel'):
    jax.eval_shape(model.apply, wrong, x)

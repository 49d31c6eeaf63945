"""cos_jax.trace: a plain JAX function equals the zoo path, and what cannot
convert is refused in one line.

Each zoo architecture (tiny widths) is rewritten here as a plain JAX function
over the zoo's own variables, with ``jax.nn.relu`` at its activations; traced,
it must give float64 results identical to the zoo model's: ANN logits, COS
per-step outputs (layerwise and global, 1 and 2 iterations, T < ρ and T > ρ),
the other v0 methods and the offset-spike statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import analysis, models
from cos_jax.jaxpr_walk import NotConvertible

DN = ('NHWC', 'HWIO', 'NHWC')


# --- the zoo, written as plain JAX over the zoo's variables -----------------

def conv(p, x, stride=1, padding=1):
  y = jax.lax.conv_general_dilated(x, p['kernel'], (stride, stride),
                                   [(padding, padding)] * 2,
                                   dimension_numbers=DN)
  return y + p['bias'].reshape(1, 1, 1, -1) if 'bias' in p else y


def batch_norm(p, s, x):
  mul = jax.lax.rsqrt(s['var'].reshape(1, 1, 1, -1) + 1e-5)
  mul = mul * p['scale'].reshape(1, 1, 1, -1)
  return (x - s['mean'].reshape(1, 1, 1, -1)) * mul + p['bias'].reshape(
      1, 1, 1, -1)


def dense(p, x):
  return x @ p['kernel'] + p['bias'].reshape(1, -1)


def avg_pool(x):
  return jax.lax.reduce_window(x, 0., jax.lax.add, (1, 2, 2, 1),
                               (1, 2, 2, 1), 'VALID') / 4.


def vgg_like(v, x, counts):
  """SmallNet / VGG: ``counts[i]`` conv-BN-relu layers then an avg-pool per
  block, a dense head with relu between its layers."""
  p, s = v['params'], v['batch_stats']
  i = 0
  for count in counts:
    for _ in range(count):
      x = jax.nn.relu(batch_norm(p[f'BatchNorm_{i}'], s[f'BatchNorm_{i}'],
                                 conv(p[f'Conv_{i}'], x)))
      i += 1
    x = avg_pool(x)
  x = x.reshape(x.shape[0], -1)
  n = sum(k.startswith('Dense_') for k in p)
  for j in range(n - 1):
    x = jax.nn.relu(dense(p[f'Dense_{j}'], x))
  return dense(p[f'Dense_{n - 1}'], x)


def resnet(v, x):
  """ResNet (CIFAR stem): relu after the residual addition."""
  p, s = v['params'], v['batch_stats']
  x = jax.nn.relu(batch_norm(p['BatchNorm_0'], s['BatchNorm_0'],
                             conv(p['Conv_0'], x)))
  blocks = sorted((k for k in p if k.startswith('BasicBlock_')),
                  key=lambda k: int(k.split('_')[1]))
  for name in blocks:
    bp, bs = p[name], s[name]
    stride = 2 if 'Conv_2' in bp else 1
    y = jax.nn.relu(batch_norm(bp['BatchNorm_0'], bs['BatchNorm_0'],
                               conv(bp['Conv_0'], x, stride)))
    y = batch_norm(bp['BatchNorm_1'], bs['BatchNorm_1'], conv(bp['Conv_1'], y))
    if 'Conv_2' in bp:
      x = batch_norm(bp['BatchNorm_2'], bs['BatchNorm_2'],
                     conv(bp['Conv_2'], x, stride, padding=0))
    x = jax.nn.relu(y + x)
  return dense(p['Dense_0'], x.mean(axis=(1, 2)))


NETS = {
    'small': (dict(stages=((4,), (6, 6)), hidden=8), (1, 2), 12, 1),
    'vgg16': (dict(blocks=((4,), (6,)), hidden=8), (1, 1), 8, 3),
    'resnet20': (dict(stage_sizes=(1, 1), stage_features=(4, 6)), None, 8,
                 3),
}


def _slot_thresholds(params):
  """The zoo's thresholds in forward order (module path order)."""
  out = []
  def visit(tree):
    for k in sorted(tree, key=lambda k: (k.rstrip('0123456789'),
                                         int(k.split('_')[-1])
                                         if k.split('_')[-1].isdigit() else 0)):
      if k.startswith('Activation_'):
        out.append(tree[k]['threshold'])
      elif isinstance(tree[k], dict) and k.startswith('BasicBlock_'):
        visit(tree[k])
  visit(params)
  return out


@pytest.fixture(scope='module', params=list(NETS))
def pair(request):
  """(zoo model, its float64 variables, traced model, its variables, x)."""
  jax.config.update('jax_enable_x64', True)
  name = request.param
  kwargs, counts, size, channels = NETS[name]
  model = models.get(name, num_classes=5, levels=4, conv_impl='lax', **kwargs)
  x = jax.random.uniform(jax.random.key(1), (3, size, size, channels),
                         jnp.float64) * 2
  variables = model.init(jax.random.key(0), x)
  rng = np.random.default_rng(0)
  to64 = lambda a: jnp.asarray(a, jnp.float64)
  variables = jax.tree.map(to64, variables)
  # Varied thresholds and statistics, so every layer's numbers differ.
  stats = jax.tree.map(lambda a: to64(rng.uniform(0.5, 1.5, a.shape)),
                       variables['batch_stats'])
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: to64(rng.uniform(0.6, 1.6)) if 'threshold' in str(path)
      else to64(rng.uniform(0.1, 0.9, a.shape)) if 'bias' in str(path)
      else a, variables['params'])
  variables = {'params': params, 'batch_stats': stats}
  if counts is None:
    fn = resnet
  else:
    fn = lambda v, images: vgg_like(v, images, counts)
  traced, traced_vars = cos_jax.trace(
      fn, variables, x, levels=4, thresholds=_slot_thresholds(params))
  traced_vars = jax.tree.map(to64, traced_vars)
  yield model, variables, traced, traced_vars, x
  jax.config.update('jax_enable_x64', False)


@pytest.mark.parametrize('runs', [
    [('layerwise', 1, 2), ('global', 2, 6)],
    [('layerwise', 2, 6), ('global', 1, 2)]], ids=['first', 'second'])
def test_ann_and_cos_outputs_are_identical(pair, runs):
  """ANN logits; COS per step under both schedules, 1 and 2 iterations,
  T < ρ and T > ρ (ρ = 4, time chunks of 4), and the v0 each run set."""
  model, variables, traced, traced_vars, x = pair
  assert len(traced.sites) == len(_slot_thresholds(variables['params']))
  np.testing.assert_array_equal(model.apply(variables, x),
                                traced.apply(traced_vars, x))
  for schedule, iterations, T in runs:
    kw = dict(T=T, rho=4, schedule=schedule, iterations=iterations,
              time_chunk=4)
    zoo = cos_jax.evaluate_snn(model, variables, x, **kw)
    ours = cos_jax.evaluate_snn(traced, traced_vars, x, **kw)
    np.testing.assert_array_equal(zoo.outputs, ours.outputs)
    assert zoo.outputs.shape == (T, 3, 5)
    assert np.abs(np.diff(np.asarray(zoo.outputs), axis=0)).max() > 0
    for a, b in zip(jax.tree.leaves(zoo.v0), jax.tree.leaves(ours.v0),
                    strict=True):
      np.testing.assert_array_equal(a, b)


def test_calibrate_then_simulate_and_other_methods_are_identical(pair):
  model, variables, traced, traced_vars, x = pair
  v_zoo = cos_jax.calibrate(model, variables, x, rho=3)
  v_ours = cos_jax.calibrate(traced, traced_vars, x, rho=3)
  np.testing.assert_array_equal(
      cos_jax.simulate(model, variables, x, v_zoo, T=5),
      cos_jax.simulate(traced, traced_vars, x, v_ours, T=5))
  np.testing.assert_array_equal(
      cos_jax.evaluate_snn(model, variables, x, T=3, init='half').outputs,
      cos_jax.evaluate_snn(traced, traced_vars, x, T=3, init='half').outputs)


def test_offset_spike_statistics_are_identical(pair):
  model, variables, traced, traced_vars, x = pair
  zoo, _ = analysis.layer_statistics(model, variables, x, T=4, rho=4)
  ours, _ = analysis.layer_statistics(traced, traced_vars, x, T=4, rho=4)
  assert len(zoo) == len(ours) == len(traced.sites)
  # Same layers in forward order, under the zoo's and the traced names.
  for a, b in zip(zoo.values(), ours.values()):
    for kind in ('plain', 'constrained'):
      for field in ('histogram', 'exact', 'squared_error'):
        np.testing.assert_array_equal(a[kind][field], b[kind][field])


# --- refusals ---------------------------------------------------------------

def _mlp_params():
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in
          (('w1', (12, 8)), ('w2', (8, 8)), ('w3', (8, 4)))}


def _refusal(fn, match):
  x = jnp.ones((2, 12))
  with pytest.raises(NotConvertible, match=match) as info:
    cos_jax.trace(fn, _mlp_params(), x, levels=4)
  message = str(info.value)
  assert '\n' not in message
  assert 'test_trace.py' in message  # the user's source line
  return message


def test_max_pooling_is_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    h = h.reshape(2, 4, 2).max(-1).repeat(2, -1)
    return jax.nn.relu(h @ p['w2']) @ p['w3']
  assert 'average pooling' in _refusal(fn, 'reduce_max')


def test_stray_maximum_is_refused():
  def fn(p, x):
    h = jnp.maximum(jax.nn.relu(x @ p['w1']) @ p['w2'], 0.)
    return jax.nn.relu(h) @ p['w3']
  _refusal(fn, 'max')


def test_product_of_spiking_values_is_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    return jax.nn.relu((h * h) @ p['w2']) @ p['w3']
  _refusal(fn, 'product of two spiking values')


def test_layer_norm_between_relus_is_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    h = nn.LayerNorm().apply({'params': {'scale': jnp.ones(8),
                                         'bias': jnp.zeros(8)}}, h)
    return jax.nn.relu(h @ p['w2']) @ p['w3']
  _refusal(fn, 'normalisation')


def test_softmax_on_spikes_is_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    return jax.nn.softmax(jax.nn.relu(h @ p['w2']) @ p['w3'])
  _refusal(fn, 'softmax')


def test_data_dependent_branch_is_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    h = jax.lax.cond(h.sum() > 0, lambda h: h, lambda h: -h, h)
    return jax.nn.relu(h @ p['w2']) @ p['w3']
  _refusal(fn, 'data-dependent')


def test_random_ops_are_refused():
  def fn(p, x):
    h = jax.nn.relu(x @ p['w1'])
    keep = jax.random.bernoulli(jax.random.key(0), 0.5, h.shape)
    return jax.nn.relu(jnp.where(keep, h, 0.) @ p['w2']) @ p['w3']
  _refusal(fn, 'random')


def test_a_function_without_relu_is_refused():
  with pytest.raises(NotConvertible, match='no jax.nn.relu'):
    cos_jax.trace(lambda p, x: x @ p['w1'], _mlp_params(), jnp.ones((2, 12)),
                  levels=4)


class _SlotNet(nn.Module):
  """A hand-built Activation-slot model with one non-linear mistake."""
  mistake: str
  levels: int = 4
  spiking: cos_jax.SpikingConfig | None = None

  @nn.compact
  def __call__(self, x, train=False):
    act = lambda static=False: cos_jax.Activation(
        self.levels, self.spiking, static_input=static, threshold_init=1.)
    x = act(True)(nn.Conv(4, (3, 3))(x))
    if self.mistake == 'max_pool':
      x = nn.max_pool(x, (2, 2), (2, 2))
    elif self.mistake == 'layer_norm':
      x = nn.LayerNorm()(x)
    elif self.mistake == 'relu':
      x = jax.nn.relu(nn.Conv(4, (3, 3))(x))
    x = act()(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize('mistake,match', [
    ('max_pool', 'max pooling'), ('layer_norm', 'normalisation'),
    ('relu', 'outside its Activation slots')])
def test_slot_models_are_checked_too(mistake, match):
  model = _SlotNet(mistake)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(NotConvertible, match=match) as info:
    cos_jax.evaluate_snn(model, variables, x, T=2, rho=2)
  assert '\n' not in str(info.value)
  # The same model without the mistake converts.
  ok = _SlotNet('none')
  cos_jax.evaluate_snn(ok, ok.init(jax.random.key(0), x), x, T=2, rho=2)


def test_thresholds_by_name_sequence_and_default():
  p, x = _mlp_params(), jnp.ones((2, 12))
  fn = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p['w1']) @ p['w2']) @ p['w3']
  model, v = cos_jax.trace(fn, p, x, levels=4,
                           thresholds={'relu_1': 2.0}, threshold_init=3.0)
  assert model.sites == ('relu_0', 'relu_1')
  assert [float(v['params'][s]['threshold']) for s in model.sites] == [3., 2.]
  with pytest.raises(ValueError, match='2 sites'):
    cos_jax.trace(fn, p, x, levels=4, thresholds=[1.0])
  with pytest.raises(ValueError, match='not sites'):
    cos_jax.trace(fn, p, x, levels=4, thresholds={'nope': 1.0})


def test_ann_is_differentiable_and_with_qcfs_names_match_trace():
  p, x = _mlp_params(), jnp.linspace(-1, 1, 24).reshape(2, 12)
  fn = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p['w1']) @ p['w2']) @ p['w3']
  model, v = cos_jax.trace(fn, p, x, levels=4)
  qfn = cos_jax.with_qcfs(fn, levels=4)
  thresholds = {s: v['params'][s]['threshold'] for s in model.sites}
  assert qfn.sites(p, x) == model.sites
  np.testing.assert_allclose(qfn(thresholds, p, x), model.apply(v, x))
  grads = jax.grad(lambda v: model.apply(v, x).sum())(v)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(grads['params'][s]['threshold']) > 0
             for s in model.sites)
  assert np.abs(grads['params']['net']['w1']).sum() > 0


def test_zoo_convolutions_chosen_per_platform_pass_the_check():
  """The zoo's 'auto' convs are a lax.platform_dependent choice (a cond on a
  static index): a static branch, checked branch by branch."""
  model = models.get('small', num_classes=3, levels=4,
                     stages=((32,), (32,)), hidden=4)
  x = jnp.ones((2, 4, 4, 16))
  variables = model.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x).jaxpr
  assert 'cond' in {e.primitive.name for e in jaxpr.eqns}
  run = cos_jax.evaluate_snn(model, variables, x, T=2, rho=2)
  assert run.outputs.shape == (2, 2, 3)


def test_traced_memory_bound_counts_every_equation():
  """A traced model has no submodules to capture: its per-image bytes (what
  the memory bound scales) are every equation's outputs, at least what the
  zoo model's captured module outputs give for the same network."""
  from cos_jax import checks  # pylint: disable=g-import-not-at-top
  from cos_jax.zoo_trace import trace_zoo_model  # pylint: disable=g-import-not-at-top
  model = models.get('small', num_classes=3, levels=4, stages=((4,), (8,)),
                     hidden=8)
  x = jnp.zeros((2, 12, 12, 1))
  variables = model.init(jax.random.key(0), x)
  traced, traced_vars = trace_zoo_model(model, variables, x)
  zoo = checks.model_facts(model, variables, (12, 12, 1)).step_bytes
  ours = checks.model_facts(traced, traced_vars, (12, 12, 1)).step_bytes
  assert zoo <= ours < 3 * zoo

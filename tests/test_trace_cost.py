"""Cost counting of traced models: fan-outs and MACs read off the jaxpr.

Each zoo net is traced as the plain function ``model.apply`` with its
Activation slots turned into ``jax.nn.relu`` calls, over the zoo's own
variables and thresholds: the same network, so ``cost.analyse`` (fan-outs,
targets, MACs, the image's MACs, depth) and the SOP counts of a conversion
run must be identical to the zoo path's (which tests/test_cost.py checks
against hand counts and the Jacobian), up to the site names' module prefix.
What no zoo model has (a depthwise conv, concatenated paths, einsum) is
checked against the Jacobian of the traced equations themselves.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import methods, conversion, cost, jaxpr_walk, runtime, snn, trace_twin
from cos_jax.activation import Activation
from cos_jax.settings import Calibration
from configs import convert as convert_config
from model_helpers import random_variables

NETS = {
    'small': ('SmallNet', (12, 12, 1), dict(stages=((4,), (8,)), hidden=16)),
    'resnet20': ('ResNet', (8, 8, 3), dict(stage_features=(4, 8, 8),
                                          stage_sizes=(1, 1, 1))),
    # Average pools and flattening; the ImageNet stem's overlapping pool.
    'vgg16': ('VGG', (32, 32, 3), dict(blocks=((2, 2), (2, 2), (2, 2, 2),
                                             (3, 3, 3), (3, 3, 3)),
                                     hidden=6)),
    'resnet18': ('ResNet', (28, 28, 3), dict(stage_features=(2, 2, 3, 3),
                                            stem='imagenet')),
}
COUNTED = ('resnet20', 'small')  # the nets whose runs are counted too


def _relu(next_fun, args, kwargs, context):
  if isinstance(context.module, Activation) and (
      context.method_name == '__call__'):
    return jax.nn.relu(args[0])
  return next_fun(*args, **kwargs)


def _zoo_and_traced(name):
  """(zoo model, its variables, traced model, its variables, image shape,
  the traced names' prefix)."""
  prefix, image, kwargs = NETS[name]
  model = cos_jax.models.get(name, num_classes=10, levels=4,
                             conv_impl='lax', **kwargs)
  variables = random_variables(model, image)

  def fn(v, x):
    with nn.intercept_methods(_relu):
      return model.apply(v, x)
  thresholds = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables['params'])[0] if path[-1].key == 'threshold']
  traced, traced_variables = cos_jax.trace(
      fn, variables, jnp.zeros((2,) + image), levels=4,
      thresholds=thresholds)
  return model, variables, traced, traced_variables, image, prefix + '/'


def _strip(tree, prefix):
  """``tree`` with ``prefix`` dropped from every dict key and string."""
  if isinstance(tree, dict):
    return {_strip(k, prefix): _strip(v, prefix) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_strip(v, prefix) for v in tree)
  if isinstance(tree, str) and tree.startswith(prefix):
    return tree[len(prefix):]
  return tree


@pytest.mark.parametrize('name', sorted(NETS))
def test_analyse_reads_the_same_network_off_the_jaxpr(name):
  """Fan-out maps, targets, per-layer MACs (named by module path), the
  image's MACs and depth: identical to the zoo path's."""
  model, variables, traced, traced_variables, image, prefix = (
      _zoo_and_traced(name))
  zoo = cost.analyse(model, variables, image)
  ours = cost.analyse(traced, traced_variables, image)
  assert ours.layers == tuple(prefix + n for n in zoo.layers)
  for field in ('neurons', 'targets', 'ann_macs'):
    assert _strip(getattr(ours, field), prefix) == getattr(zoo, field), field
  assert (ours.input_macs, ours.depth) == (zoo.input_macs, zoo.depth)
  for layer in zoo.layers:
    np.testing.assert_array_equal(ours.fanout[prefix + layer],
                                  zoo.fanout[layer], err_msg=layer)
    assert ours.fanout[prefix + layer].dtype == np.int64
  assert cost.ann_macs(traced.clone(spiking=cos_jax.SpikingConfig(steps=2)),
                       traced_variables, image) == ours.ann_macs


def test_conversion_counts_the_same_sops_in_float64():
  """convert_and_evaluate's cost summary (COS, layerwise, ρ = 4 > T = 2:
  SOPs, energies, rates per layer and t, MACs, fan-out means) is identical
  for the traced and the zoo small net, float64."""
  with jax.enable_x64(True):
    model, variables, traced, traced_variables, image, prefix = (
        _zoo_and_traced('small'))
    images = np.random.default_rng(0).uniform(0, 1, (4,) + image)
    config = convert_config.get_config()
    config.update(rho=4, T=2, init='cos', time_chunk=2, analysis_T=2)
    settings = conversion.ConversionSettings.from_config(config)
    batches = [{'image': images, 'label': np.arange(4)}]
    mesh = runtime.make_mesh(jax.devices()[:1])
    # convert_and_evaluate reads variables['batch_stats'] (a traced model
    # has none).
    zoo, ours = (conversion.convert_and_evaluate(m, v, batches, settings,
                                                 mesh=mesh)['cost']
                 for m, v in ((model, variables),
                              (traced, {**traced_variables,
                                        'batch_stats': {}})))
  assert zoo['methods']['cos']['sops'][-1] > 0
  assert _strip(ours, prefix) == zoo


@pytest.mark.parametrize('name', COUNTED)
def test_a_cos_runs_sops_are_the_same_in_float64(name):
  """cost's own functions on a counted COS run (global schedule, 2
  iterations of ρ = 2, T = 3: the probe passes' spikes travel too): the
  class counts per layer and step and the summary are identical."""
  calibration = Calibration(2, iterations=2, schedule='global')
  with jax.enable_x64(True):
    model, variables, traced, traced_variables, image, prefix = (
        _zoo_and_traced(name))
    images = jnp.asarray(np.random.default_rng(1).uniform(
        0, 1, (3,) + image))
    summaries, totals = [], []
    for m, v in ((model, variables), (traced, traced_variables)):
      network = cost.analyse(m, v, image)
      onehots = {k: o for k, (o, _) in cost.fanout_classes(network).items()}
      run = snn.run_method(m, v, images, None, T=3,
                           method=methods.named('cos', calibration),
                           count_steps=True)
      counts = jax.device_get(cost.class_counts(
          run.intermediates, onehots, jnp.ones(3, jnp.int32)))
      totals.append(counts)
      summaries.append(cost.summarize(
          network, [(3, {'cos': counts})],
          {'cos': (methods.named('cos', calibration), 3)},
          cost.COST_MODELS['45nm']))
  zoo, ours = summaries
  assert zoo['methods']['cos']['sops'][-1] > 0
  assert _strip(ours, prefix) == zoo
  assert set(totals[1]) == {prefix + k for k in totals[0]}
  for layer, counts in totals[0].items():
    np.testing.assert_array_equal(totals[1][prefix + layer], counts)


def _mlp(p, x):
  h = jax.nn.relu(x.reshape(len(x), -1) @ p['w1'])
  return jax.lax.optimization_barrier(h) @ p['w2']


def _tanh_input(p, x):
  return jax.nn.relu(jnp.tanh(x.reshape(len(x), -1)) @ p['w1']) @ p['w2']


@pytest.mark.parametrize('fn, op', [(_mlp, 'optimization_barrier'),
                                    (_tanh_input, 'tanh')])
def test_an_op_the_twin_does_not_know_is_refused_in_one_line(fn, op):
  """On a spiking value (an op trace accepts) and on the image alike."""
  p = {'w1': jnp.ones((12, 5)), 'w2': jnp.ones((5, 3))}
  traced, variables = cos_jax.trace(fn, p, jnp.ones((2, 3, 4)), levels=4)
  with pytest.raises(ValueError) as error:
    cost.analyse(traced, variables, (3, 4))
  message = str(error.value)
  assert '\n' not in message
  assert f'cost counting does not cover {op} on a value' in message
  assert 'test_trace_cost.py' in message  # the user's source line


def test_linear_layers_without_a_module_path_are_named_in_trace_order():
  """A plain function's dots are ``dot_general_<k>``; MACs per sample."""
  def mlp(p, x):
    return jax.nn.relu(x.reshape(len(x), -1) @ p['w1']) @ p['w2']
  p = {'w1': jnp.ones((12, 5)), 'w2': jnp.ones((5, 3))}
  traced, variables = cos_jax.trace(mlp, p, jnp.ones((2, 3, 4)), levels=4)
  network = cost.analyse(traced, variables, (3, 4))
  assert network.ann_macs == {'dot_general_0': 60, 'dot_general_1': 15}
  assert network.input_macs == 60
  np.testing.assert_array_equal(network.fanout['relu_0'], 3)
  assert trace_twin.is_traced(traced) and not trace_twin.is_traced(
      cos_jax.models.get('small', num_classes=10, levels=4))


def _beyond_the_zoo(p, x):
  """A plain-JAX net with what no zoo model has: a depthwise stride-2 conv
  with asymmetric padding, a channel concatenation of two paths (one a
  VALID average pool that drops a column), a transpose and an einsum."""
  conv = lambda v, w, **kw: jax.lax.conv_general_dilated(
      v, w, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **kw)
  h = jax.nn.relu(conv(x, p['w0'], window_strides=(1, 1), padding='SAME'))
  d = conv(h, p['dw'], window_strides=(2, 2), padding=((1, 1), (0, 1)),
           feature_group_count=4)
  g = jax.nn.relu(d * p['s'] - p['b'])
  pooled = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1),
                                 (1, 2, 2, 1), 'VALID') / 4
  cat = jnp.concatenate([g, pooled], -1)
  flat = jnp.transpose(cat, (0, 3, 1, 2)).reshape(len(x), -1)
  return jnp.einsum('bi,io->bo', flat, p['w2'])


def _jacobian_fanouts(traced, variables, image):
  """Oracle: per site, the nonzero entries of the Jacobian of every site's
  input and the logits with respect to its output (the real equations,
  random weights; sites output what they are given)."""
  net = variables['params']['net']
  closed = traced.program.jaxpr(net, jnp.zeros((1,) + image))
  shapes = {}
  jaxpr_walk.evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(
      (net, jnp.zeros((1,) + image))), apply=jaxpr_walk.bind,
      site=lambda k, x: shapes.setdefault(traced.sites[k], x.shape[1:]) and x)

  def targets(outputs):
    inputs = []

    def site(k, x):
      inputs.append(x.reshape(-1))
      return outputs[traced.sites[k]][None]
    logits, = jaxpr_walk.evaluate(
        closed.jaxpr, closed.consts, jax.tree.leaves(
            (net, jnp.zeros((1,) + image))), site=site, apply=jaxpr_walk.bind)
    return jnp.concatenate(inputs + [logits.reshape(-1)])
  jacobians = jax.jacfwd(targets)({n: jnp.zeros(s) for n, s in
                                   shapes.items()})
  return {n: np.asarray((j != 0).sum(0)) for n, j in jacobians.items()}


def test_fanouts_beyond_the_zoo_match_the_jacobian():
  rng = np.random.default_rng(5)
  p = {'w0': rng.standard_normal((3, 3, 2, 4)),
       'dw': rng.standard_normal((3, 3, 1, 4)),
       's': rng.uniform(0.5, 1.5, 4), 'b': rng.uniform(0.5, 1.5, 4),
       'w2': rng.standard_normal((48, 5))}
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  image = (6, 5, 2)
  traced, variables = cos_jax.trace(_beyond_the_zoo, p, jnp.ones(
      (2,) + image), levels=4)
  network = cost.analyse(traced, variables, image)
  assert network.targets == {'relu_0': ('output', 'relu_1'),
                             'relu_1': ('output',)}
  oracle = _jacobian_fanouts(traced, variables, image)
  for name, expected in oracle.items():
    np.testing.assert_array_equal(np.broadcast_to(
        network.fanout[name][..., None], expected.shape), expected,
                                  err_msg=name)
  assert oracle['relu_0'][0, 4, 0] < oracle['relu_0'][0, 3, 0]  # dropped
  # A depthwise tap reads one channel; einsum names its scope by its spec.
  assert network.ann_macs == {'conv_general_dilated_0': 6 * 5 * 4 * 18,
                              'conv_general_dilated_1': 3 * 2 * 4 * 9,
                              'bi,io->bo': 48 * 5}
  assert network.input_macs == 6 * 5 * 4 * 18

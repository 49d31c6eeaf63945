"""cos_jax.conv: the matmul form and the per-shape choice against lax.conv.

The oracle is ``lax.conv_general_dilated`` (XLA's own convolution, an
independent implementation). Float tolerances come from the standard forward
error bound of a sum of K products, |fl(Σ) − Σ| ≤ γ_K·Σ|a·b| with
γ_K = K·u/(1 − K·u), u the unit roundoff: both implementations carry it, in a
different summation order, so they may differ by 2·γ_K times the same sum
over absolute values, which is itself a convolution (or its VJP) of |x|, |w|
and |g|. That is loose in float32 and tight in float64 (γ ≈ 1e-12 for the
largest layer here); a wrong tap, stride, pad or kernel layout misses it by
orders of magnitude.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import conv

DN = ('NHWC', 'HWIO', 'NHWC')

# (batch, map side, C_in, C_out, kernel, stride, padding): the zoo's layer
# kinds (CIFAR 32x32 down to VGG block 5's 2x2 map, a 1x1 map, the ImageNet
# 7x7/2 stem on a reduced map, the 1x1/2 shortcuts), batches incl. 1. The
# 3x3 convs of the small net and ResNet-20 (7x7 to 32x32 maps, 1 to 64
# channels) are of the same kinds as the first two rows.
LAYERS = [
    (2, 32, 3, 64, 3, 1, 1),     # first layer of VGG / ResNet-18/34
    (2, 4, 512, 512, 3, 1, 1),   # VGG block 4
    (3, 2, 512, 512, 3, 1, 1),   # VGG block 5 (map smaller than kernel)
    (2, 1, 512, 512, 3, 1, 1),   # 1x1 map: only the centre tap is live
    (2, 32, 16, 32, 3, 2, 1),    # ResNet-20 downsampling
    (2, 8, 256, 512, 3, 2, 1),   # ResNet-18/34 downsampling
    (2, 3, 16, 16, 3, 2, 1),     # odd map, stride 2
    (2, 2, 64, 64, 3, 2, 1),     # 2x2 map, stride 2: a dead tap row/column
    (2, 32, 16, 32, 1, 2, 0),    # ResNet-20 shortcut
    (1, 8, 256, 512, 1, 2, 0),   # ResNet-18/34 shortcut, batch 1
    (1, 64, 3, 64, 7, 2, 3),     # ImageNet stem geometry
]


def layer_id(layer):
  n, h, cin, cout, k, s, p = layer
  return f'n{n}-{h}px-{cin}to{cout}-k{k}s{s}p{p}'


def geometry(layer):
  n, h, cin, cout, k, s, p = layer
  return conv.geometry_of((n, h, h, cin), (k, k, cin, cout), (s, s),
                          ((p, p), (p, p)), dimension_numbers=DN)


def reference(x, w, layer):
  _, _, _, _, _, s, p = layer
  return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                  dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def operands(layer, dtype, seed=0):
  """Standard-normal input, kernel and output cotangent (NumPy draws: no
  compilation)."""
  n, h, cin, cout, k, _, _ = layer
  out_h, out_w = geometry(layer).out_spatial
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in (
      (n, h, h, cin), (k, k, cin, cout), (n, out_h, out_w, cout)))


def gamma(terms, dtype):
  u = float(jnp.finfo(dtype).eps) / 2
  return terms * u / (1 - terms * u)


def assert_within(actual, expected, magnitude, terms, dtype):
  bound = 2 * gamma(terms, dtype) * np.asarray(magnitude)
  # The smallest normal number covers sums that are exactly 0 on both sides.
  bound = bound + float(jnp.finfo(dtype).tiny)
  excess = np.abs(np.asarray(actual) - np.asarray(expected)) - bound
  assert excess.max() <= 0, (
      f'max error {np.abs(np.asarray(actual) - np.asarray(expected)).max():.3g}'
      f' exceeds the bound there ({bound.max():.3g} at most)')


def chosen(x, w, layer):
  """conv_general_dilated as the zoo's flax.linen.Conv calls it."""
  _, _, _, _, _, s, p = layer
  return conv.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                   dimension_numbers=DN,
                                   precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames='layer')
def forms_and_lax(x, w, cotangent, layer):
  """Values and VJPs of the matmul form, the chosen form and lax, and the
  absolute sums bounding their differences."""
  matmul = functools.partial(conv.conv_as_matmul, geometry=geometry(layer),
                             precision=lax.Precision.HIGHEST)
  ref = functools.partial(reference, layer=layer)
  # Σ|x||w| per output, and the VJP magnitudes Σ|g||w|, Σ|x||g|.
  magnitude, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))
  bounds = (magnitude, *abs_vjp(jnp.abs(cotangent)))
  results = {}
  for name, fn in (('matmul', matmul), ('chosen', functools.partial(
      chosen, layer=layer)), ('lax', ref)):
    y, vjp = jax.vjp(fn, x, w)
    results[name] = (y, *vjp(cotangent))
  return results, bounds


# float64 checks every layer tightly; float32 (where the bound is loose) the
# ones with the longest sums.
CASES = [(layer, 'float64') for layer in LAYERS] + [
    (layer, 'float32') for layer in LAYERS if layer[3] == 512]


@pytest.mark.parametrize('layer,dtype', CASES,
                         ids=[f'{layer_id(l)}-{d}' for l, d in CASES])
def test_matmul_and_chosen_forms_match_lax_with_gradients(layer, dtype):
  with jax.enable_x64(dtype == 'float64'):
    x, w, cotangent = operands(layer, dtype)
    n, _, cin, cout, k, _, _ = layer
    out_h, out_w = geometry(layer).out_spatial
    results, bounds = forms_and_lax(x, w, cotangent, layer)
    # Terms per sum: of the output, of dL/dx, of dL/dw.
    terms = (k * k * cin, k * k * cout, n * out_h * out_w)
    for form in ('matmul', 'chosen'):
      for value, value_ref, magnitude, count in zip(
          results[form], results['lax'], bounds, terms):
        assert value.shape == value_ref.shape and value.dtype == dtype
        assert_within(value, value_ref, magnitude, count, dtype)


@pytest.mark.parametrize('layer', LAYERS, ids=layer_id)
def test_chosen_form_is_lax_or_left_to_the_lowering(layer):
  """Where the CPU rules keep lax, the zoo's call is lax's own op; where
  they pick the matmul form, the platform decides when lowering."""
  x, w, _ = operands(layer, 'float32')
  ops = str(jax.make_jaxpr(functools.partial(chosen, layer=layer))(x, w))
  if conv.choose(geometry(layer), 'cpu') == 'lax':
    assert 'conv_general_dilated' in ops and 'dot_general' not in ops
  else:
    assert 'platform_index' in ops


def test_cpu_rules_pick_matmul_only_where_lax_conv_is_slow():
  choice = {layer: conv.choose(geometry(layer), 'cpu') for layer in LAYERS}
  matmul = {layer for layer, c in choice.items() if c == 'matmul'}
  assert matmul == {l for l in LAYERS if l[1] < l[4]}
  assert (3, 2, 512, 512, 3, 1, 1) in matmul  # VGG-16 block 5
  for platform in ('gpu', 'tpu'):
    assert {conv.choose(geometry(l), platform) for l in LAYERS} == {'lax'}


def test_unsupported_calls_fall_back_to_lax():
  shapes = (2, 2, 2, 8), (3, 3, 8, 8)
  pads = ((1, 1), (1, 1))
  assert conv.geometry_of(*shapes, (1, 1), pads, rhs_dilation=(2, 2),
                          dimension_numbers=DN) is None
  assert conv.geometry_of((2, 2, 2, 8), (3, 3, 4, 8), (1, 1), pads,
                          dimension_numbers=DN, feature_group_count=2) is None
  assert conv.geometry_of((2, 8, 2, 2), (8, 8, 3, 3), (1, 1), pads,
                          dimension_numbers=('NCHW', 'OIHW', 'NCHW')) is None
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 2, 2, 8)), 'float32')
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), 'float32')
  grouped = lambda fn: jax.jit(lambda x, w: fn(
      x, w, (1, 1), pads, dimension_numbers=DN, feature_group_count=2))
  np.testing.assert_array_equal(grouped(conv.conv_general_dilated)(x, w),
                                grouped(lax.conv_general_dilated)(x, w))


def test_platform_is_settled_at_lowering():
  """A 2x2-map layer lowers to a dot on CPU and to a convolution on GPU/TPU."""
  x, w = jnp.ones((4, 2, 2, 16)), jnp.ones((3, 3, 16, 8))
  fn = lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN)
  traced = jax.jit(fn).trace(x, w)
  for platform, op in (('cpu', 'dot_general'), ('cuda', 'convolution'),
                       ('tpu', 'convolution')):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    other = 'convolution' if op == 'dot_general' else 'dot_general'
    assert op in text and other not in text, platform
  compiled = jax.jit(fn).lower(x, w).compile().as_text()
  assert 'convolution' not in compiled and 'conditional' not in compiled


def test_conv_impl_must_be_known():
  model = cos_jax.models.get('small', num_classes=10, levels=4,
                             conv_impl='fast')
  with pytest.raises(ValueError, match='conv_impl must be one of auto, lax'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


NARROW_VGG = dict(blocks=((4, 4), (8, 8), (8, 8, 8), (16, 16, 16),
                          (16, 16, 16)), hidden=32)


def init_with_batch_statistics(model, key, images):
  """Initial variables whose BN running statistics are those of ``images``,
  as after training (at init, signals fade through 13 layers and 5 poolings
  and VGG is silent). One train-mode pass updates mean ← m·mean +
  (1 − m)·batch mean (m = 0.9); solved here for the batch statistics."""
  variables = model.init(key, images)
  _, state = model.apply(variables, images, train=True,
                         mutable=['batch_stats'])
  batch = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1,
                       state['batch_stats'], variables['batch_stats'])
  return {**variables, 'batch_stats': batch}


# Image sides that give each net 2x2 maps under a 3x3 kernel (matmul form on
# CPU) next to larger ones (lax): VGG-16's block 5 on 32x32, ResNet-20's last
# stage on 8x8. Parameter gradients are compared on VGG (the per-layer tests
# cover every form's VJP; this is the training path through a deep net).
@pytest.mark.parametrize('arch,kwargs,side,gradients', [
    ('vgg16', NARROW_VGG, 32, True), ('resnet20', {}, 8, False)],
                         ids=['vgg16-narrow', 'resnet20'])
def test_whole_model_matches_lax_conv_model(arch, kwargs, side, gradients):
  """ANN logits (and parameter gradients) and a fused COS run, float64: the
  default convs equal a model forced onto lax.conv (same variables)."""
  with jax.enable_x64(True):
    model = cos_jax.models.get(arch, num_classes=10, levels=4,
                               threshold_init=1.0, **kwargs)
    forced = model.clone(conv_impl='lax')
    images = jnp.asarray(np.random.default_rng(0).standard_normal(
        (2, side, side, 3)), 'float64')
    key = jax.random.key(1, impl='rbg')  # compiles faster than threefry
    lowered = str(jax.make_jaxpr(model.apply)(
        jax.eval_shape(model.init, key, images), images))
    assert 'platform_index' in lowered  # some layer takes the matmul form
    variables = jax.jit(functools.partial(init_with_batch_statistics, model))(
        key, images)
    assert (jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, jax.eval_shape(forced.init, key, images)))

    def loss(m, params):
      logits = m.apply({**variables, 'params': params}, images)
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

    if gradients:
      (_, logits), grads = jax.jit(jax.value_and_grad(
          functools.partial(loss, model), has_aux=True))(variables['params'])
      (_, logits_ref), grads_ref = jax.jit(jax.value_and_grad(
          functools.partial(loss, forced), has_aux=True))(variables['params'])
      for grad, grad_ref in zip(jax.tree.leaves(grads),
                                jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-8,
                                   atol=1e-10 * (np.abs(grad_ref).max() + 1))
    else:
      logits, logits_ref = (jax.jit(m.apply)(variables, images)
                            for m in (model, forced))
    assert np.std(np.asarray(logits_ref)) > 0  # the net is not silent
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-10, atol=1e-12)

    run = cos_jax.evaluate_snn(model, variables, images, T=4, rho=2)
    run_ref = cos_jax.evaluate_snn(forced, variables, images, T=4, rho=2)
    assert np.std(np.asarray(run_ref.outputs)) > 0
    np.testing.assert_allclose(run.outputs, run_ref.outputs, rtol=1e-10,
                               atol=1e-12)

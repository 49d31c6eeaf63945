"""Bring your own model: a user's NNX, Linen, Equinox and plain-JAX networks.

Every ``python`` block of docs/byom.md runs here, as written: each framework's
CNN (BatchNorm, average pooling, a dense head, ``nnx.relu`` / ``nn.relu`` /
``jax.nn.relu`` called directly) and a plain-JAX MLP trains with QCFS
(``cos_jax.with_qcfs``, thresholds trained as parameters) in an optax loop on
real Fashion-MNIST, converts with ``cos_jax.trace``, and at T = 1 COS beats the
θ/2 baseline on 1,000 test images (~85 s of CPU time for the file). Then the
refusals a user meets: each non-linear operation between ReLUs raises
``NotConvertible`` in one line that names the operation and the line of this
file that wrote it (and, inside a flax layer, the layer's own line).

Equinox is a test-only dependency (requirements.txt).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax.data import prepare
from cos_jax.jaxpr_walk import NotConvertible

DOC = os.path.join(os.path.dirname(__file__), os.pardir, 'docs', 'byom.md')
FMNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')

# ---------------------------------------------------------------------------
# docs/byom.md, block by block
# ---------------------------------------------------------------------------


def _doc_blocks() -> dict[str, list[tuple[int, str]]]:
  """``{section heading: [(first line, code), ...]}`` of the python blocks."""
  blocks, heading, code, start = {}, None, None, 0
  with open(DOC) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, 1):
    if code is not None:
      if line.startswith('```'):
        blocks.setdefault(heading, []).append((start, '\n'.join(code)))
        code = None
      else:
        code.append(line)
    elif line.startswith('#'):
      heading = line.lstrip('#').strip()
    elif line.strip() == '```python':
      code, start = [], number + 1
  return blocks


def _run_section(heading: str, namespace: dict) -> dict:
  """Runs a section's blocks in ``namespace`` (tracebacks name the doc's
  own lines); returns the namespace."""
  for start, code in _doc_blocks()[heading]:
    exec(compile('\n' * (start - 1) + code, DOC, 'exec'), namespace)
  return namespace


@pytest.fixture(scope='module')
def helpers():
  """The doc's shared helpers and Fashion-MNIST (first 20k / 1k images)."""
  # The doc reads Debian's files; like tests/test_data.py, skip without them.
  missing = [f for f in FMNIST_FILES
             if not os.path.exists(os.path.join(prepare.FMNIST_DEBIAN_DIR, f))]
  if missing:
    pytest.skip(f'no Fashion-MNIST in {prepare.FMNIST_DEBIAN_DIR}: '
                'apt-get install dataset-fashion-mnist')
  return _run_section('The shared helpers', {'__name__': 'byom_doc'})


def test_the_doc_runs_every_python_block_it_shows():
  sections = _doc_blocks()
  run = {'The shared helpers', 'Flax NNX', 'Flax Linen', 'Equinox',
         'Plain JAX'}
  assert set(sections) == run, 'a python block that no test runs'
  for heading in run - {'The shared helpers'}:
    # The conversion itself stays short (the model definition aside).
    assert len(sections[heading][-1][1].splitlines()) <= 17, heading


def _check_converted(ns: dict, initial_thresholds: float = 8.0) -> dict:
  """The checks every framework's run must pass; returns its results."""
  net, results = ns['net'], ns['results']
  # The contract: the training forward's sites are the traced function's.
  assert set(ns['thresholds']) == set(net.sites)
  # Thresholds were trained (as parameters) and reach the SNN as given.
  for site in net.sites:
    trained = ns['net_vars']['params'][site]['threshold']
    assert trained == ns['thresholds'][site]
    assert abs(float(trained) - initial_thresholds) > 1e-3, site
  assert results['ann'] > 70, results
  assert results['cos'][1] > results['half'][1], results
  return results


def _check_updated(batch_stats):
  """BatchNorm statistics came back through with_qcfs, updated: no mean is
  still 0 and no variance still 1 (Equinox also counts the steps)."""
  leaves = [x for x in jax.tree.leaves(batch_stats)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(leaves) == 4  # a mean and a variance per BatchNorm
  for leaf in leaves:
    assert not (np.allclose(leaf, 0) or np.allclose(leaf, 1)), leaf


@pytest.fixture(scope='module')
def nnx_run(helpers):
  return _run_section('Flax NNX', dict(helpers))


def test_nnx_cnn_trains_with_qcfs_and_cos_beats_half_at_t1(nnx_run):
  ns = nnx_run
  results = _check_converted(ns, initial_thresholds=4.0)
  x = ns['x_train'][:1]
  assert ns['qfn'].sites(ns['params'], ns['stats'], x) == ns['net'].sites
  assert ns['net'].sites == ('relu_0', 'relu_1')  # NNX pushes no name stack
  # BatchNorm statistics came back through with_qcfs and were updated.
  _check_updated(ns['stats'])
  # The table reads T = 1 off a T = 8 run: a run of T = 1 agrees.
  run = cos_jax.evaluate_snn(ns['net'], ns['net_vars'], ns['x_test'], T=1,
                             init='cos', rho=4)
  correct = run.outputs[0].argmax(-1) == ns['y_test']
  assert 100 * float(correct.mean()) == pytest.approx(results['cos'][1])
  print('NNX', results)


@pytest.mark.parametrize('section, state, sites', [
    ('Flax Linen', 'stats', ('CNN/relu_0', 'CNN/relu_1')),
    # No module path: JAX's name for the vmap transformation.
    ('Equinox', 'state', ('vmap()/relu_0', 'vmap()/relu_1'))])
def test_linen_and_equinox_cnns_train_with_qcfs_and_cos_beats_half_at_t1(
    helpers, section, state, sites):
  ns = _run_section(section, dict(helpers))
  results = _check_converted(ns, initial_thresholds=4.0)
  x = ns['x_train'][:1]
  assert ns['qfn'].sites(ns['params'], ns[state], x) == ns['net'].sites
  assert ns['net'].sites == sites
  _check_updated(ns[state])
  print(section, results)


def test_plain_jax_mlp_trains_with_qcfs_and_cos_beats_half_at_t1(helpers):
  ns = _run_section('Plain JAX', dict(helpers))
  results = _check_converted(ns)
  assert ns['net'].sites == ('relu_0', 'relu_1', 'relu_2')
  print('plain JAX', results)


def test_traced_nnx_net_takes_other_batch_sizes(nnx_run):
  """Traced once per input shape: a batch of another size runs the same
  network (the ANN's logits are per-image)."""
  ns = nnx_run
  net, net_vars, x = ns['net'], ns['net_vars'], ns['x_test']
  np.testing.assert_allclose(net.apply(net_vars, x[:7]),
                             net.apply(net_vars, x)[:7], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Refusals: one line, the op, this file's line
# ---------------------------------------------------------------------------

X = jnp.ones((2, 28, 28, 1))
P = {'w1': jnp.ones((784, 32)) / 784, 'w2': jnp.ones((32, 32)) / 32,
     'w3': jnp.ones((32, 10)) / 32}


def _flat(x):
  return x.reshape(len(x), -1)


def _line_of(marker: str) -> int:
  """The line of this file that holds ``marker`` (a comment)."""
  with open(__file__) as f:
    numbers = [n for n, line in enumerate(f, 1)
               if line.rstrip().endswith(marker)]
  assert len(numbers) == 1, marker
  return numbers[0]


def _refusal(fn, variables=None, *, op: str, marker: str | None = None
             ) -> str:
  with pytest.raises(NotConvertible) as info:
    cos_jax.trace(fn, P if variables is None else variables, X, levels=4)
  message = str(info.value)
  assert '\n' not in message, message
  assert op in message, message
  if marker is not None:
    assert f'test_byom.py:{_line_of(marker)}:' in message, message
  return message


def test_refuses_a_relu_written_as_maximum():
  def mlp(p, x):
    h = jax.nn.relu(_flat(x) @ p['w1'])
    h = jnp.maximum(h @ p['w2'], 0)  # <- maximum
    return jax.nn.relu(h) @ p['w3']
  message = _refusal(mlp, op='max', marker='# <- maximum')
  assert 'jnp.maximum' in message


def test_refuses_a_product_of_two_spiking_values():
  def gated(p, x):
    a = jax.nn.relu(_flat(x) @ p['w1'])
    b = jax.nn.relu(_flat(x) @ p['w1'] + 1)
    return (a * b) @ p['w2'] @ p['w3']  # <- product
  _refusal(gated, op='product of two spiking values (mul)',
           marker='# <- product')


def test_refuses_exp_on_a_spiking_value():
  def f(p, x):
    return jnp.exp(jax.nn.relu(_flat(x) @ p['w1'])) @ p['w2'] @ p['w3']  # <- exp
  _refusal(f, op='exp', marker='# <- exp')


def test_refuses_softmax_on_a_spiking_value():
  def f(p, x):
    return jax.nn.softmax(jax.nn.relu(_flat(x) @ p['w1']) @ p['w3'])  # <- softmax
  # Named by softmax's first operation, its max for stability (see report).
  _refusal(f, op='reduce_max', marker='# <- softmax')


def test_refuses_division_by_a_spiking_value():
  def f(p, x):
    h = jax.nn.relu(_flat(x) @ p['w1'])
    h = h / (1 + h.sum(1, keepdims=True))  # <- div
    return jax.nn.relu(h @ p['w2']) @ p['w3']
  _refusal(f, op='div (a normalisation', marker='# <- div')


def test_refuses_gelu_between_relus():
  def f(p, x):
    h = jax.nn.gelu(jax.nn.relu(_flat(x) @ p['w1']))  # <- gelu
    return jax.nn.relu(h @ p['w2']) @ p['w3']
  # Named by GELU's first non-linear operation, as another activation.
  message = _refusal(f, op='integer_pow', marker='# <- gelu')
  assert 'another activation' in message and 'jax.nn.relu' in message


def test_refuses_a_branch_on_a_spiking_value():
  def f(p, x):
    h = jax.nn.relu(_flat(x) @ p['w1'])
    h = jax.lax.cond(h.sum() > 0,  # <- cond on spikes
                     lambda h: h @ p['w2'], lambda h: -h @ p['w2'], h)
    return jax.nn.relu(h) @ p['w3']
  # Refused at the comparison that computes the predicate, not as a branch.
  _refusal(f, op='comparison (gt)', marker='# <- cond on spikes')


def test_accepts_a_branch_on_the_input_over_spiking_values():
  """A branch chosen by the image takes the same side at every time-step,
  and each side is linear in the spikes: it converts, and the SNN agrees
  with the ANN's branch."""
  def f(p, x):
    h = jax.nn.relu(_flat(x) @ p['w1'])
    h = jax.lax.cond(x.sum() > 0,
                     lambda h: h @ p['w2'], lambda h: -h @ p['w2'], h)
    return jax.nn.relu(h) @ p['w3']
  net, net_vars = cos_jax.trace(f, P, X, levels=4)
  for sign in (1, -1):
    out = cos_jax.evaluate_snn(net, net_vars, sign * X, T=2, rho=2).outputs
    assert out.shape == (2, len(X), 10)
  # The branch taken is the ANN's: negating the image flips the first layer.
  ann = [net.apply(net_vars, sign * X) for sign in (1, -1)]
  assert not np.allclose(ann[0], ann[1])


class _Dropout(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(16)(_flat(x)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(10)(x)


def test_refuses_dropout_in_the_inference_function():
  net = _Dropout()
  variables = net.init(jax.random.key(0), X, train=False)

  def training_mode(v, x):
    return net.apply(v, x, train=True, rngs={'dropout': jax.random.key(1)})  # <- dropout
  message = _refusal(training_mode, variables, op='random operation',
                     marker='# <- dropout')
  assert 'train=False' in message
  # The same net in inference mode converts.
  model, _ = cos_jax.trace(lambda v, x: net.apply(v, x, train=False),
                           variables, X, levels=4)
  assert model.sites == ('_Dropout',)  # one ReLU: its module path alone


def test_refuses_a_function_without_relu():
  message = _refusal(lambda p, x: _flat(x) @ p['w1'] @ p['w2'] @ p['w3'],
                     op='calls no jax.nn.relu')
  assert 'nn.relu' in message


class _MaxPool(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))  # <- max_pool
    return nn.Dense(10)(nn.relu(nn.Dense(16)(_flat(x))))


class _LayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(_flat(x)))
    x = nn.LayerNorm()(x)  # <- LayerNorm
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


@pytest.mark.parametrize('module, op', [
    (_MaxPool, 'reduce_window_max'), (_LayerNorm, 'square (a normalisation')])
def test_refuses_a_flax_layer_and_names_the_module(module, op):
  """The op inside the layer and the module path (``[_MaxPool]``,
  ``[_LayerNorm/LayerNorm_0]``) are named, and the user's line (next
  test)."""
  net = module()
  variables = net.init(jax.random.key(0), X)
  message = _refusal(lambda v, x: net.apply(v, x), variables, op=op)
  assert f'[{module.__name__}' in message, message


@pytest.mark.parametrize('module, marker', [
    (_MaxPool, '# <- max_pool'), (_LayerNorm, '# <- LayerNorm')])
def test_refusal_of_a_flax_layer_names_the_users_line(module, marker):
  net = module()
  variables = net.init(jax.random.key(0), X)
  _refusal(lambda v, x: net.apply(v, x), variables, op='', marker=marker)

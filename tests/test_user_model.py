"""convert.py --model FILE.py:NAME: a user's own JAX network, traced, gets
the same results directory as a zoo run; a file outside the contract is
refused in one line."""

import json
import os
import textwrap

import pytest

from cli_helpers import convert_in_process, expect_usage_error

MODEL_FILE = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np

    def net(p, x):
      h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p['w1'] + p['b1'])
      return h @ p['w2']

    def model():
      rng = np.random.default_rng(0)
      p = {'w1': jnp.asarray(rng.normal(size=(784, 16)) * 0.05, jnp.float32),
           'b1': jnp.full((16,), 0.1, jnp.float32),
           'w2': jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)}
      return {'fn': net, 'variables': p, 'levels': 4, 'thresholds': [1.0]}

    def no_levels():
      return {'fn': net, 'variables': model()['variables']}

    def with_max():
      out = model()
      out['fn'] = lambda p, x: jnp.max(net(p, x), -1, keepdims=True) + net(p, x)
      return out

    def not_finite():
      out = model()
      out['variables']['w2'] = out['variables']['w2'].at[0, 0].set(jnp.nan)
      return out
''')


@pytest.fixture
def model_file(tmp_path):
  path = tmp_path / 'mynet.py'
  path.write_text(MODEL_FILE)
  return str(path)


def test_a_users_model_converts_like_a_zoo_net(model_file, tmp_path, capfd):
  out = tmp_path / 'out'
  code, err = convert_in_process(
      capfd, model=f'{model_file}:model', dataset='fashion_mnist',
      num_examples=64, T=2, rho=2, init='cos,half', output_dir=str(out))
  assert code == 0, err[-2000:]
  for name in ('results.json', 'results.csv', 'accuracy.png',
               'offset_spikes.png', 'accuracy_energy.png'):
    assert (out / name).is_file(), name
  result = json.loads((out / 'results.json').read_text())
  assert result['examples'] == 64
  assert set(result['curves']) == {'cos', 'half'}
  assert result['model'] == 'mynet.py:model'
  assert os.path.isfile(model_file)  # the user's file is untouched


@pytest.mark.parametrize('spec,field,words', [
    ('{f}:nope', 'model', ['no function', 'nope']),
    ('{f}', 'model', ['FILE.py:NAME']),
    ('{f}:no_levels', 'model', ['levels']),
    ('{f}:with_max', 'model', ['reduce_max', 'mynet.py']),
    ('{f}:not_finite', 'model', ['non-finite', 'w2']),
])
def test_a_model_outside_the_contract_is_refused(model_file, tmp_path, capfd,
                                                 spec, field, words):
  code, err = convert_in_process(
      capfd, model=spec.format(f=model_file), dataset='fashion_mnist',
      output_dir=str(tmp_path / 'out'))
  expect_usage_error(err, code, f'--{field}', *words)
  assert not (tmp_path / 'out').exists()


def test_a_model_needs_a_dataset(model_file, tmp_path, capfd):
  code, err = convert_in_process(capfd, model=f'{model_file}:model',
                                 output_dir=str(tmp_path / 'out'))
  expect_usage_error(err, code, '--dataset')


def test_the_nnx_example_converts_through_convert_py(tmp_path, capfd,
                                                      monkeypatch):
  """examples/byom_nnx.py:model, the contract's worked example: a saved NNX
  network (untrained here: the file format and the path are what is tested)
  gives a results directory like a zoo run's."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'examples', 'byom_nnx.py')
  spec = importlib.util.spec_from_file_location('byom_nnx', path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  _, params, stats, _ = example.split((4, 8))
  example.save(str(tmp_path / 'net'), (4, 8), 4, params, stats,
               {'relu_0': 1.0, 'relu_1': 1.5})
  monkeypatch.setenv('BYOM_NNX_DIR', str(tmp_path / 'net'))
  out = tmp_path / 'out'
  code, err = convert_in_process(
      capfd, model=f'{path}:model', dataset='fashion_mnist', num_examples=64,
      T=2, rho=2, init='cos', output_dir=str(out))
  assert code == 0, err[-2000:]
  result = json.loads((out / 'results.json').read_text())
  assert result['model'] == 'byom_nnx.py:model'
  assert 'cost' in result
  assert sorted(result['layers']['after']) == ['relu_0', 'relu_1']

"""Runs notebooks/cos_jax_colab.ipynb top to bottom on 2 and 4 XLA CPU devices.

The notebook is executed with nbclient in a fresh ipykernel whose environment
sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (so the kernel's
JAX starts with N CPU devices; this pytest process's own device setup does not
reach it). Parameters are injected the way papermill does it: a cell tagged
``injected-parameters`` right after the cell tagged ``parameters``. The
checkpoint is a tiny one trained here (one epoch on 512 images), so the test
does not depend on the shipped ``pretrained/`` run.
"""

import copy
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'cos_jax_colab.ipynb'

# Small enough for a shared 2-core CPU: one or two batches, short runs.
PARAMETERS = {
    'INSTALL': False,
    'NUM_EXAMPLES': 96,
    'BATCH_PER_DEVICE': 24,
    'RHO': 2,
    'T_MAX': 4,
}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny trained checkpoint shared by all the notebook runs."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from cos_jax import training  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('notebook') / 'fmnist_tiny'
  config = default.get_config()
  config.epochs = 1
  config.num_train_examples = 512
  config.num_test_examples = 500
  config.batch_size = 128
  training.train_and_evaluate(config, str(path))
  return path


def with_parameters(notebook, parameters: dict):
  """A copy of ``notebook`` with a papermill-style injected-parameters cell."""
  notebook = copy.deepcopy(notebook)
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  source = '\n'.join(f'{name} = {value!r}' for name, value in
                     parameters.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata['tags'] = ['injected-parameters']
  cell['id'] = 'injected-parameters'
  notebook.cells.insert(index + 1, cell)
  return notebook


def text_output(notebook) -> str:
  """All stream / text/plain output of the executed notebook, in order."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        parts.append(output.text)
      elif 'data' in output and 'text/plain' in output.data:
        parts.append(output.data['text/plain'] + '\n')
  return ''.join(parts)


def test_notebook_has_parameters_and_guarded_install():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  tagged = [c for c in notebook.cells
            if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1
  for name in ('INSTALL', 'WORKDIR', 'NUM_EXAMPLES', 'BATCH_PER_DEVICE',
               'RHO', 'T_MAX'):
    assert re.search(rf'^{name} = ', tagged[0].source, re.M), name
  assert re.search(r'^RHO = 8\b', tagged[0].source, re.M)
  assert re.search(r'^T_MAX = 32\b', tagged[0].source, re.M)
  code = '\n'.join(c.source for c in notebook.cells if c.cell_type == 'code')
  # Every pip call goes through `if INSTALL:` and a subprocess (no magics, so
  # it runs the same under nbclient and papermill).
  assert '%pip' not in code and '!pip' not in code
  install = [c.source for c in notebook.cells if c.cell_type == 'code'
             and re.search(r"['\"]pip['\"]", c.source)]
  assert len(install) == 1
  assert 'if INSTALL:' in install[0]
  assert "sys.executable, '-m', 'pip'" in install[0]
  assert all(not c.get('outputs') for c in notebook.cells
             if c.cell_type == 'code'), 'commit the notebook without outputs'


@pytest.mark.parametrize('devices', [2, 4])
def test_notebook_runs_on_all_devices(workdir, devices):
  notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4),
                             {**PARAMETERS, 'WORKDIR': str(workdir)})
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(
      [f for f in env.get('XLA_FLAGS', '').split()
       if not f.startswith('--xla_force_host_platform_device_count')] +
      [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
  env.pop('COS_JAX_ROOT', None)  # the notebook must find the root by itself
  client = nbclient.NotebookClient(
      notebook, kernel_name='python3', timeout=300,
      resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  # env reaches KernelManager.start_kernel, i.e. the kernel process.
  client.execute(env=env)

  errors = [o for c in notebook.cells for o in c.get('outputs', [])
            if o.output_type == 'error']
  assert not errors, errors
  out = text_output(notebook)
  # The kernel is this interpreter (the venv's), not whatever is on PATH.
  python = re.search(r'^Python: (.+)$', out, re.M).group(1).strip()
  assert os.path.abspath(python) == os.path.abspath(sys.executable)
  assert f'jax.device_count() = {devices}\n' in out
  assert 'pmap == sharded: True' in out
  assert 'global-array calibration == sharded: True' in out
  assert 'PyTorch resnet20 (L=4, 10 classes) as an SNN: outputs (4, ' in out
  assert 'fused == calibrate + simulate: True' in out
  accuracy = float(re.search(
      rf'^COS accuracy at T={PARAMETERS["T_MAX"]}: ([0-9.]+)$', out,
      re.M).group(1))
  assert 0.0 <= accuracy <= 1.0
  ann = float(re.search(r'^ANN accuracy: ([0-9.]+)$', out, re.M).group(1))
  assert 0.0 <= ann <= 1.0
  images = [o for c in notebook.cells for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # accuracy vs T, offset-spike histogram

"""The documentation against the code: references resolve, examples run.

* **References.** README.md and every docs/*.md name only things that exist:
  - a repository path in backticks (``cos_jax/neuron.py``; a path relative
    to the package, ``models/``, counts) or a link target, resolved from the
    page as GitHub does (``[semantics](docs/semantics.md)``);
  - a bare file name in backticks (``neuron.py``) or a ``.md``/``.py``/
    ``.ipynb`` name in running text (``HISTORY.md``): some tracked file's
    name;
  - every ``cos_jax.x`` / ``cos_jax.x.y`` name anywhere in the text, code
    blocks included: the longest importable module prefix imports and
    ``getattr`` finds the rest.
  Paths under the directories the programs write (``results/``, ``runs/``, a
  workdir's ``best/``) and their output files (``results.json``,
  ``log.jsonl``, ...) are not checked. :data:`BROKEN` holds one deliberately
  broken snippet per kind of reference: the checker must flag each.
  Also: every number of the README appears in docs/ (which gives its
  command), docs/architecture.md names every module and benchmark, and
  docs/api.md every public name.

* **Docstring examples.** Every public function and class (the names of
  ``cos_jax.__all__`` other than its two modules, plus ``cos_jax.models.get``
  and ``cos_jax.interop.load_torch_checkpoint``) has an ``Example:`` section
  in doctest form (``>>>``), and all of them run here, with ELLIPSIS and
  NORMALIZE_WHITESPACE. Each example starts from a copy of one namespace,
  :func:`doctest_globals`, and may use without importing them:
  - ``cos_jax``, ``jax``, ``jnp`` (``jax.numpy``), ``np`` (``numpy``);
  - ``model = cos_jax.models.get('small', num_classes=10, levels=4)``, the
    default small net (5 IF layers, 28×28×1 images, θ = 8 at init);
  - ``variables``: its ``{'params', 'batch_stats'}``,
    ``jax.jit(model.init)(jax.random.key(0), images)``;
  - ``images``: ``[2, 28, 28, 1]`` float32, uniform in [0, 1) (seed 0).
  Examples run from the repository root (they may read ``tests/fixtures/``)
  and must be quick: a second or two each. A new public name without an
  example fails :func:`test_every_public_name_has_an_example`.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cos_jax
from cos_jax import interop, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------- references --

# Directories and file names that the programs write, not the repository.
GENERATED_DIRS = ('results', 'runs', 'best', 'checkpoints', '.venv')
GENERATED_NAMES = {'results.json', 'results.csv', 'accuracy.png',
                   'offset_spikes.png', 'accuracy_energy.png', 'log.jsonl',
                   'config.json'}
# Bare file names checked against the tracked files (other extensions name
# users' or outputs' files: model.pth, results.csv).
CHECKED_EXTENSIONS = ('.py', '.md', '.ipynb', '.toml', '.txt', '.cfg')

_BACKTICKS = re.compile(r'`([^`\n]+)`')
_LINK = re.compile(r'\]\(([^)\s]+)\)')
_FENCE = re.compile(r'^```.*?^```', re.M | re.S)
_DOTTED = re.compile(r'(?<![\w.])cos_jax(?:\.[A-Za-z_]\w*)+')
_PATH_CHARS = re.compile(r'^[\w./-]+$')
# A file name in running text, backticked or not: HISTORY.md, cos_jax/cost.py.
_PROSE_FILE = re.compile(r'(?<![\w./`-])([\w./-]+\.(?:md|py|ipynb))(?![\w`])')


def tracked_files() -> set[str]:
  """The repository's files: git's index plus untracked files not ignored
  (outside a git checkout: every file but build and output directories)."""
  try:
    out = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines()
            if os.path.exists(os.path.join(ROOT, line))}
  except (OSError, subprocess.CalledProcessError):
    files = set()
    for top, dirs, names in os.walk(ROOT):
      dirs[:] = [d for d in dirs if d not in (
          '.git', '.venv', '.pytest_cache', '.hypothesis', '__pycache__',
          'results', 'runs')]
      files |= {os.path.relpath(os.path.join(top, n), ROOT) for n in names
                if n != '.git'}
    return files


def _exists(path: str, files: set[str]) -> bool:
  path = path.rstrip('/')
  for base in ('', 'cos_jax/'):  # docs name modules relative to the package
    full = base + path
    if full in files or any(f.startswith(full + '/') for f in files):
      return True
  return False


def check_path(token: str, files: set[str], here: str = '') -> str | None:
  """Why ``token`` (a backticked string or link target) names no repository
  file, or None when it does or is not a path. ``here``: the directory of the
  page, for relative links."""
  token = token.split('#', 1)[0].strip()
  if not token or not _PATH_CHARS.match(token) or token.startswith(
      ('/', '.', '~', '-')) or '//' in token:
    return None
  if '/' not in token:
    if (not token.endswith(CHECKED_EXTENSIONS) or token in GENERATED_NAMES
        or token.count('.') != 1):
      return None
    names = {os.path.basename(f) for f in files}
    return None if token in names else f'no file named {token}'
  if token.split('/', 1)[0] in GENERATED_DIRS:
    return None
  if _exists(token, files) or (here and _exists(
      os.path.normpath(os.path.join(here, token)), files)):
    return None
  return f'no path {token}'


def check_link(target: str, files: set[str], here: str = '') -> str | None:
  """Why a link target of a page in ``here`` names no repository file (as
  GitHub resolves it: relative to the page), or None."""
  if target.startswith(('http://', 'https://', 'mailto:', '#')):
    return None
  path = os.path.normpath(os.path.join(here, target.split('#', 1)[0]))
  if path in files or any(f.startswith(path + '/') for f in files):
    return None
  return f'link to {target}: no path {path}'


def check_name(dotted: str) -> str | None:
  """Why ``cos_jax.x.y`` does not resolve, or None when it does."""
  parts = dotted.split('.')
  module, i = None, len(parts)
  while i > 0:
    try:
      module = importlib.import_module('.'.join(parts[:i]))
      break
    except ImportError:
      i -= 1
  obj = module
  for attr in parts[i:]:
    if not hasattr(obj, attr):
      return f'{dotted} does not resolve ({".".join(parts[:i])} has no {attr})'
    obj = getattr(obj, attr)
  return None


def problems(text: str, files: set[str], here: str = '') -> list[str]:
  """Every broken reference of a markdown text."""
  found = []
  prose = _FENCE.sub('', text)
  for token in _BACKTICKS.findall(prose):
    found.append(check_path(token, files, here))
  for token in _PROSE_FILE.findall(_BACKTICKS.sub(' ', _LINK.sub('](', prose))):
    found.append(check_path(token, files, here))
  for target in _LINK.findall(prose):
    found.append(check_link(target, files, here))
  for dotted in sorted(set(_DOTTED.findall(text))):
    found.append(check_name(dotted))
  return [p for p in found if p]


def doc_pages() -> list[str]:
  pages = ['README.md'] + sorted(
      os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs'))
      if f.endswith('.md'))
  return pages


@pytest.fixture(scope='module')
def files():
  return tracked_files()


@pytest.mark.parametrize('page', doc_pages())
def test_page_references_resolve(page, files):
  with open(os.path.join(ROOT, page), encoding='utf-8') as f:
    text = f.read()
  found = problems(text, files, os.path.dirname(page))
  assert not found, f'{page}: ' + '; '.join(found)


def test_every_number_of_the_readme_is_in_the_docs():
  """The README summarises; docs/ holds each figure with its command."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    readme = _FENCE.sub('', f.read())
  docs = ''
  for page in doc_pages()[1:]:
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
      docs += f.read()
  numbers = {n.rstrip('.,') for n in
             re.findall(r'(?<![\w.])\d[\d,]*\.?\d*', readme)}
  assert sorted(n for n in numbers if n not in docs) == []


def test_the_figure_data_is_the_results_table():
  """docs/figures/cifar10_resnet20.json holds rows of docs/results.md."""
  with open(os.path.join(ROOT, 'docs', 'figures', 'cifar10_resnet20.json'),
            encoding='utf-8') as f:
    data = json.load(f)
  with open(os.path.join(ROOT, 'docs', 'results.md'), encoding='utf-8') as f:
    text = f.read()
  table = text[text.index('| CIFAR-10 (2k), ResNet-20'):].split('\n\n')[0]
  values = set()
  for line in table.splitlines()[2:]:
    cells = [c.strip().strip('*') for c in line.strip('| ').split('|')]
    values |= {f'{float(c):.2f}' for c in cells[1:]}
  for curve in data['curves'].values():
    assert {f'{a:.2f}' for a in curve['accuracy']} <= values
  assert all('convert.py' in command for command in data['commands'])


def test_figures_script_draws_from_the_data_and_from_results_json():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    figures = importlib.import_module('figures')
  finally:
    sys.path.pop(0)
  with open(os.path.join(ROOT, 'docs', 'figures', 'cifar10_resnet20.json'),
            encoding='utf-8') as f:
    assert figures.figure(json.load(f)).startswith(b'\x89PNG')
  results = {'config': {'rho': 2}, 'ann_accuracy': 0.9, 'curves': {
      'cos': [0.8, 0.9], 'half': [0.5, 0.6, 0.7, 0.8]}}
  data = figures.curves_from_results(results)
  assert data['ann_accuracy'] == 90.0
  assert [c['probe_steps'] for c in data['curves'].values()] == [2, 0]
  assert figures.figure(data).startswith(b'\x89PNG')


def test_the_reference_page_names_every_public_name():
  with open(os.path.join(ROOT, 'docs', 'api.md'), encoding='utf-8') as f:
    text = f.read()
  assert [name for name in public_objects() if f'`{name}' not in text] == []


def test_architecture_names_every_module_and_benchmark(files):
  with open(os.path.join(ROOT, 'docs', 'architecture.md'),
            encoding='utf-8') as f:
    text = f.read()
  named = set(re.findall(r'[\w]+\.py', text))
  code = sorted(f for f in files if f.endswith('.py') and f.startswith(
      ('cos_jax/', 'benchmarks/')))
  assert [f for f in code if os.path.basename(f) not in named] == []


# Each snippet names one thing that does not exist; the checker must see it.
BROKEN = {
    'path in backticks': 'See `cos_jax/no_such_module.py`.',
    'package-relative path': 'The neuron lives in `models/neuronz.py`.',
    'bare file name': 'As `HISTORY.md` §2 says.',
    'file name in running text': 'The claim in HISTORY.md does not hold.',
    'relative link': 'Read [the manual](docs/no_such_page.md).',
    'link from docs/': 'Read [semantics](semantic.md).',
    'link relative to the wrong page': 'Read [cost](docs/cost.md).',
    'public function': 'Call `cos_jax.calibrate_layers(currents, 1.0)`.',
    'submodule attribute': 'The table `cos_jax.methods.METHOD`.',
    'submodule': 'Run `python -m cos_jax.lunch`.',
    'name in a code block': '```python\nv0 = cos_jax.calibrated(model)\n```',
}
GOOD = ('`cos_jax/neuron.py`, `neuron.py`, `models/`, `configs/convert.py`, '
        '[semantics](semantics.md), `results/x/results.json`, `model.pth`, '
        '`cos_jax.calibrate(model, v, x, rho=8)`, `cos_jax.methods.METHODS`, '
        '`python -m cos_jax.launch`, `cos_jax.models.get`, '
        '```\ncos_jax.interop.load_torch_checkpoint(path)\n```')


@pytest.mark.parametrize('kind', list(BROKEN))
def test_a_broken_reference_is_caught(kind, files):
  assert len(problems(BROKEN[kind], files, 'docs')) == 1


def test_good_references_pass(files):
  assert problems(GOOD, files, 'docs') == []


# ----------------------------------------------------------------- examples --

def doctest_globals() -> dict:
  """The namespace every docstring example runs in (module docstring)."""
  model = models.get('small', num_classes=10, levels=4)
  images = jnp.asarray(
      np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  return dict(cos_jax=cos_jax, jax=jax, jnp=jnp, np=np, model=model,
              variables=variables, images=images)


def public_objects() -> dict:
  """Every public function and class, by its public name."""
  objects = {f'cos_jax.{name}': getattr(cos_jax, name)
             for name in cos_jax.__all__
             if not isinstance(getattr(cos_jax, name), type(cos_jax))}
  objects['cos_jax.models.get'] = models.get
  objects['cos_jax.interop.load_torch_checkpoint'] = (
      interop.load_torch_checkpoint)
  return objects


def examples() -> list[doctest.DocTest]:
  finder = doctest.DocTestFinder(recurse=False)
  tests = []
  for name, obj in public_objects().items():
    tests += [t for t in finder.find(obj, name, globs={}) if t.examples]
  return tests


def test_every_public_name_has_an_example():
  with_examples = {t.name for t in examples()}
  missing = sorted(set(public_objects()) - with_examples)
  assert missing == []
  for name, obj in public_objects().items():
    assert 'Example:' in obj.__doc__, name


def test_docstring_examples_run(monkeypatch):
  monkeypatch.chdir(ROOT)
  globs = doctest_globals()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE)
  tests = examples()
  for test in tests:
    test.globs = dict(globs)
    runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.failed == 0
  assert results.attempted >= len(public_objects())

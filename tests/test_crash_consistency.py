"""Crash consistency of training: a SIGKILL at every phase of an epoch end
(and at a checkpoint inside an epoch), then a rerun, gives the same
checkpoints, the same best/ and the same log.jsonl as a run never killed.

The kills are exact: train.py SIGKILLs itself at the phase named by
$COS_JAX_CRASH_AT (cos_jax.training.crash_point). Timing fields of the log
(epoch_seconds, images_per_second) are left out of the comparison; every
array is compared bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cos_jax import checkpoints
from cli_helpers import TINY_TRAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
# 192 train examples / batch 32 = 6 steps per epoch, 2 epochs; a checkpoint
# every 4 steps; 100 test examples in eval batches of 40.
TINY = TINY_TRAIN_FLAGS
# Phases of cos_jax.training.end_of_epoch, in order, at the end of epoch 1
# (step 6) and of the run (step 12), and the checkpoint inside epoch 2.
CRASH_POINTS = [f'{phase}@6' for phase in (
    'epoch_trained', 'evaluated', 'best_saving', 'best_saved', 'logged',
    'checkpoint_saving', 'checkpoint_saved')] + [
        'periodic_checkpoint@8', 'logged@12', 'checkpoint_saving@12']


def _env(tmp_root: Path, crash_at: str | None = None) -> dict:
  env = dict(os.environ, COS_JAX_OFFLINE='1', PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('XLA_FLAGS', None)
  env.pop('COS_JAX_CRASH_AT', None)
  if crash_at:
    env['COS_JAX_CRASH_AT'] = crash_at
  return env


def _start(workdir: Path, env: dict) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'train.py'), f'--workdir={workdir}',
       '--host_devices=2', *TINY], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _arrays(directory: Path) -> dict:
  """Every finalized checkpoint in ``directory``: step -> restored items."""
  out = {}
  manager = checkpoints.Manager(str(directory), max_to_keep=100, create=False)
  try:
    for step in checkpoints.finalized_steps(str(directory)):
      digests = manager.stored_digests(step)
      out[step] = {'digests': digests,
                   'metadata': (manager.restore_metadata(step)
                                if (directory / str(step) / 'metadata')
                                .is_dir() else None)}
  finally:
    manager.close()
  return out


def _log(workdir: Path) -> list[dict]:
  timing = ('epoch_seconds', 'images_per_second')
  return [{k: v for k, v in json.loads(line).items() if k not in timing}
          for line in (workdir / 'log.jsonl').read_text().splitlines()]


def _state(workdir: Path):
  # restore() checks the stored arrays against their digests, so equal
  # digests below mean equal arrays, bit for bit.
  for which in ('latest', 'best'):
    assert checkpoints.restore(str(workdir), which=which).verified
  return {'checkpoints': _arrays(workdir / 'checkpoints'),
          'best': _arrays(workdir / 'best'), 'log': _log(workdir)}


def test_kill_at_every_epoch_end_phase_then_resume(tmp_path):
  reference = _start(tmp_path / 'reference', _env(tmp_path))
  assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
  expected = _state(tmp_path / 'reference')
  # The digests cover every saved array, bit for bit; check they are there.
  assert all(item['digests'] for item in expected['checkpoints'].values())
  assert sorted(expected['checkpoints']) == [6, 8, 12]

  points = list(CRASH_POINTS)
  if 12 in expected['best']:  # epoch 2 improved: its best save can be hit
    points.append('best_saving@12')
  killed = {point: _start(tmp_path / point.replace('@', '_'),
                          _env(tmp_path, point)) for point in points}
  for point, proc in killed.items():
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr.read())
  resumed = {point: _start(tmp_path / point.replace('@', '_'), _env(tmp_path))
             for point in points}
  for point, proc in resumed.items():
    assert proc.wait(timeout=600) == 0, (point, proc.stderr.read()[-3000:])
    state = _state(tmp_path / point.replace('@', '_'))
    assert state['log'] == expected['log'], point
    assert state['best'] == expected['best'], point
    assert state['checkpoints'] == expected['checkpoints'], point

"""The launcher's supervision (cos_jax.launch.supervise) on stand-in processes."""

import subprocess
import sys

from cos_jax import launch


def _processes(*programs):
  return [subprocess.Popen([sys.executable, '-c', program],
                           stderr=subprocess.PIPE) for program in programs]


def test_output_about_a_peer_that_then_dies_is_not_forwarded(capfd):
  """Process 0 reports the lost peer before the launcher can see the peer's
  death (a killed process's sockets close before it can be reaped): only the
  launcher's line names what happened."""
  procs = _processes(
      'import sys, time; sys.stderr.write("Traceback: lost peer\\n"); '
      'sys.stderr.flush(); time.sleep(30)',
      'import os, signal, time; time.sleep(0.3); '
      'os.kill(os.getpid(), signal.SIGKILL)')
  assert launch.supervise(procs, grace=5) == 2
  err = capfd.readouterr().err
  assert 'lost peer' not in err
  assert err.strip().splitlines()[-1].startswith(
      'launch: error: process 1 of 2 ended with signal SIGKILL')


def test_process_0_output_is_forwarded_whole(capfd):
  procs = _processes('import sys; sys.stderr.write("step 1\\rstep 2\\n")',
                     'pass')
  assert launch.supervise(procs, grace=5) == 0
  assert capfd.readouterr().err == 'step 1\rstep 2\n'


def test_process_0_own_failure_is_shown_with_the_launcher_line(capfd):
  procs = _processes(
      'import time; time.sleep(0.2); raise ValueError("bad input")',
      'import time; time.sleep(30)')
  assert launch.supervise(procs, grace=5) == 2
  err = capfd.readouterr().err
  assert 'ValueError: bad input' in err.splitlines()[-2]
  assert err.splitlines()[-1].startswith(
      'launch: error: process 0 of 2 ended with exit code 1')

r"""Runs a cos_jax program as several JAX processes on this machine.

  python -m cos_jax.launch --processes 2 --devices_per_process 2 -- \
      convert.py --rho 8

starts ``--processes`` copies of the program on loopback, each with
``--coordinator_address=127.0.0.1:<port> --num_processes=N --process_id=i
--host_devices=D``: one global mesh of N·D devices, exactly what N hosts of a
TPU pod slice or a SLURM job form (docs/many-hosts.md has their commands).
Process 0's output is shown, a second late; the others' is kept back. If a
process fails (anything but a refusal, exit code 2), the others are stopped
and one line says which failed and how (what process 0 said in the second
before a peer failed is dropped: it is about the lost peer); nobody waits for
a peer that is gone.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

PROGRAM = 'launch'
# How long process 0's output waits before it is forwarded (see supervise).
_HOLD_SECONDS = 1.0


def _fail(message: str) -> int:
  sys.stderr.write(f'{PROGRAM}: error: {" ".join(message.split())}\n')
  sys.stderr.flush()
  return 2


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f'signal {signal.Signals(-code).name}'
    except ValueError:
      return f'signal {-code}'
  return f'exit code {code}'


def _parse(argv: list[str]):
  parser = argparse.ArgumentParser(
      prog='python -m cos_jax.launch', description=__doc__.split('\n\n')[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--processes', type=int, default=2,
                      help='JAX processes to start (N).')
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='XLA CPU devices per process (D).')
  parser.add_argument('--port', type=int, default=0,
                      help='coordinator port on 127.0.0.1 (0: a free one).')
  parser.add_argument('--grace_seconds', type=float, default=5.0,
                      help='how long stopped processes get before SIGKILL.')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='-- program.py [its flags]')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if args.processes < 1 or args.devices_per_process < 1:
    raise ValueError('--processes and --devices_per_process must be >= 1')
  if not command:
    raise ValueError('give the program after --, e.g. -- convert.py --rho 8')
  if command[0].endswith('.py') and not os.path.isfile(command[0]):
    raise ValueError(f'no program {command[0]}: run from the repository root')
  return args, command


def _start(args, command: list[str]) -> list[subprocess.Popen]:
  port = args.port or free_port()
  env = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
  env.pop('XLA_FLAGS', None)  # --host_devices sets the device count
  program = ([sys.executable, command[0]] if command[0].endswith('.py')
             else [sys.executable, '-m', command[0]])
  procs = []
  for i in range(args.processes):
    procs.append(subprocess.Popen(
        program + command[1:] + [
            f'--coordinator_address=127.0.0.1:{port}',
            f'--num_processes={args.processes}', f'--process_id={i}',
            f'--host_devices={args.devices_per_process}'],
        env=env, stdout=None if i == 0 else subprocess.DEVNULL,
        stderr=subprocess.PIPE))
  return procs


def _crashed(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
  """(index, code) of a process that failed other than by refusing.

  When several have, one killed by a signal is named first: its peers' errors
  follow from losing it.
  """
  failed = [(i, code) for i, code in enumerate(p.poll() for p in procs)
            if code not in (None, 0, 2)]
  return min(failed, key=lambda f: (f[1] >= 0, f[0])) if failed else None


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.time() + grace
  for proc in procs:
    try:
      proc.wait(max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _last_line(tail: bytes) -> str:
  lines = [line for line in tail.decode(errors='replace').splitlines()
           if line.strip()]
  return lines[-1].split('\r')[-1].strip() if lines else ''


def supervise(procs: list[subprocess.Popen], grace: float) -> int:
  """Forwards process 0's stderr until everyone is done; stops all on a
  crash, or when one refused (exit code 2) and the others still run after
  ``grace`` seconds (they would wait for it in a collective). Returns the
  exit code of the launch."""
  tails = [b''] * len(procs)
  selector = selectors.DefaultSelector()
  for i, proc in enumerate(procs):
    os.set_blocking(proc.stderr.fileno(), False)
    selector.register(proc.stderr, selectors.EVENT_READ, i)
  refused_at = None
  mid_line = False  # process 0's forwarded output ended inside a line
  held = []  # (arrival time, chunk) of process 0's output not yet forwarded

  def forward(until: float) -> None:
    nonlocal mid_line
    while held and held[0][0] <= until:
      chunk = held.pop(0)[1]
      sys.stderr.buffer.write(chunk)
      sys.stderr.flush()
      mid_line = not chunk.endswith((b'\n', b'\r'))

  def report(crashed: tuple[int, int]) -> int:
    _stop(procs, grace)
    i, code = crashed
    if i == 0:  # process 0's own failure: what it said is the story
      forward(float('inf'))
    last = _last_line(tails[i])
    detail = f' (it said: {last[:200]})' if last else ''
    if mid_line:  # e.g. a progress bar: the error gets a line of its own
      sys.stderr.write('\n')
    return _fail(f'process {i} of {len(procs)} ended with {_describe(code)}'
                 f'{detail}; stopped the other processes')

  while selector.get_map():
    for key, _ in selector.select(timeout=0.2):
      i = key.data
      chunk = key.fileobj.read() or b''
      if not chunk:
        selector.unregister(key.fileobj)
        continue
      tails[i] = (tails[i] + chunk)[-4096:]
      if i == 0:
        held.append((time.time(), chunk))
    crashed = _crashed(procs)
    if crashed is None:
      # A killed peer's sockets close before its parent can see it exit, so
      # process 0 may report the lost peer first: its output waits a moment,
      # and is dropped if a peer turns out to have crashed meanwhile.
      forward(time.time() - _HOLD_SECONDS)
    else:
      return report(crashed)
    refused = [i for i, p in enumerate(procs) if p.poll() == 2]
    if refused and refused_at is None:
      refused_at = time.time()
    if (refused and any(p.poll() is None for p in procs)
        and time.time() - refused_at > grace):
      _stop(procs, grace)
      forward(float('inf'))
      if procs[0].returncode != 2:  # process 0 did not say it: pass it on
        sys.stderr.write(('\n' if mid_line else '')
                         + _last_line(tails[refused[0]]) + '\n')
      return 2
  codes = [proc.wait() for proc in procs]
  crashed = _crashed(procs)
  if crashed is not None:  # as the streams closed
    return report(crashed)
  forward(float('inf'))
  return codes[0] if codes[0] else max(codes)


def main(argv: list[str] | None = None) -> int:
  try:
    args, command = _parse(sys.argv[1:] if argv is None else argv)
  except ValueError as e:
    return _fail(str(e))
  procs = _start(args, command)
  try:
    return supervise(procs, args.grace_seconds)
  except KeyboardInterrupt:
    _stop(procs, args.grace_seconds)
    return 130


if __name__ == '__main__':
  sys.exit(main())

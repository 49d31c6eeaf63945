"""What train.py and convert.py share: flags into a config, one-line errors.

Both programs take a config file (``--config``, ml_collections) whose fields
can be overridden on the command line. Every problem a user can fix is
reported as one line on stderr, ``<program>: error: <what is wrong and how to
fix it>``, with exit code 2, before any work is done and without touching
earlier results. The machine's own refusals (a full or read-only disk, a name
too long, a busy path, a corrupted prepared dataset) are one line with exit
code 1; Ctrl-C and SIGTERM one line with 130 and 143. Each leaves the earlier
results and checkpoints as they were (every write is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
from typing import NoReturn

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from cos_jax import runtime
from cos_jax.checkpoints import CheckpointError
from cos_jax.data import DatasetUnavailableError
from cos_jax.metrics_log import DivergedError
from cos_jax.settings import SettingsError
from cos_jax.train_config import ConfigError, first_line

# Errors whose message tells the user what to change.
USAGE_ERRORS = (ConfigError, CheckpointError, DatasetUnavailableError,
                SettingsError, DivergedError, runtime.BusyError)


# The operating system's refusals a user can act on: exit code 1, one line.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                      errno.EPERM, errno.ENAMETOOLONG, errno.EBUSY, errno.EIO,
                      errno.ENOTDIR, errno.EISDIR, errno.EXDEV)
# The same refusals as other libraries word them (Orbax/TensorStore, TF).
_ENVIRONMENT_TEXTS = tuple(os.strerror(n) for n in ENVIRONMENT_ERRNOS)
# TensorFlow's errors for a corrupted or unwritable prepared dataset.
_DATA_ERRORS = {
    'DataLossError': 'a prepared dataset file is truncated or corrupted',
    'PermissionDeniedError': 'the dataset directory is not writable',
}


# How a program spells a config field on its command line (convert.py has
# a flag per field, --rho; train.py only --config.<field>).
_FIELD_FLAGS = {'train.py': '--config.{}'}


def field_flag(program: str, field: str) -> str:
  """The flag that sets config ``field`` in ``program`` (``config`` itself
  is always ``--config``)."""
  if field == 'config':
    return '--config'
  return _FIELD_FLAGS.get(program, '--{}').format(field)


def environment_error(e: BaseException) -> str | None:
  """One line for an error of the machine rather than of the settings (a
  full or read-only disk, a name too long, a corrupted prepared dataset),
  found anywhere in ``e``'s chain of causes; None for any other error."""
  seen = e
  for _ in range(16):
    if seen is None:
      break
    name = type(seen).__name__
    if isinstance(seen, OSError) and seen.errno in ENVIRONMENT_ERRNOS:
      where = seen.filename or ''
      return f'{seen.strerror or os.strerror(seen.errno)}' + (
          f': {where}' if where else '') + (
          '; nothing earlier was overwritten, free space or pick another '
          'path and rerun')
    if name in _DATA_ERRORS:
      # TensorFlow wraps the cause in its function and op names.
      text = re.sub(r'\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\]', '', str(seen))
      return (f'{_DATA_ERRORS[name]} ({name}: {first_line(text, 200)}): '
              'delete the dataset\'s folder under the TFDS data directory '
              '(--data_dir or $TFDS_DATA_DIR) and rerun to prepare it again')
    text = first_line(seen, 300)
    hit = next((t for t in _ENVIRONMENT_TEXTS if t in text), None)
    if hit:
      return (f'{hit} ({name}: {text}); nothing earlier was overwritten, '
              'free space or pick another path and rerun')
    seen = seen.__cause__ or seen.__context__
  return None


def fail(program: str, message: str, code: int = 2) -> NoReturn:
  """Writes ``<program>: error: <message>`` (one line) and exits with
  ``code`` (2: a setting to fix)."""
  message = ' '.join(str(message).split())
  sys.stderr.write(f'{program}: error: {message}\n')
  sys.stderr.flush()
  if jax.distributed.is_initialized():
    # Every process refuses the same settings; nothing was written, and
    # JAX's shutdown barrier would wait for peers that are leaving too.
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def define_config(program: str, path: str, help_text: str):
  """``config_flags.DEFINE_config_file('config', path)``, one-line errors.

  ml_collections applies ``--config.field=value`` overrides while defining
  the flag, so an unknown field fails here, before ``app.run``.
  """
  try:
    return config_flags.DEFINE_config_file('config', path, help_text,
                                           lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections wraps the KeyError of the name, quotes included.
    field = first_line(e, 300).strip('\'"')
    fail(program, f'--config.{field}: no such config field. See '
         f'{os.path.relpath(path)} for the fields')


_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, bool: flags.DEFINE_bool}


def define_field_flags(config, source: str) -> dict:
  """One absl flag per top-level field of ``config``: ``--rho 4`` sets
  ``config.rho`` (as ``--config.rho=4`` does, and it wins over it).

  Returns the flag holders, for :func:`apply_field_flags`.
  """
  holders = {}
  for name in config:
    kind = config.get_type(name)
    if kind in _DEFINE:
      holders[name] = _DEFINE[kind](name, None, f'Sets {name} (default '
                                    f'{config[name]!r}; see {source}).')
  return holders


def apply_field_flags(config, holders: dict) -> None:
  """Copies the field flags given on the command line into ``config``."""
  for name, holder in holders.items():
    if holder.present:
      config[name] = holder.value


def check_config_type(config, defaults) -> None:
  """Refuses a ``--config`` file whose get_config() returned something
  other than a ConfigDict with every field of ``defaults`` (the program's
  own config file).

  Raises:
    SettingsError('config', ...): one line naming what is wrong.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise SettingsError('config', f'get_config() returned '
                        f'{type(config).__name__}, not an '
                        'ml_collections.ConfigDict: return one')
  missing = [name for name in defaults if name not in config]
  if missing:
    raise SettingsError('config', f'has no field {missing[0]!r} (of '
                        f'{len(missing)} missing): start from the program\'s '
                        'own config file and change its fields')


def flags_parser(program: str, defaults=None):
  """An ``app.run`` flags parser with one-line errors.

  Loads the config (so a missing file, an unknown field or, given the
  program's ``defaults``, a config of the wrong type fails here, before any
  work) and refuses positional arguments.
  """
  def parse(argv: list[str]) -> list[str]:
    # ml_collections warns through absl before its flags are parsed: keep
    # stderr to the one line (--verbosity, once parsed, wins).
    logging.set_verbosity(logging.ERROR)
    try:
      rest = flags.FLAGS(argv)
      if 'config' in flags.FLAGS:
        config = flags.FLAGS['config'].value
        if defaults is not None:
          try:
            check_config_type(config, defaults)
          except SettingsError as e:
            fail(program, f'{field_flag(program, e.field)} {e.message}')
        config.keys()  # a failed config load raises
    except Exception as e:  # pylint: disable=broad-except
      # ml_collections puts the cause (e.g. "No such file") on the last line.
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      fail(program, f'{lines[-1] if lines else type(e).__name__}. See python '
           f'{program} --helpshort')
    if len(rest) > 1:
      fail(program, f'unexpected arguments {" ".join(rest[1:])}: pass '
           'settings as flags, e.g. --config.epochs=3')
    return rest
  return parse


def define_process_flags() -> dict:
  """The flags of a run over several processes (one per host, or several on
  one machine: ``python -m cos_jax.launch``). Returns their holders."""
  return {
      'coordinator_address': flags.DEFINE_string(
          'coordinator_address', None, 'Multi-process: host:port of process '
          '0 (or $JAX_COORDINATOR_ADDRESS), for jax.distributed.initialize.'),
      'num_processes': flags.DEFINE_integer(
          'num_processes', None, 'Multi-process: how many processes.',
          lower_bound=1),
      'process_id': flags.DEFINE_integer(
          'process_id', None, 'Multi-process: the index of this process.',
          lower_bound=0),
      'distributed': flags.DEFINE_bool(
          'distributed', False, 'Multi-process with what JAX detects by '
          'itself (a TPU pod slice, SLURM, Open MPI): every host runs the '
          'same command.'),
  }


def start(host_devices: int, process_flags: dict) -> None:
  """Quiet logs (unless --verbosity is given), one XLA device per core, and
  the multi-process runtime when asked for (flags or JAX's environment)."""
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every file it writes (INFO) and TFDS warns about benign
    # things; keep stderr for errors. --verbosity=0 shows everything.
    logging.set_verbosity(logging.ERROR)
  runtime.use_all_host_cores(host_devices)
  explicit = {name: process_flags[name].value for name in
              ('coordinator_address', 'num_processes', 'process_id')}
  if (process_flags['distributed'].value or any(
      v is not None for v in explicit.values())
      or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    # A process that loses its peers aborts after the heartbeat timeout
    # instead of waiting forever in a collective.
    jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=30)
  elif threading.current_thread() is threading.main_thread():
    # One process: SIGTERM ends it with one line and 143, as Ctrl-C does.
    # Under a launcher SIGTERM means a peer failed, and the launcher says so.
    runtime.stop_on_signals()


def _stopped(program: str, signum: int) -> NoReturn:
  what = ('interrupted (Ctrl-C)' if signum == signal.SIGINT
          else 'terminated (SIGTERM)')
  fail(program, f'{what}; earlier results and checkpoints are as they were',
       128 + signum)


@contextlib.contextmanager
def one_line_errors(program: str):
  """Turns the errors a user can fix into :func:`fail` (exit 2), the
  machine's (:func:`environment_error`) into exit 1, Ctrl-C and SIGTERM into
  130 and 143; others propagate."""
  try:
    yield
  except SettingsError as e:
    fail(program, f'{field_flag(program, e.field)} {e.message}')
  except USAGE_ERRORS as e:
    fail(program, first_line(e, 500))
  except KeyboardInterrupt:
    _stopped(program, signal.SIGINT)
  except runtime.Terminated:
    _stopped(program, signal.SIGTERM)
  except Exception as e:  # pylint: disable=broad-except
    if runtime.stop_signal():  # a library turned the stop into its own error
      _stopped(program, runtime.stop_signal())
    message = environment_error(e)
    if message is None:
      raise
    fail(program, message, 1)

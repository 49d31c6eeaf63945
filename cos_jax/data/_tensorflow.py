"""TensorFlow and TFDS, imported without their C++ start-up lines on stderr.

On many x86 CPUs ``import tensorflow`` writes, through C++ absl logging that
``TF_CPP_MIN_LOG_LEVEL`` does not reach, lines such as ``WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR`` and
``I0000 ... port.cc:153] oneDNN custom operations are on ...``. A program whose
error contract is one line on stderr cannot let those through, so the import
runs with file descriptor 2 redirected to a temporary file; afterwards every
captured line that is not one of these known start-up notices is written back
to stderr (nothing else is hidden), and an import that fails raises with the
captured text attached. Every TensorFlow user in cos_jax imports ``tf`` and
``tfds`` from here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile

# Start-up notices of TensorFlow's C++ runtime (informational, CPU-dependent).
_NOTICES = re.compile(
    r'All log messages before absl::InitializeLog\(\)|oneDNN custom operations'
    r'|This TensorFlow binary is optimized|cpu_feature_guard'
    r'|To enable the following instructions: .* rebuild TensorFlow'
    r'|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning'
    r'|computation placer already registered|absl::InitializeLog')


@contextlib.contextmanager
def _stderr_captured():
  """Redirects fd 2 into a temporary file; yields a list that gets its lines."""
  sys.stderr.flush()
  saved = os.dup(2)
  lines: list[str] = []
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines.extend(capture.read().decode(errors='replace').splitlines())


def _import():
  with _stderr_captured() as lines:
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top
      import tensorflow_datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      error = e
    else:
      error = None
  if error is not None:
    raise ImportError(f'{error} (TensorFlow said: {" | ".join(lines)})')
  others = [line for line in lines if not _NOTICES.search(line)]
  if others:
    sys.stderr.write('\n'.join(others) + '\n')
  return tensorflow, tensorflow_datasets


tf, tfds = _import()


@functools.cache  # once per process
def configure() -> None:
  """Quiets TF's Python logger, keeps TF off accelerators, hides TFDS bars.

  Idempotent. Entry points call it once at start-up; the input pipeline calls
  it before building a dataset, so library users need not.
  """
  tf.get_logger().setLevel('ERROR')
  try:
    # Accelerator memory belongs to JAX; tf.data runs on the host.
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF already initialised its devices elsewhere; nothing we can do.
  tfds.disable_progress_bar()

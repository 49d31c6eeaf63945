"""What cos_jax may overwrite or delete: only what it can prove it wrote.

A conversion's results directory is replaced as a whole (a fresh set swapped
in, the old one deleted), and a training workdir is resumed or, on request,
started over. Both delete files, so both first check that every entry of the
directory is one of the names the program writes, and that the directory
carries the program's marker. A user's files, a ``.git``, a checkpoint, a
symlink or a mount point is never in that set: such a directory is refused in
one line before any work. Nothing here imports JAX.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from typing import Collection

from cos_jax.settings import SettingsError

# Written into every results directory with the results: the proof that a
# later run may replace it.
RESULTS_MARKER = '.cos_jax_results'
# Mount points of the kernel's virtual file systems: nothing to write there.
_VIRTUAL = ('/proc', '/sys', '/dev')
# The longest name made beside an output directory ``name``: the swap's
# ``.<name>.tmp-XXXXXXXX.old`` (runtime.sibling_tempdir, replace_directory).
_SIBLING_EXTRA = len('..tmp-XXXXXXXX.old')


def _under(path: str, root: str) -> bool:
  """Whether ``path`` is ``root`` or inside it (both absolute, resolved)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def foreign_entries(directory: str, ours: Collection[str]) -> list[str]:
  """Entries of ``directory`` that the program did not write, sorted.

  ``ours`` holds names or glob patterns: one ending in '/' is a directory
  the program writes, any other a plain file. A symlink is always foreign.
  """
  out = []
  for name in sorted(os.listdir(directory)):
    mode = os.lstat(os.path.join(directory, name)).st_mode
    wanted = next((p for p in ours if fnmatch.fnmatchcase(name, p.rstrip('/'))
                   ), None)
    if wanted is None or stat.S_ISLNK(mode) or (
        stat.S_ISDIR(mode) != wanted.endswith('/')):
      out.append(name)
  return out


def is_results_dir(directory: str, files: Collection[str]) -> bool:
  """Whether ``directory`` is a results directory cos_jax wrote: a real
  directory (no symlink, no mount point) holding only ``files`` and the
  marker, with the marker or a results.json that convert.py wrote."""
  if (os.path.islink(directory) or not os.path.isdir(directory)
      or os.path.ismount(directory)):
    return False
  if foreign_entries(directory, (*files, RESULTS_MARKER)):
    return False
  if os.path.isfile(os.path.join(directory, RESULTS_MARKER)):
    return True
  try:  # written before the marker existed
    with open(os.path.join(directory, 'results.json')) as f:
      document = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(document, dict) and {'curves', 'table'} <= set(document)


def is_leftover(directory: str, files: Collection[str]) -> bool:
  """Whether ``directory`` (a ``.<out>.tmp-*`` sibling) holds nothing but
  what a killed write of ``files`` leaves: those files, the marker, and
  their ``.*.tmp`` partial copies (runtime.write_atomic)."""
  return (not os.path.islink(directory) and os.path.isdir(directory)
          and not foreign_entries(directory,
                                  (*files, RESULTS_MARKER, '.*.tmp')))


def check_output_dir(path: str, files: Collection[str],
                     protected: Collection[str] = ()) -> str:
  """Refuses an output directory that cos_jax could not prove it wrote.

  Allowed: a new path, an empty directory, or a results directory
  (:func:`is_results_dir`). Refused: a symlink (dangling too), a file, a
  mount point, a path under /proc, /sys or /dev, a name too long for the
  swap's sibling names, the current directory or any directory above it or
  above one of ``protected`` (the checkpoint being converted), and a
  directory holding anything else.

  Returns:
    ``path`` made absolute.

  Raises:
    SettingsError('output_dir', ...): one line saying why.
  """
  refuse = lambda why: SettingsError(
      'output_dir', f'{path} {why}: pass a new or empty directory, or one '
      'that convert.py wrote')
  if os.path.islink(path):
    raise refuse('is a symlink, which cos_jax does not follow')
  absolute = os.path.abspath(path)
  resolved = os.path.join(os.path.realpath(os.path.dirname(absolute)),
                          os.path.basename(absolute))
  if any(_under(resolved, root) for root in _VIRTUAL):
    raise refuse('is on a kernel virtual file system')
  existing = os.path.dirname(resolved)
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing)
  try:
    longest = os.pathconf(existing, 'PC_NAME_MAX')
  except (OSError, ValueError):
    longest = 255
  if len(os.path.basename(resolved)) + _SIBLING_EXTRA > longest:
    raise refuse(f'has a name of {len(os.path.basename(resolved))} '
                 f'characters; at most {longest - _SIBLING_EXTRA} fit the '
                 'names made beside it')
  for what, other in (('the current directory', os.getcwd()),
                      *(('the checkpoint', p) for p in protected if p)):
    if _under(os.path.realpath(other), resolved):
      raise refuse(f'is {what} or a directory above it')
  if not os.path.exists(resolved):
    return absolute
  if not os.path.isdir(resolved):
    raise refuse('exists and is not a directory')
  if os.path.ismount(resolved):
    raise refuse('is a mount point')
  foreign = foreign_entries(resolved, (*files, RESULTS_MARKER))
  if foreign:
    raise refuse(f'holds {foreign[0]!r}, which convert.py did not write')
  if os.listdir(resolved) and not is_results_dir(resolved, files):
    raise refuse(f'has no {RESULTS_MARKER} or results.json of convert.py')
  return absolute

"""Getting a TFDS dataset ready without a network.

:func:`get_builder` returns a prepared ``tfds`` builder: one already prepared in
the data dir; Fashion-MNIST from local IDX files; otherwise a normal TFDS
download, tried only when the download host answers (a download without a
network retries with back-off for minutes before failing).

Offline Fashion-MNIST: Debian's ``dataset-fashion-mnist`` ships the four upstream
IDX ``.gz`` files re-normalised by Debian's strip-nondeterminism (the gzip header's
file name is dropped and its mtime replaced; the deflate stream is untouched), so
their SHA-256 differs from the checksums TFDS registers. :func:`get_builder` puts
the original header back (file name and the upstream mtime, recorded below), which
restores the upstream bytes exactly, and hands the files to TFDS as ``manual_dir``:
TFDS then verifies its own checksums and prepares the dataset without the network.

Offline CIFAR-10: ``cifar10_offline`` (:mod:`cos_jax.data.cifar10_offline`) is
prepared from the bigbench sdist or its task.json in the manual dir
``<data_dir>/downloads/manual``, where ``make cifar10-offline`` puts the sdist.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import tempfile
import threading
from typing import Optional

from cos_jax.data import OFFLINE_ENV, DatasetUnavailableError, dataset_info
from cos_jax.data import cifar10_offline  # Registers the TFDS builder.
from cos_jax.data._tensorflow import tfds

# Debian's `dataset-fashion-mnist` install location (tests monkeypatch this).
FMNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# Env var naming a folder with the four Fashion-MNIST IDX .gz files.
FMNIST_DIR_ENV = 'COS_JAX_FMNIST_DIR'

# Upstream gzip mtimes (seconds since the epoch) of the Fashion-MNIST files as
# registered in TFDS's checksums; Debian replaced them (see module docstring).
_FMNIST_UPSTREAM_MTIME = {
    'train-images-idx3-ubyte.gz': 1504176606,
    'train-labels-idx1-ubyte.gz': 1504176606,
    't10k-images-idx3-ubyte.gz': 1504176627,
    't10k-labels-idx1-ubyte.gz': 1504176627,
}

# Hosts the TFDS builders download from; probed before trying a download.
_DOWNLOAD_HOSTS = {
    'fashion_mnist': ('fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80),
    'cifar10': ('www.cs.toronto.edu', 443),
    'cifar100': ('www.cs.toronto.edu', 443),
}


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _is_offline() -> bool:
  return os.environ.get(OFFLINE_ENV, '').strip().lower() in ('1', 'true', 'yes')


def _can_reach(host: str, port: int, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to host opens within `timeout` seconds.

  Runs in a daemon thread because name resolution has no timeout of its own.
  """
  result = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout + 1.0)
  return bool(result)


@contextlib.contextmanager
def _preparation_lock(data_dir_root: str, name: str):
  """Serialises preparing one dataset across processes (e.g. pytest-xdist)."""
  os.makedirs(data_dir_root, exist_ok=True)
  with open(os.path.join(data_dir_root, f'.cos_jax_{name}.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download_config(**kwargs) -> tfds.download.DownloadConfig:
  # No GCS look-up (network) and no feature statistics (not needed, slower).
  return tfds.download.DownloadConfig(
      try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP, **kwargs)


def _fmnist_source_dir() -> Optional[str]:
  """First of $COS_JAX_FMNIST_DIR, FMNIST_DEBIAN_DIR holding all four files."""
  for folder in (os.environ.get(FMNIST_DIR_ENV), FMNIST_DEBIAN_DIR):
    if folder and all(os.path.isfile(os.path.join(folder, f))
                      for f in _FMNIST_UPSTREAM_MTIME):
      return folder
  return None


def restore_upstream_gzip(data: bytes, filename: str, mtime: int) -> bytes:
  """Re-creates the gzip header that strip-nondeterminism rewrote.

  Args:
    data: a gzip file whose header lacks the original file name.
    filename: the .gz file's name; the header stores it without '.gz'.
    mtime: the original header mtime (seconds since the epoch).

  Returns:
    The bytes with header ``1f 8b 08 08 <mtime> 00 03 <name> 00`` followed by the
    unchanged deflate stream and trailer; `data` itself if it already names a file.
  """
  flags = data[3]
  if data[:3] != b'\x1f\x8b\x08' or flags & 0x08:  # Not gzip, or FNAME present.
    return data
  offset = 10
  if flags & 0x04:  # FEXTRA: 2-byte length, then the field.
    offset += 2 + struct.unpack('<H', data[offset:offset + 2])[0]
  if flags & 0x10:  # FCOMMENT: zero-terminated.
    offset = data.index(b'\x00', offset) + 1
  if flags & 0x02:  # FHCRC.
    offset += 2
  name = filename[:-len('.gz')].encode() + b'\x00'
  header = b'\x1f\x8b\x08\x08' + struct.pack('<I', mtime) + b'\x00\x03'
  return header + name + data[offset:]


def _prepare_fmnist_from_files(builder, source_dir: str) -> None:
  """Prepares `builder` from local IDX .gz files, with TFDS checksum checks."""
  with tempfile.TemporaryDirectory(prefix='cos_jax_fmnist_') as tmp:
    for filename, mtime in _FMNIST_UPSTREAM_MTIME.items():
      with open(os.path.join(source_dir, filename), 'rb') as f:
        data = restore_upstream_gzip(f.read(), filename, mtime)
      with open(os.path.join(tmp, filename), 'wb') as f:
        f.write(data)
    _prepare_or_fail(
        builder, _download_config(manual_dir=tmp,
                                  extract_dir=os.path.join(tmp, 'extracted')),
        f'Fashion-MNIST files in {source_dir}',
        f'pass {FMNIST_DIR_ENV}=<folder with the four original IDX .gz files> '
        '(e.g. from `apt-get install dataset-fashion-mnist`)')


def _prepare_or_fail(builder, config, what: str, fix: str) -> None:
  """builder.download_and_prepare, or one line: what failed, how to fix it."""
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetUnavailableError(_one_line(
        f'{what} could not be prepared ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}); {fix}')) from e


def _manual_dir(data_dir_root: str) -> str:
  """TFDS's default manual dir of a data dir."""
  return os.path.join(data_dir_root, 'downloads', 'manual')


def _prepare_cifar10_offline(builder, data_dir_root: str) -> None:
  """Prepares cifar10_offline from the sdist or task.json in the manual dir."""
  manual_dir = _manual_dir(data_dir_root)
  source = cifar10_offline.find_source(manual_dir)
  if source is None:
    raise DatasetUnavailableError(
        f'cifar10_offline is not prepared in {data_dir_root} and its source '
        f'({cifar10_offline.SDIST_NAME} or task.json) is not in {manual_dir}: '
        f'run `TFDS_DATA_DIR={data_dir_root} make cifar10-offline`')
  _prepare_or_fail(
      builder, _download_config(manual_dir=manual_dir),
      f'cifar10_offline from {source}',
      f'delete {source} and run `TFDS_DATA_DIR={data_dir_root} make '
      'cifar10-offline`')


def _unavailable_message(name: str, data_dir: str) -> str:
  if name == 'fashion_mnist':
    return ('Fashion-MNIST is not available offline: run `apt-get install '
            'dataset-fashion-mnist` or pass --data_dir/'
            f'{FMNIST_DIR_ENV}=<folder with the four IDX .gz files>')
  if name == 'imagenet2012':
    return (f'imagenet2012 is not prepared in {data_dir}: put '
            'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
            f'{data_dir}/downloads/manual/ (or run `tfds build imagenet2012 '
            f'--data_dir {data_dir} --manual_dir <folder with the tars>`)')
  message = (f'{name} is not prepared in {data_dir} and cannot be downloaded '
             f'here: run `tfds build {name} --data_dir {data_dir}` on a machine '
             f'with internet and copy {data_dir}/{name} here (or set '
             'TFDS_DATA_DIR)')
  if name == 'cifar10':
    message += ('; or train on the offline subset of the real CIFAR-10 test '
                'set (8,000 train / 2,000 test images): run '
                f'`TFDS_DATA_DIR={data_dir} make cifar10-offline`, then pass '
                '--config.dataset=cifar10_offline')
  return message


def _download_and_prepare(builder, name: str, data_dir_root: str) -> None:
  """Normal TFDS preparation (download, or ImageNet's manual tars)."""
  host = _DOWNLOAD_HOSTS.get(name)
  if host is not None and (_is_offline() or not _can_reach(*host)):
    raise DatasetUnavailableError(_unavailable_message(name, data_dir_root))
  try:
    builder.download_and_prepare(download_config=_download_config())
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetUnavailableError(
        _unavailable_message(name, data_dir_root)) from e


def _tfds_is_mocked() -> bool:
  """Inside `tfds.testing.mock_data`: preparation is a no-op, data is fake."""
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, '__module__', '') == 'tensorflow_datasets.testing.mocking'


def get_builder(name: str, data_dir: Optional[str] = None
                ) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of `name`, preparing it if needed.

  Order: already prepared in `data_dir` -> (Fashion-MNIST only) local IDX files
  from $COS_JAX_FMNIST_DIR or FMNIST_DEBIAN_DIR -> (cifar10_offline only) its
  source in <data_dir>/downloads/manual, never a download -> TFDS download
  (skipped when $COS_JAX_OFFLINE is set or the download host is unreachable;
  for ImageNet the tars in <data_dir>/downloads/manual). `data_dir=None` means
  $TFDS_DATA_DIR or ~/tensorflow_datasets.

  Raises:
    DatasetUnavailableError: with a one-line message saying what to do.
  """
  dataset_info(name)  # Validates the name.
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared() or _tfds_is_mocked():
    return builder
  root = os.fspath(builder.data_dir_root)
  with _preparation_lock(root, name):
    # Another process may have prepared it while we waited for the lock.
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
    source_dir = _fmnist_source_dir() if name == 'fashion_mnist' else None
    if source_dir is not None:
      _prepare_fmnist_from_files(builder, source_dir)
    elif name == 'cifar10_offline':
      _prepare_cifar10_offline(builder, root)
    else:
      _download_and_prepare(builder, name, root)
    # Reload so that split sizes etc. are read from the prepared files.
    return tfds.builder(name, data_dir=data_dir)



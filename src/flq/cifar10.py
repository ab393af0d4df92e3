"""CIFAR-10, read from its own on-disk format (docs/algorithm.md, Data).

CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html) is 60000 colour
images of 32x32 pixels in 10 classes (airplane, automobile, bird, cat, deer,
dog, frog, horse, ship, truck): 50000 for training, 10000 for testing. This
module reads its "CIFAR-10 python version": the folder ``cifar-10-batches-py/``
from ``cifar-10-python.tar.gz``, holding the pickled batches ``data_batch_1``
.. ``data_batch_5`` (10000 training images each), ``test_batch`` (the 10000
test images) and ``batches.meta`` (the class names; not needed here). Each
batch is a pickled ``dict`` with ``bytes`` keys: ``b"data"`` a ``numpy.uint8``
array ``[N, 3072]`` (per image 1024 red, then 1024 green, then 1024 blue
bytes, each plane 32x32 row-major), ``b"labels"`` a list of N ints in 0..9,
plus ``b"batch_label"`` and ``b"filenames"``. torchvision is not used.

* :func:`search_dirs` / :func:`find_cifar10_dir` look for the batches in the
  configured folder, ``$FLQ_DATA_DIR``, the user cache and the system folders
  (the same order as for Fashion-MNIST, :func:`flq.datasets.search_dirs`).
* :func:`download_cifar10` fetches the official archive, checks its SHA-256,
  and extracts the batches (only regular files under ``cifar-10-batches-py/``).
* :func:`read_batch` reads one batch file, with a restricted unpickler.
* :func:`load_cifar10` ties these together and returns a
  :class:`flq.datasets.Dataset` named ``"cifar10"``.

Security: the batches are Python pickles, and a pickle can run any code when
loaded. They are never read with plain ``pickle.load``: :class:`_BatchUnpickler`
resolves only the few globals a pickled NumPy array needs (``ndarray``,
``dtype``, the array reconstructors, and ``_codecs.encode`` for latin-1 only)
and refuses any other with a :class:`~flq.datasets.DatasetError`.

Every error about the data is a :class:`~flq.datasets.DatasetError` (a
``ValueError``) whose message is one line naming the file;
:class:`~flq.datasets.DatasetNotFoundError` when the batches are nowhere and
were not downloaded.
"""

from __future__ import annotations

import codecs
import functools
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flq import datasets
from flq.datasets import Dataset, DatasetError, DatasetNotFoundError, PathLike

__all__ = [
    "NAME",
    "TITLE",
    "BATCHES_DIR",
    "TRAIN_BATCHES",
    "TEST_BATCH",
    "META_FILE",
    "REQUIRED_FILES",
    "ARCHIVE",
    "BASE_URL",
    "SHA256",
    "ARCHIVE_BYTES",
    "MAX_ARCHIVE_BYTES",
    "DIR_NAMES",
    "SYSTEM_SUBDIR",
    "CHANNELS",
    "IMAGE_SIDE",
    "NUM_CLASSES",
    "read_batch",
    "search_dirs",
    "find_cifar10_dir",
    "download_cifar10",
    "load_cifar10",
    "clear_cifar10_cache",
]

#: The dataset's name (:attr:`flq.datasets.Dataset.name`, the user cache folder).
NAME = "cifar10"
TITLE = "CIFAR-10"
#: The folder the archive extracts to.
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES: Tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
#: The class names; in the archive, but not read (labels are 0..9).
META_FILE = "batches.meta"
#: The files a folder must hold to count as CIFAR-10.
REQUIRED_FILES: Tuple[str, ...] = (*TRAIN_BATCHES, TEST_BATCH)

#: The official archive (https://www.cs.toronto.edu/~kriz/cifar.html).
ARCHIVE = "cifar-10-python.tar.gz"
BASE_URL = "https://www.cs.toronto.edu/~kriz/"
#: SHA-256 of the official ``cifar-10-python.tar.gz`` (MD5 c58f30108f718f92721af3b95e74349a on the page).
SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
#: Size of the official archive, bytes.
ARCHIVE_BYTES = 170498071
#: Refuse a download larger than this (200 MiB; above :data:`flq.datasets.MAX_DOWNLOAD_BYTES`).
MAX_ARCHIVE_BYTES = 200 * 1024 * 1024

#: Sub-folders looked for under ``data_dir`` and ``$FLQ_DATA_DIR``.
DIR_NAMES: Tuple[str, ...] = ("cifar10", "cifar-10")
#: Folder name under each of :data:`flq.datasets.SYSTEM_DIRS`.
SYSTEM_SUBDIR = "cifar-10"

CHANNELS = 3
IMAGE_SIDE = 32
NUM_CLASSES = 10
_ROW_BYTES = CHANNELS * IMAGE_SIDE * IMAGE_SIDE  # 3072


# ---------------------------------------------------------------------------
# Reading one batch
# ---------------------------------------------------------------------------


_LATIN1_NAMES = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: str -> latin-1 bytes only."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"_codecs.encode used with {type(obj).__name__} and {encoding!r}")
    return codecs.encode(obj, "latin-1", errors)


def _array_reconstructors() -> Dict[Tuple[str, str], Callable[..., Any]]:
    """The globals a pickled ndarray names, mapped to the objects themselves
    (never imported by name: ``numpy.core`` is deprecated under NumPy 2)."""
    try:
        from numpy._core import multiarray, numeric  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: Dict[Tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        # protocol <= 4 (the official files: protocol 2, written by Python 2)
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # protocol 5 (a batch re-pickled by NumPy >= 1.16 under Python 3.8+); not in NumPy's type stubs
        allowed[(f"{module}.numeric", "_frombuffer")] = getattr(numeric, "_frombuffer")  # noqa: B009
    return allowed


_ALLOWED_GLOBALS = _array_reconstructors()


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_ALLOWED_GLOBALS`.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused with a
    :class:`DatasetError` naming the file and the global, before anything is
    called. Persistent ids are refused too.
    """

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                datasets._one_line(f"{self._path}: refusing to unpickle global {module}.{name} (not a CIFAR-10 batch)")
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(datasets._one_line(f"{self._path}: refusing a pickle persistent id (not a CIFAR-10 batch)"))


def _entry(batch: Dict[Any, Any], key: str) -> Any:
    """``batch[b"key"]`` (the official files), else ``batch["key"]``."""
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:
        return batch[key]
    raise KeyError(key)


def _as_pixels(data: Any, path: Path) -> np.ndarray:
    """``b"data"`` as a uint8 ``[N, 3072]`` array (a numpy array; also bytes or nested lists)."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) % _ROW_BYTES:
            raise DatasetError(f"{path}: data holds {len(data)} bytes, not a multiple of {_ROW_BYTES}")
        return np.frombuffer(bytes(data), dtype=np.uint8).reshape(-1, _ROW_BYTES)
    if isinstance(data, list):
        if len(data) * _ROW_BYTES > path.stat().st_size:  # rows repeated by reference: a memory bomb
            raise DatasetError(f"{path}: data lists {len(data)} rows, more than the file can hold")
        try:
            arr = np.asarray(data) if data else np.zeros((0, _ROW_BYTES), dtype=np.uint8)
        except ValueError:
            raise DatasetError(f"{path}: data is a ragged list, expected rows of {_ROW_BYTES} bytes") from None
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise DatasetError(f"{path}: data list holds values other than ints 0..255")
        data = arr.astype(np.uint8)
    if not isinstance(data, np.ndarray):
        raise DatasetError(f"{path}: data is a {type(data).__name__}, expected a uint8 array [N, {_ROW_BYTES}]")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        raise DatasetError(
            f"{path}: expected data of uint8 [N, {_ROW_BYTES}], found {data.dtype.name} {list(data.shape)}"
        )
    return data


def _as_labels(labels: Any, n_images: int, path: Path) -> np.ndarray:
    """``b"labels"`` as an int64 ``[N]`` array, checked against ``n_images`` and 0..9."""
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DatasetError(f"{path}: labels is a {type(labels).__name__}, expected a list of ints")
    arr = np.asarray(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"{path}: expected labels as a list of ints, found {arr.dtype.name} {list(arr.shape)}")
    if arr.shape[0] != n_images:
        raise DatasetError(f"{path}: {arr.shape[0]} labels for {n_images} images")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= NUM_CLASSES):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise DatasetError(f"{path}: label {bad} outside 0..{NUM_CLASSES - 1}")
    return arr.astype(np.int64)


def read_batch(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file (``data_batch_<i>`` or ``test_batch``).

    The pickle is read with a restricted unpickler (``encoding="bytes"``; only
    the globals a NumPy array needs, see the module docstring) and must be a
    ``dict`` with ``b"data"``: uint8 ``[N, 3072]`` (a NumPy array; ``bytes``
    or a list of rows are accepted too) and ``b"labels"``: N ints in 0..9.

    Returns ``(pixels, labels)``: ``np.uint8 [N, 3072]`` (the bytes as
    stored, 1024 red, 1024 green, 1024 blue per row) and ``np.int64 [N]``.

    Raises :class:`DatasetError` (one line naming the file) when the file is
    truncated or not such a pickle, names a refused global, or holds wrong
    shapes, types or labels; ``OSError`` when it cannot be read.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        try:
            batch = _BatchUnpickler(fh, p).load()
            if fh.read(1):
                raise DatasetError(f"{p}: bytes after the end of the pickle")
        except DatasetError:
            raise
        except Exception as exc:  # corrupt or truncated data: any error of the unpickler
            raise DatasetError(
                datasets._one_line(f"{p}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})")
            ) from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{p}: the pickle holds a {type(batch).__name__}, expected a dict")
    try:
        data, labels = _entry(batch, "data"), _entry(batch, "labels")
    except KeyError as exc:
        raise DatasetError(f"{p}: no {exc.args[0]!r} entry in the batch dict") from None
    pixels = _as_pixels(data, p)
    return pixels, _as_labels(labels, pixels.shape[0], p)


def _load_split(paths: Sequence[Path]) -> Tuple[np.ndarray, np.ndarray]:
    """The batches in ``paths``, concatenated: float32 ``[N, 3, 32, 32]`` in [0, 1] and int64 ``[N]``, read-only."""
    parts = [read_batch(p) for p in paths]
    raw = np.concatenate([px for px, _ in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([lb for _, lb in parts]) if len(parts) > 1 else parts[0][1]
    # The same 256-entry table as the IDX images (k / 255 in float32): exact and fast.
    x = datasets._PIXEL_LUT[raw.reshape(raw.shape[0], CHANNELS, IMAGE_SIDE, IMAGE_SIDE)]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


# ---------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------


def search_dirs(data_dir: Optional[PathLike] = None) -> List[Path]:
    """Return the folders :func:`find_cifar10_dir` tries, in order.

    1. ``data_dir``, ``data_dir/cifar10``, ``data_dir/cifar-10`` (when ``data_dir`` is given);
    2. ``$FLQ_DATA_DIR`` and the same two sub-folders (when set);
    3. the user cache, ``flq.datasets.default_cache_dir("cifar10")``
       (``$XDG_CACHE_HOME/flq/cifar10`` or ``~/.cache/flq/cifar10``);
    4. ``<d>/cifar-10`` for each ``d`` in :data:`flq.datasets.SYSTEM_DIRS`
       (read at call time).

    Each folder counts when it, or its ``cifar-10-batches-py`` sub-folder,
    holds the batches (:func:`find_cifar10_dir`). Duplicates are dropped.
    """
    return datasets.ordered_dirs(data_dir, DIR_NAMES, datasets.default_cache_dir(NAME), SYSTEM_SUBDIR)


def _has_batches(d: Path) -> bool:
    return all((d / f).is_file() for f in REQUIRED_FILES)


def find_cifar10_dir(data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Return the first folder holding the CIFAR-10 batches, or ``None``.

    The folders of :func:`search_dirs` are tried in order; for each, the
    folder itself and then its ``cifar-10-batches-py`` sub-folder. A folder
    counts when ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` all
    exist in it (their contents are not checked here). The returned path is
    the folder that holds the files (so it may end in ``cifar-10-batches-py``).
    """
    for d in search_dirs(data_dir):
        for candidate in (d, d / BATCHES_DIR):
            if _has_batches(candidate):
                return candidate
    return None


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def _member_target(member: tarfile.TarInfo, archive: Path) -> Optional[str]:
    """The file name to extract ``member`` to, ``None`` to skip it (the folder
    entry itself); DatasetError for anything but a regular file directly
    under ``cifar-10-batches-py/`` (absolute paths, ``..``, links, devices, sub-folders)."""
    name = member.name
    parts = PurePosixPath(name).parts
    if parts and parts[0] == ".":
        parts = parts[1:]
    safe = not name.startswith(("/", "\\")) and ".." not in parts and "\\" not in name
    if safe and member.isdir() and parts == (BATCHES_DIR,):
        return None
    if safe and member.isfile() and len(parts) == 2 and parts[0] == BATCHES_DIR:
        return parts[1]
    raise DatasetError(
        datasets._one_line(
            f"{archive}: member {name!r} is not a regular file in {BATCHES_DIR}/; refusing to extract the archive"
        )
    )


def _extract(archive: Path, dest_dir: Path) -> Path:
    """Extract the batches of ``archive`` into ``dest_dir/cifar-10-batches-py``.

    Each member is checked (:func:`_member_target`) and its bytes copied with
    ``TarFile.extractfile`` into a temporary folder in ``dest_dir``: no path,
    link, owner or mode from the archive is used (stricter than the ``"data"``
    extraction filter). Only when every member was read are the files moved
    into place; on any error the temporary folder is removed.
    """
    out = dest_dir / BATCHES_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=dest_dir))
    try:
        names: List[str] = []
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    target = _member_target(member, archive)
                    if target is None:
                        continue
                    src = tar.extractfile(member)
                    if src is None:  # pragma: no cover - isfile() members always have data
                        raise DatasetError(f"{archive}: cannot read member {member.name!r}")
                    with src, open(tmp / target, "wb") as fh:
                        shutil.copyfileobj(src, fh, 1 << 20)
                    names.append(target)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DatasetError(datasets._one_line(f"{archive}: corrupt tar.gz archive ({exc})")) from None
        missing = [f for f in REQUIRED_FILES if f not in names]
        if missing:
            raise DatasetError(f"{archive}: the archive lacks {BATCHES_DIR}/{', '.join(missing)}")
        out.mkdir(parents=True, exist_ok=True)
        for n in names:
            os.replace(tmp / n, out / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def download_cifar10(
    dest: PathLike,
    base_urls: Optional[Sequence[str]] = None,
    timeout: float = 30,
    sha256: Optional[str] = None,
) -> Path:
    """Download and extract CIFAR-10 into ``dest``; return ``dest/cifar-10-batches-py``.

    ``cifar-10-python.tar.gz`` (170498071 bytes) is fetched with
    ``urllib.request`` from the mirrors in ``base_urls`` (default
    :data:`BASE_URL`, https://www.cs.toronto.edu/~kriz/), tried in order
    (``file://`` URLs work too; the file name is appended to each). It is
    written to a temporary file in ``dest``, its SHA-256 compared with
    :data:`SHA256` (or ``sha256``, meant for tests), and only then renamed
    into place; a bad download is deleted and the next mirror tried; more
    than :data:`MAX_ARCHIVE_BYTES` is refused. An archive already in ``dest``
    with the right digest is used without downloading.

    The archive is then extracted (only regular files directly under
    ``cifar-10-batches-py/``; any other member refuses the whole archive, see
    :func:`_extract`) and **deleted**, whether extraction succeeded or not:
    what stays is the extracted folder (about 178 MB).

    Raises :class:`DatasetError` (one line) when the archive cannot be
    fetched from any mirror, its checksum does not match, or it is corrupt,
    holds unexpected members or lacks a batch.
    """
    if base_urls is None:
        bases = [BASE_URL]
    elif isinstance(base_urls, str):
        bases = [base_urls]
    else:
        bases = list(base_urls)
    if not bases:
        raise DatasetError(f"no download URL given for {TITLE}")
    expected = (sha256 or SHA256).strip().lower()
    dest_dir = Path(dest).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(datasets._one_line(f"cannot create {dest_dir}: {exc}")) from None

    archive = dest_dir / ARCHIVE
    if not (archive.is_file() and datasets._sha256_file(archive) == expected):
        datasets.fetch_from_mirrors(
            bases, dest_dir, ARCHIVE, expected, timeout, f"{TITLE} {ARCHIVE}", max_bytes=MAX_ARCHIVE_BYTES
        )
    try:
        return _extract(archive, dest_dir)
    except OSError as exc:
        raise DatasetError(datasets._one_line(f"{archive}: cannot extract ({exc})")) from None
    finally:
        archive.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _files_stamp(d: Path) -> Tuple[Tuple[int, int], ...]:
    stamps = []
    for f in REQUIRED_FILES:
        st = (d / f).stat()
        stamps.append((st.st_size, st.st_mtime_ns))
    return tuple(stamps)


@functools.lru_cache(maxsize=1)
def _load_cached(directory: str, stamp: Tuple[Tuple[int, int], ...]) -> Dataset:
    d = Path(directory)
    train_x, train_y = _load_split([d / f for f in TRAIN_BATCHES])
    test_x, test_y = _load_split([d / TEST_BATCH])
    return Dataset(NAME, train_x, train_y, test_x, test_y, d)


def clear_cifar10_cache() -> None:
    """Forget the CIFAR-10 arrays kept by :func:`load_cifar10` in this process."""
    _load_cached.cache_clear()


def _not_found_message(searched: Sequence[Path], reason: str) -> str:
    where = ", ".join(str(d) for d in searched)
    return datasets._one_line(
        f"{TITLE} not found in {where}; put the extracted {BATCHES_DIR} folder (from {BASE_URL}{ARCHIVE}) "
        f"in one of them or set {datasets.ENV_DATA_DIR}, or allow the download ({reason})"
    )


def load_cifar10(data_dir: Optional[PathLike] = None, download: bool = True) -> Dataset:
    """Load CIFAR-10's train and test splits (https://www.cs.toronto.edu/~kriz/cifar.html).

    The batches are looked for with :func:`find_cifar10_dir`. When no folder
    holds them and downloading is allowed (``download=True`` and
    ``FLQ_NO_DOWNLOAD`` not set to 1/true/yes/on), the archive is downloaded
    into the user cache (``flq.datasets.default_cache_dir("cifar10")``) and
    extracted there (:func:`download_cifar10`).

    Returns a :class:`flq.datasets.Dataset` named ``"cifar10"``:
    ``train_x``/``test_x`` ``np.float32 [N, 3, 32, 32]`` (channels red,
    green, blue; pixel byte k becomes k / 255, so values in [0, 1]) from
    ``data_batch_1`` .. ``data_batch_5`` in that order and from
    ``test_batch``; ``train_y``/``test_y`` ``np.int64 [N]`` in 0..9; 50000 and
    10000 samples for the official files (any number per batch is accepted).
    The arrays are read-only; the last dataset loaded is kept in-process by
    (resolved folder, file sizes and mtimes), so loading it again returns the
    same object (:func:`clear_cifar10_cache` forgets it).

    Raises :class:`~flq.datasets.DatasetNotFoundError` (one line: the folders
    searched, where to put the files, why the download did not happen or
    failed); :class:`~flq.datasets.DatasetError` (one line naming the file)
    when a batch is corrupt, not a CIFAR-10 pickle or holds wrong shapes or
    labels (:func:`read_batch`).
    """
    found = find_cifar10_dir(data_dir)
    if found is None:
        searched = search_dirs(data_dir)
        if not download:
            reason = "download=False"
        elif datasets._download_disabled():
            reason = f"disabled by {datasets.ENV_NO_DOWNLOAD}={os.environ.get(datasets.ENV_NO_DOWNLOAD)}"
        else:
            try:
                found = download_cifar10(datasets.default_cache_dir(NAME))
                reason = ""
            except DatasetError as exc:
                reason = f"download failed: {exc}"
        if found is None:
            raise DatasetNotFoundError(_not_found_message(searched, reason))
    resolved = found.resolve()
    return _load_cached(str(resolved), _files_stamp(resolved))

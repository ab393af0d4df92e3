"""The datasets FLQ trains on, from file to arrays (docs/algorithm.md, Data).

This module finds, downloads and reads the two image datasets FLQ trains on,
Fashion-MNIST and MNIST (how they are split over the workers and batched is
:mod:`flq.partition`):

* :data:`DATASETS` (:class:`DatasetInfo`) says where each comes from and the
  SHA-256 of its four files; :func:`canonical_name` resolves its aliases.
* :func:`read_idx` reads one IDX file (gzipped or plain) into a NumPy array.
* :func:`find_dataset_dir` looks for the four IDX files in the configured
  folder, ``$FLQ_DATA_DIR``, the user cache and the system folders
  (:data:`SYSTEM_DIRS`, where Debian's ``dataset-fashion-mnist`` installs).
* :func:`download_dataset` fetches the four files from the official mirrors
  and checks their SHA-256 against :data:`DATASETS`.
* :func:`load_dataset` ties these together and returns a :class:`Dataset`
  (cached in-process, and decoded once per machine: the float32 arrays are
  kept as ``.npy`` files in the user cache and memory-mapped by later
  processes, which then start without decompressing anything and share one
  copy in the page cache).

Every error about the data is a :class:`DatasetError` (a ``ValueError``) whose
message is a single line.

Why one module of about 600 lines: it is one chain (name -> folders -> files
-> checksummed download -> parsed arrays -> cached :class:`Dataset`) whose
parts all share the file table (:data:`FILES`, :data:`DATASETS`), the error
types and the one-line messages; split, each piece would import the others'
private helpers (``_one_line``, ``_parse_idx``, ``_download_disabled`` ...).
About 330 of its lines are code, the rest docstrings, comments and blanks.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetInfo",
    "Dataset",
    "DATASETS",
    "FILES",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "TEST_IMAGES",
    "TEST_LABELS",
    "SYSTEM_DIRS",
    "canonical_name",
    "read_idx",
    "default_cache_dir",
    "search_dirs",
    "find_dataset_dir",
    "download_dataset",
    "load_dataset",
    "clear_dataset_cache",
]

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, or could not be fetched.

    The message is one line and names the file or dataset concerned.
    Source: docs/algorithm.md, Data.
    """


class DatasetNotFoundError(DatasetError):
    """The dataset is in none of the searched folders and was not downloaded.

    The message is one line: the folders searched, how to get the data, and
    why the download did not happen or failed. Source: docs/algorithm.md, Data.
    """


# ---------------------------------------------------------------------------
# Dataset table
# ---------------------------------------------------------------------------

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

#: The four files every dataset folder holds, in the order they are fetched.
FILES: Tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and how its files are checked.

    ``name`` is the canonical name; ``title`` the human-readable one;
    ``base_urls`` the mirrors, tried in order (each ends with ``/`` and the
    file name is appended); ``sha256`` maps each of :data:`FILES` to its
    SHA-256 hex digest; ``dir_names`` are the sub-folder names looked for
    under a configured folder; ``system_subdir`` is the folder name under each
    of :data:`SYSTEM_DIRS`; ``debian_package`` is the Debian package that
    installs the files there (``None`` when there is none).
    Source: docs/algorithm.md, Data.
    """

    name: str
    title: str
    base_urls: Tuple[str, ...]
    sha256: Mapping[str, str]
    dir_names: Tuple[str, ...]
    system_subdir: str
    debian_package: Optional[str] = None


#: The supported datasets, by canonical name. Source: docs/algorithm.md, Data.
#:
#: Fashion-MNIST digests: the official files as shipped in Debian's
#: ``dataset-fashion-mnist`` (0.0~git20200523.55506a9-1).
#: MNIST digests: as listed for the same four files by torchvision-ruby
#: (``ankane/torchvision-ruby``, lib/torchvision/datasets/mnist.rb, which uses
#: the ossci-datasets mirror) and TensorFlow Haskell
#: (``tensorflow/haskell``, tensorflow-mnist-input-data/Setup.hs).
DATASETS: Dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        title="Fashion-MNIST",
        base_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            TRAIN_IMAGES: "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            TRAIN_LABELS: "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            TEST_IMAGES: "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            TEST_LABELS: "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        dir_names=("fashion_mnist", "fashion-mnist"),
        system_subdir="fashion-mnist",
        debian_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        base_urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        dir_names=("mnist",),
        system_subdir="mnist",
        debian_package=None,
    ),
}

_ALIASES: Dict[str, str] = {
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "mnist": "mnist",
}

#: System folders searched last; the dataset's ``system_subdir`` is appended
#: (``/usr/share/datasets/fashion-mnist`` is where Debian's
#: ``dataset-fashion-mnist`` puts the files). Tests may replace this tuple.
SYSTEM_DIRS: Tuple[Path, ...] = (Path("/usr/share/datasets"),)

#: Environment variable naming an extra data folder.
ENV_DATA_DIR = "FLQ_DATA_DIR"
#: Environment variable that, set to 1/true/yes/on, disables downloading.
ENV_NO_DOWNLOAD = "FLQ_NO_DOWNLOAD"
#: Environment variable that, set to 1/true/yes/on, disables the decoded-array cache.
ENV_NO_DECODED_CACHE = "FLQ_NO_DECODED_CACHE"
#: The arrays of a :class:`Dataset`, as the decoded cache names its files.
ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")

#: Refuse a download larger than this (the largest official file is ~26 MiB).
MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024

IMAGE_SIDE = 28
NUM_CLASSES = 10

#: Datasets read by other modules that also keep files in the user cache
#: (:func:`default_cache_dir`): ``"cifar10"`` (:mod:`flq.cifar10`).
EXTRA_CACHE_NAMES = frozenset({"cifar10"})


def canonical_name(name: str) -> str:
    """Return the canonical dataset name (``"fashion_mnist"`` or ``"mnist"``).

    Accepts ``"fashion_mnist"``, ``"fashion-mnist"``, ``"fmnist"`` and
    ``"mnist"`` (case-insensitive). Raises :class:`DatasetError` for any other
    name. Source: docs/algorithm.md, Data.
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        known = ", ".join(sorted(_ALIASES))
        raise DatasetError(f"unknown dataset name {name!r}; expected one of: {known}")
    return _ALIASES[key]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------
# IDX reading
# ---------------------------------------------------------------------------

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES: Dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_idx_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt gzip data ({_one_line(exc)})") from None
    if path.suffix == ".gz":
        raise DatasetError(f"{path}: not gzip data although the name ends in .gz")
    return raw


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes into a read-only array (a view of ``data`` for bytes)."""
    if len(data) < 4:
        raise DatasetError(f"{path}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic 0x{data[0]:02x}{data[1]:02x}, expected 0x0000)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim < 1:
        raise DatasetError(f"{path}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path}: IDX size mismatch (dims {list(dims)} of {dtype.name} need {expected} bytes, found {len(data)})"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a NumPy array.

    The gzip layer is detected from the file's first bytes. The header is
    checked: magic (two zero bytes), data type code (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), number of dimensions
    (>= 1) and that the payload holds exactly ``prod(dims)`` items.

    Returns a writable array of shape ``dims`` in native byte order (uint8 for
    the (Fashion-)MNIST files: images ``[N, 28, 28]``, labels ``[N]``).

    Raises :class:`DatasetError` (one line naming the file) on corrupt data,
    and ``OSError`` (e.g. ``FileNotFoundError``) when the file cannot be read.
    Source: docs/algorithm.md, Data.
    """
    p = Path(path)
    arr = _parse_idx(_read_idx_bytes(p), p)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


# ---------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------


def default_cache_dir(name: str) -> Path:
    """Return the user cache folder for a dataset.

    ``$XDG_CACHE_HOME/flq/<name>`` when ``XDG_CACHE_HOME`` is an absolute
    path, else ``~/.cache/flq/<name>``; ``<name>`` is the canonical name of
    an IDX dataset (:func:`canonical_name`) or one of :data:`EXTRA_CACHE_NAMES`
    (``"cifar10"``, :mod:`flq.cifar10`).
    Raises :class:`DatasetError` for an unknown name. Source: docs/algorithm.md, Data.
    """
    key = str(name).strip().lower()
    cname = key if key in EXTRA_CACHE_NAMES else canonical_name(name)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "flq" / cname


def ordered_dirs(data_dir: Optional[PathLike], dir_names: Sequence[str], cache: Path, system_subdir: str) -> List[Path]:
    """The search order every built-in dataset shares: ``data_dir`` and
    ``data_dir/<each of dir_names>``, the same under ``$FLQ_DATA_DIR``, then
    ``cache``, then ``<d>/<system_subdir>`` for each ``d`` in
    :data:`SYSTEM_DIRS` (read at call time); duplicates dropped."""
    roots: List[Path] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR, "")
    if env:
        roots.append(Path(env).expanduser())
    dirs = [d for root in roots for d in [root] + [root / sub for sub in dir_names]]
    dirs.append(cache)
    dirs += [Path(d) / system_subdir for d in SYSTEM_DIRS]
    unique: List[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def search_dirs(name: str, data_dir: Optional[PathLike] = None) -> List[Path]:
    """Return the folders :func:`find_dataset_dir` tries, in order.

    1. ``data_dir`` and ``data_dir/<name>`` (when ``data_dir`` is given);
    2. ``$FLQ_DATA_DIR`` and ``$FLQ_DATA_DIR/<name>`` (when set);
    3. the user cache, :func:`default_cache_dir`;
    4. ``<d>/<system_subdir>`` for each ``d`` in :data:`SYSTEM_DIRS`
       (``/usr/share/datasets/fashion-mnist`` or ``/usr/share/datasets/mnist``).

    ``<name>`` is each of the dataset's folder names (for Fashion-MNIST
    ``fashion_mnist`` then ``fashion-mnist``). Duplicates are dropped.
    Raises :class:`DatasetError` for an unknown name. Source: docs/algorithm.md, Data.
    """
    info = DATASETS[canonical_name(name)]
    return ordered_dirs(data_dir, info.dir_names, default_cache_dir(info.name), info.system_subdir)


def _has_all_files(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def find_dataset_dir(name: str, data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Return the first folder holding all four IDX ``.gz`` files, or ``None``.

    The folders are tried in the order of :func:`search_dirs`: ``data_dir``
    (and ``data_dir/<name>``), ``$FLQ_DATA_DIR`` (and ``$FLQ_DATA_DIR/<name>``),
    the user cache, then the system folders. A folder counts only when all of
    :data:`FILES` exist in it; their contents are not checked here.
    Raises :class:`DatasetError` for an unknown name. Source: docs/algorithm.md, Data.
    """
    for d in search_dirs(name, data_dir):
        if _has_all_files(d):
            return d
    return None


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(
    url: str, dest_dir: Path, filename: str, expected: str, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> Path:
    """Fetch one URL into a temp file in ``dest_dir``; check it; rename it.

    A download growing past ``max_bytes`` bytes is abandoned (default
    :data:`MAX_DOWNLOAD_BYTES`; the CIFAR-10 archive, :mod:`flq.cifar10`,
    passes a larger limit). Raises DatasetError (checksum, size) or
    OSError/URLError (transport).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise DatasetError(f"{url}: larger than {max_bytes} bytes, refusing it")
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if digest != expected:
            raise DatasetError(
                f"{url}: SHA-256 mismatch for {filename} (expected {expected}, got {digest}); the file was deleted"
            )
        final = dest_dir / filename
        os.replace(tmp, final)
        return final
    finally:
        if tmp.exists():
            tmp.unlink()


def download_dataset(
    name: str,
    dest: PathLike,
    base_urls: Optional[Sequence[str]] = None,
    timeout: float = 30,
    checksums: Optional[Mapping[str, str]] = None,
) -> Path:
    """Download the four IDX files of a dataset into ``dest`` and return ``dest``.

    Each file is fetched with ``urllib.request`` from the mirrors in
    ``base_urls`` (default: the dataset's official mirrors in
    :data:`DATASETS`), tried in order; ``file://`` URLs work too. It is written
    to a temporary file in ``dest``, its SHA-256 is compared with the table
    (entries in ``checksums``, a mapping file name -> hex digest, take
    precedence; meant for tests), and only then atomically renamed into
    place. A file already in ``dest`` with the right digest is kept. A bad
    download is deleted and the next mirror tried.

    Raises :class:`DatasetError` (one line) when a file cannot be fetched
    from any mirror or its checksum does not match, and for an unknown name.
    Source: docs/algorithm.md, Data.
    """
    info = DATASETS[canonical_name(name)]
    if base_urls is None:
        bases = list(info.base_urls)
    elif isinstance(base_urls, str):
        bases = [base_urls]
    else:
        bases = list(base_urls)
    if not bases:
        raise DatasetError(f"no download URL given for {info.title}")
    expected_all = {k: v.lower() for k, v in info.sha256.items()}
    if checksums:
        expected_all.update({k: str(v).lower() for k, v in checksums.items()})
    dest_dir = Path(dest).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {dest_dir}: {_one_line(exc)}") from None

    for filename in FILES:
        expected = expected_all.get(filename)
        if not expected:
            raise DatasetError(f"no SHA-256 known for {info.title} file {filename}")
        final = dest_dir / filename
        if final.is_file() and _sha256_file(final) == expected:
            continue
        fetch_from_mirrors(bases, dest_dir, filename, expected, timeout, f"{info.title} file {filename}")
    return dest_dir


def fetch_from_mirrors(
    bases: Sequence[str],
    dest_dir: Path,
    filename: str,
    expected: str,
    timeout: float,
    what: str,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """``<base>/<filename>`` from the first mirror that serves it with SHA-256
    ``expected`` (:func:`_fetch`), into ``dest_dir``.

    Raises:
        DatasetError: no mirror did (one line: each mirror's reason, ``what`` named).
    """
    errors: List[str] = []
    for base in bases:
        url = (base if base.endswith("/") else base + "/") + filename
        try:
            return _fetch(url, dest_dir, filename, expected, timeout, max_bytes=max_bytes)
        except DatasetError as exc:
            errors.append(str(exc))
        except urllib.error.HTTPError as exc:
            errors.append(f"{url}: HTTP {exc.code} {_one_line(exc.reason)}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            errors.append(f"{url}: {_one_line(reason)}")
    raise DatasetError(_one_line(f"could not download {what}: " + "; ".join(errors)))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset (docs/algorithm.md, Data).

    ``train_x``/``test_x``: ``np.float32`` of shape ``[N, ...]``, pixel
    values scaled to ``[0, 1]`` (byte / 255): ``[N, 1, 28, 28]`` for the IDX
    datasets (Fashion-MNIST, MNIST), ``[N, 3, 32, 32]`` (channels red, green,
    blue) for CIFAR-10 (:mod:`flq.cifar10`). ``train_y``/``test_y``:
    ``np.int64`` of shape ``[N]`` with labels in ``0..C-1`` (C = 10 for all
    three; :attr:`num_classes`). ``name`` is the canonical dataset name and
    ``source`` the folder the files were read from.
    The arrays are shared by every caller (in-process cache) and therefore
    read-only: copy them (``np.array(x)``, ``torch.tensor(x)``) before
    modifying them in place.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: Path

    @property
    def num_classes(self) -> int:
        """Number of classes C: the largest label in ``train_y`` and ``test_y``, plus 1
        (10 for the official files of all three datasets; 0 when both are empty).
        Computed on each call (one pass over the labels)."""
        largest = max((int(np.max(y)) for y in (self.train_y, self.test_y) if y.size), default=-1)
        return largest + 1


_PIXEL_LUT = np.divide(np.arange(256), 255, dtype=np.float32)


def _load_images(path: Path) -> np.ndarray:
    raw = _parse_idx(_read_idx_bytes(path), path)
    if raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{path}: expected uint8 images of shape [N, {IMAGE_SIDE}, {IMAGE_SIDE}], "
            f"found {raw.dtype.name} {list(raw.shape)}"
        )
    # A 256-entry lookup table (k / 255 rounded to float32) is exact and
    # several times faster than converting and dividing 47M pixels.
    x = _PIXEL_LUT[raw.reshape(raw.shape[0], 1, IMAGE_SIDE, IMAGE_SIDE)]
    x.flags.writeable = False
    return x


def _load_labels(path: Path, n_images: int) -> np.ndarray:
    raw = _parse_idx(_read_idx_bytes(path), path)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise DatasetError(f"{path}: expected uint8 labels of shape [N], found {raw.dtype.name} {list(raw.shape)}")
    if raw.shape[0] != n_images:
        raise DatasetError(f"{path}: {raw.shape[0]} labels for {n_images} images")
    if raw.size and int(raw.max()) >= NUM_CLASSES:
        raise DatasetError(f"{path}: label {int(raw.max())} outside 0..{NUM_CLASSES - 1}")
    y = raw.astype(np.int64)
    y.flags.writeable = False
    return y


def _files_stamp(d: Path) -> Tuple[Tuple[int, int], ...]:
    stamps = []
    for f in FILES:
        st = (d / f).stat()
        stamps.append((st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def decoded_cache_dir(name: str, directory: str, stamp: Tuple[Tuple[int, int], ...]) -> Path:
    """Where the decoded arrays of the IDX files in ``directory`` (with these
    sizes and modification times) are kept: ``<default_cache_dir>/decoded/<key>``,
    the key a hash of all three, so changed files are decoded afresh."""
    key = hashlib.sha256(repr((name, directory, stamp)).encode()).hexdigest()[:20]
    return default_cache_dir(name) / "decoded" / key


def _read_decoded(folder: Path) -> Optional[Tuple[np.ndarray, ...]]:
    """The four arrays memory-mapped from ``folder`` (read-only), or None when
    any is missing or not what :func:`_load_images`/:func:`_load_labels` make."""
    try:
        arrays = tuple(np.asarray(np.load(folder / f"{a}.npy", mmap_mode="r")) for a in ARRAY_NAMES)
    except (OSError, ValueError, EOFError):
        return None
    images_shape = (1, IMAGE_SIDE, IMAGE_SIDE)
    for x, y in (arrays[:2], arrays[2:]):
        if x.dtype != np.float32 or x.shape[1:] != images_shape or y.dtype != np.int64 or y.shape != x.shape[:1]:
            return None
        # values as _load_images/_load_labels make them: a damaged file behind a valid header is not
        # trusted (pixels in [0, 1], NaN fails both tests; one pass, ~0.1 s for Fashion-MNIST)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
            return None
        if x.size and not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
            return None
    return arrays


def _write_decoded(folder: Path, arrays: Sequence[np.ndarray]) -> None:
    """Store ``arrays`` in ``folder`` (written beside it, then renamed into
    place: a reader sees all four or none). Failing (read-only or full
    disk, another process first) only costs the next start the decoding.
    A damaged copy already there is replaced."""
    tmp = None
    try:
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        for a, arr in zip(ARRAY_NAMES, arrays):
            np.save(tmp / f"{a}.npy", arr)
        os.rename(tmp, folder)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            for f in tmp.glob("*"):
                f.unlink(missing_ok=True)
            tmp.rmdir()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, directory: str, stamp: Tuple[Tuple[int, int], ...]) -> Dataset:
    d = Path(directory)
    use_disk = os.environ.get(ENV_NO_DECODED_CACHE, "").strip().lower() not in ("1", "true", "yes", "on")
    folder = decoded_cache_dir(name, directory, stamp)
    arrays = _read_decoded(folder) if use_disk else None
    if arrays is None:
        train_x = _load_images(d / TRAIN_IMAGES)
        train_y = _load_labels(d / TRAIN_LABELS, train_x.shape[0])
        test_x = _load_images(d / TEST_IMAGES)
        test_y = _load_labels(d / TEST_LABELS, test_x.shape[0])
        arrays = (train_x, train_y, test_x, test_y)
        if use_disk:
            _write_decoded(folder, arrays)
    return Dataset(name, *arrays, d)


def labels_digest(y: np.ndarray) -> str:
    """``"<samples>:<16 hex digits of SHA-256>"`` of training labels (int64
    little-endian): what a worker and the master compare, since the
    partition is cut from the labels."""
    data = np.ascontiguousarray(y, dtype="<i8").tobytes()
    return f"{len(y)}:{hashlib.sha256(data).hexdigest()[:16]}"


def clear_dataset_cache() -> None:
    """Forget every dataset loaded by :func:`load_dataset` in this process."""
    _load_cached.cache_clear()


def _download_disabled() -> bool:
    return os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() in ("1", "true", "yes", "on")


def _not_found_message(info: DatasetInfo, searched: Sequence[Path], reason: str) -> str:
    ways = []
    if info.debian_package:
        ways.append(f"install Debian's {info.debian_package} (apt-get install {info.debian_package})")
    files = ", ".join(FILES)
    ways.append(f"set {ENV_DATA_DIR} to a folder holding the four IDX .gz files ({files})")
    ways.append(f"or allow the download ({reason})")
    where = ", ".join(str(d) for d in searched)
    return _one_line(f"{info.title} not found in {where}; " + ", ".join(ways))


def load_dataset(name: str, data_dir: Optional[PathLike] = None, download: bool = True) -> Dataset:
    """Load a dataset's train and test splits (docs/algorithm.md, Data).

    The files are looked for with :func:`find_dataset_dir`. When none of the
    folders holds them and downloading is allowed (``download=True`` and
    ``FLQ_NO_DOWNLOAD`` not set to 1), they are downloaded into the user cache
    (:func:`default_cache_dir`) and loaded from there.

    Returns a :class:`Dataset`: ``train_x``/``test_x`` ``np.float32``
    ``[N, 1, 28, 28]`` in ``[0, 1]``, ``train_y``/``test_y`` ``np.int64``
    ``[N]``; 60000/10000 samples for the official files. Results are cached
    in-process by (name, resolved folder, file sizes and mtimes), so repeated
    loads return the same read-only arrays without reading the files again;
    and on disk under the same key (:func:`decoded_cache_dir`, about 220 MB
    for either dataset; off with ``FLQ_NO_DECODED_CACHE=1``): the first load
    decodes the files and stores the arrays, later ones memory-map them.

    Raises :class:`DatasetNotFoundError` (one line: where it looked, how to
    get the data, why the download did not happen) when the files are
    nowhere and cannot be downloaded; :class:`DatasetError` (one line naming
    the file) when a found file is corrupt or not 28x28 uint8 images / uint8
    labels 0..9, and for an unknown name.
    """
    info = DATASETS[canonical_name(name)]
    found = find_dataset_dir(info.name, data_dir)
    if found is None:
        searched = search_dirs(info.name, data_dir)
        if not download:
            reason = "download=False"
        elif _download_disabled():
            reason = f"disabled by {ENV_NO_DOWNLOAD}={os.environ.get(ENV_NO_DOWNLOAD)}"
        else:
            try:
                found = download_dataset(info.name, default_cache_dir(info.name))
                reason = ""
            except DatasetError as exc:
                reason = f"download failed: {exc}"
        if found is None:
            raise DatasetNotFoundError(_not_found_message(info, searched, reason))
    resolved = found.resolve()
    return _load_cached(info.name, str(resolved), _files_stamp(resolved))

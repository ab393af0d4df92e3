"""CIFAR-10 from its python-version files (flq.cifar10): reading, searching,
the restricted unpickler, downloading and extracting. Small synthetic files in
the official format (protocol-2 pickles of dicts with bytes keys)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import isolate_data_env

from flq import cifar10, datasets
from flq.cifar10 import (
    BATCHES_DIR,
    REQUIRED_FILES,
    TEST_BATCH,
    TRAIN_BATCHES,
    download_cifar10,
    find_cifar10_dir,
    load_cifar10,
    read_batch,
    search_dirs,
)
from flq.datasets import Dataset, DatasetError, DatasetNotFoundError

# What tests/conftest.py set for the whole session, before any fixture here replaces it.
SESSION_XDG_CACHE_HOME = os.environ.get("XDG_CACHE_HOME")

N_TRAIN = 40  # per training batch
N_TEST = 30
# A known pixel of the first training image: (row 2, column 5) is red 10, green 20, blue 30.
ROW, COL = 2, 5
RGB = (10, 20, 30)


def make_arrays(seed: int = 0):
    """The batches' contents: {file name: (uint8 [N, 3072], list of int labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        n = N_TEST if name == TEST_BATCH else N_TRAIN
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        out[name] = (data, labels)
    data0 = out[TRAIN_BATCHES[0]][0]
    for channel, value in enumerate(RGB):
        data0[0, channel * 1024 + ROW * 32 + COL] = value
    return out


def batch_bytes(data, labels, name="batch", protocol=2) -> bytes:
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=protocol)


def write_cifar(folder: Path, seed: int = 0):
    """Write the six batches and batches.meta into ``folder``; return make_arrays(seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays(seed)
    for name, (data, labels) in arrays.items():
        (folder / name).write_bytes(batch_bytes(data, labels, name))
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": N_TRAIN, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return arrays


def touch_all(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in REQUIRED_FILES:
        (folder / f).write_bytes(b"")
    return folder


def make_archive(path: Path, source: Path, extra=()) -> str:
    """A cifar-10-python.tar.gz of ``source``'s files under cifar-10-batches-py/; returns its SHA-256.
    ``extra``: (TarInfo, bytes or None) members appended."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(BATCHES_DIR)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for f in sorted(source.iterdir()):
            tar.add(f, arcname=f"{BATCHES_DIR}/{f.name}")
        for member, payload in extra:
            tar.addfile(member, io.BytesIO(payload) if payload is not None else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_pixels(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "  " not in message


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep every test away from the real cache, env, system folders, proxies."""
    isolate_data_env(tmp_path, monkeypatch)
    cifar10.clear_cifar10_cache()
    yield
    cifar10.clear_cifar10_cache()


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_constants():
    assert cifar10.BASE_URL + cifar10.ARCHIVE == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar10.SHA256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    assert cifar10.ARCHIVE_BYTES == 170498071
    assert cifar10.ARCHIVE_BYTES < cifar10.MAX_ARCHIVE_BYTES == 200 * 1024 * 1024
    assert datasets.MAX_DOWNLOAD_BYTES < cifar10.ARCHIVE_BYTES
    assert REQUIRED_FILES == tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def test_load_shapes_dtypes_values_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    arrays = write_cifar(folder)

    def no_plain_pickle(*args, **kwargs):
        raise AssertionError("plain pickle.load/loads used")

    monkeypatch.setattr(pickle, "load", no_plain_pickle)
    monkeypatch.setattr(pickle, "loads", no_plain_pickle)
    ds = load_cifar10(data_dir=folder, download=False)

    assert isinstance(ds, Dataset) and ds.name == "cifar10" and ds.source == folder.resolve()
    assert ds.train_x.shape == (5 * N_TRAIN, 3, 32, 32) and ds.train_x.dtype == np.float32
    assert ds.train_y.shape == (5 * N_TRAIN,) and ds.train_y.dtype == np.int64
    assert ds.test_x.shape == (N_TEST, 3, 32, 32) and ds.test_x.dtype == np.float32
    assert ds.test_y.shape == (N_TEST,) and ds.test_y.dtype == np.int64
    # Batches in order 1..5, each pixel byte k -> float32(k) / 255, channel-first.
    train_data = np.concatenate([arrays[b][0] for b in TRAIN_BATCHES])
    np.testing.assert_array_equal(ds.train_x, expected_pixels(train_data))
    np.testing.assert_array_equal(ds.train_y, sum((arrays[b][1] for b in TRAIN_BATCHES), []))
    np.testing.assert_array_equal(ds.test_x, expected_pixels(arrays[TEST_BATCH][0]))
    np.testing.assert_array_equal(ds.test_y, arrays[TEST_BATCH][1])
    assert ds.train_x[0, :, ROW, COL].tolist() == [np.float32(v) / np.float32(255) for v in RGB]
    assert ds.train_x[0, 0, ROW, COL] == np.float32(10 / 255)
    assert ds.train_x[N_TRAIN, 1, 0, 0] == np.float32(arrays["data_batch_2"][0][0, 1024] / 255)
    assert int(ds.train_y[N_TRAIN]) == arrays["data_batch_2"][1][0]
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0  # bytes 0 and 255 occur
    assert ds.num_classes == 10
    for arr in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        assert not arr.flags.writeable
    with pytest.raises(ValueError):
        ds.train_x[0, 0, 0, 0] = 0.5
    # Kept in-process: the same object again, without reading the files.
    assert load_cifar10(data_dir=folder, download=False) is ds


def test_num_classes_from_labels():
    x = np.zeros((3, 1, 2, 2), np.float32)
    ds = Dataset("t", x, np.array([0, 3, 1]), x[:2], np.array([2, 0]), Path("."))
    assert ds.num_classes == 4
    ds = Dataset("t", x, np.array([0, 1, 1]), x[:2], np.array([6, 0]), Path("."))
    assert ds.num_classes == 7
    empty = np.zeros(0, np.int64)
    assert Dataset("t", x[:0], empty, x[:0], empty, Path(".")).num_classes == 0


def py2_batch_bytes(data: np.ndarray, labels) -> bytes:
    """A batch as the official files hold it: written by Python 2's cPickle, protocol 2
    (py2 ``str`` as BINSTRING, numpy 1.x's ``numpy.core.multiarray._reconstruct``)."""

    def string(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    out = [b"\x80\x02}(", string(b"data")]
    # _reconstruct(ndarray, (0,), "b"), then BUILD with (1, shape, dtype("u1", False, True), False, raw bytes)
    out += [
        b"cnumpy.core.multiarray\n_reconstruct\n",
        b"cnumpy\nndarray\n",
        integer(0),
        b"\x85",
        string(b"b"),
        b"\x87R",
    ]
    out += [b"(", integer(1), integer(data.shape[0]), integer(data.shape[1]), b"\x86"]
    out += [b"cnumpy\ndtype\n", string(b"u1"), b"\x89\x88\x87R"]
    out += [b"(", integer(3), string(b"|"), b"NNN", integer(-1), integer(-1), integer(0), b"tb"]
    out += [b"\x89", string(data.tobytes()), b"tb"]
    out += [string(b"labels"), b"](", *[integer(v) for v in labels], b"e"]
    out += [string(b"batch_label"), string(b"training batch 1 of 5"), b"u."]
    return b"".join(out)


def test_read_python2_protocol2_batch(tmp_path):
    folder = tmp_path / "data"
    arrays = write_cifar(folder)
    data, labels = arrays[TRAIN_BATCHES[0]]
    raw = py2_batch_bytes(data, labels)
    pickletools.dis(raw, out=io.StringIO())  # a well-formed pickle
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    (folder / TRAIN_BATCHES[0]).write_bytes(raw)
    px, y = read_batch(folder / TRAIN_BATCHES[0])
    np.testing.assert_array_equal(px, data)
    assert y.tolist() == labels
    ds = load_cifar10(folder, download=False)
    assert ds.train_x[0, :, ROW, COL].tolist() == [np.float32(v) / np.float32(255) for v in RGB]


def test_read_batch_other_encodings(tmp_path):
    data, labels = make_arrays()[TEST_BATCH]
    # Protocol 5 (a re-pickled batch), str keys, bytes data, a tuple of labels.
    (tmp_path / "p5").write_bytes(pickle.dumps({"data": data, "labels": np.array(labels)}, protocol=5))
    (tmp_path / "raw").write_bytes(pickle.dumps({b"data": data.tobytes(), b"labels": tuple(labels)}, protocol=2))
    (tmp_path / "list").write_bytes(pickle.dumps({b"data": data.tolist(), b"labels": labels}, protocol=2))
    for name in ("p5", "raw", "list"):
        px, y = read_batch(tmp_path / name)
        assert px.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(px, data)
        np.testing.assert_array_equal(y, labels)
    (tmp_path / "empty").write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}))
    px, y = read_batch(tmp_path / "empty")
    assert px.shape == (0, 3072) and y.shape == (0,) and y.dtype == np.int64


# ---------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------


def test_session_cache_is_a_temporary_folder():
    # tests/conftest.py points the user cache of the whole test session to a temp folder.
    assert SESSION_XDG_CACHE_HOME and os.path.isabs(SESSION_XDG_CACHE_HOME)
    assert Path(SESSION_XDG_CACHE_HOME).name.startswith("flq-test-cache-")
    assert Path(SESSION_XDG_CACHE_HOME).parent == Path(tempfile.gettempdir())


def test_default_cache_dir(tmp_path, monkeypatch):
    assert datasets.default_cache_dir("cifar10") == tmp_path / "xdg-cache" / "flq" / "cifar10"
    assert datasets.default_cache_dir(" CIFAR10 ") == tmp_path / "xdg-cache" / "flq" / "cifar10"
    assert datasets.default_cache_dir("fmnist") == tmp_path / "xdg-cache" / "flq" / "fashion_mnist"
    with pytest.raises(DatasetError, match="unknown dataset name 'cifar100'"):
        datasets.default_cache_dir("cifar100")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.default_cache_dir("cifar10") == tmp_path / "home" / ".cache" / "flq" / "cifar10"


def test_search_order(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    env = tmp_path / "env"
    system = tmp_path / "sys"
    cache = tmp_path / "xdg-cache" / "flq" / "cifar10"
    monkeypatch.setenv("FLQ_DATA_DIR", str(env))
    # read at call time: replaced after flq.cifar10 was imported
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (system, tmp_path / "sys2"))

    expected_order = [
        touch_all(cfg),
        touch_all(cfg / "cifar10"),
        touch_all(cfg / "cifar-10"),
        touch_all(env),
        touch_all(env / "cifar10"),
        touch_all(env / "cifar-10"),
        touch_all(cache),
        touch_all(system / "cifar-10"),
        touch_all(tmp_path / "sys2" / "cifar-10"),
    ]
    assert search_dirs(cfg) == expected_order
    assert search_dirs() == expected_order[3:]
    # Remove one file at a time from the winner: the next folder wins.
    for folder in expected_order:
        assert find_cifar10_dir(cfg) == folder
        (folder / TEST_BATCH).unlink()
    assert find_cifar10_dir(cfg) is None


def test_needs_all_six_batches(tmp_path):
    folder = touch_all(tmp_path / "d")
    (folder / "data_batch_3").unlink()
    assert find_cifar10_dir(folder) is None
    (folder / "data_batch_3").write_bytes(b"")
    (folder / "batches.meta").unlink(missing_ok=True)  # not required
    assert find_cifar10_dir(folder) == folder


def test_batches_subfolder_is_found(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    arrays = write_cifar(cfg / "cifar-10" / BATCHES_DIR, seed=5)
    assert find_cifar10_dir(cfg) == cfg / "cifar-10" / BATCHES_DIR
    ds = load_cifar10(cfg, download=False)
    assert ds.source == (cfg / "cifar-10" / BATCHES_DIR).resolve()
    np.testing.assert_array_equal(ds.test_y, arrays[TEST_BATCH][1])
    # A folder's own files come before its cifar-10-batches-py sub-folder.
    touch_all(cfg / "cifar-10")
    assert find_cifar10_dir(cfg) == cfg / "cifar-10"
    # The cache and the system folders too.
    system = tmp_path / "sys"
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (system,))
    touch_all(system / "cifar-10" / BATCHES_DIR)
    assert find_cifar10_dir() == system / "cifar-10" / BATCHES_DIR
    cache = touch_all(tmp_path / "xdg-cache" / "flq" / "cifar10" / BATCHES_DIR)
    assert find_cifar10_dir() == cache


# ---------------------------------------------------------------------------
# Refused files
# ---------------------------------------------------------------------------


class Reduce:
    """Pickles as ``func(*args)``: what a malicious batch would run when loaded."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["os.system", "eval", "nested", "codecs"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind):
    folder = tmp_path / "data"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload, refused = Reduce(os.system, (f"touch {marker}",)), f"{os.system.__module__}.system"
    elif kind == "eval":
        payload, refused = Reduce(eval, (f"open({str(marker)!r}, 'w').close()",)), "__builtin__.eval"
    elif kind == "nested":  # deep inside a valid-looking batch
        data, labels = make_arrays()[TEST_BATCH]
        payload = {b"data": data, b"labels": labels, b"x": [Reduce(os.system, (f"touch {marker}",))]}
        refused = f"{os.system.__module__}.system"
    else:  # an allowed global name, but not the function allowed: _codecs.decode
        import _codecs

        payload, refused = Reduce(_codecs.decode, (b"x", "latin1")), "_codecs.decode"
    path = folder / "data_batch_4"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DatasetError) as err:
        load_cifar10(folder, download=False)
    assert str(err.value) == f"{path}: refusing to unpickle global {refused} (not a CIFAR-10 batch)"
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    import _codecs

    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({b"data": Reduce(_codecs.encode, ("abc", "rot13")), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError) as err:
        read_batch(path)
    assert str(err.value) == (
        f"{path}: not a readable CIFAR-10 batch pickle (UnpicklingError: _codecs.encode used with str and 'rot13')"
    )


def _bad_files():
    data, labels = make_arrays()["data_batch_3"]
    good = batch_bytes(data, labels)

    def batch(**kw):
        d = {b"data": data, b"labels": labels}
        d.update({k.encode(): v for k, v in kw.items()})
        return pickle.dumps(d, protocol=2)

    return {
        "columns": (batch(data=data[:, :3071]), "expected data of uint8 [N, 3072], found uint8 [40, 3071]"),
        "dtype": (batch(data=data.astype(np.float32)), "expected data of uint8 [N, 3072], found float32 [40, 3072]"),
        "1-D": (batch(data=data.ravel()), "expected data of uint8 [N, 3072], found uint8 [122880]"),
        "3-D": (batch(data=data.reshape(40, 3, 1024)), "expected data of uint8 [N, 3072], found uint8 [40, 3, 1024]"),
        "bytes": (batch(data=b"\0" * 3073), "data holds 3073 bytes, not a multiple of 3072"),
        "short labels": (batch(labels=labels[:-1]), "39 labels for 40 images"),
        "long labels": (batch(labels=labels + [1]), "41 labels for 40 images"),
        "label 10": (batch(labels=[10] + labels[1:]), "label 10 outside 0..9"),
        "label -1": (batch(labels=labels[:-1] + [-1]), "label -1 outside 0..9"),
        "str labels": (batch(labels=["a"] * 40), "expected labels as a list of ints, found str32 [40]"),
        "no labels": (pickle.dumps({b"data": data}, protocol=2), "no 'labels' entry in the batch dict"),
        "not a dict": (pickle.dumps([data, labels], protocol=2), "the pickle holds a list, expected a dict"),
        "truncated": (good[: len(good) // 2], "not a readable CIFAR-10 batch pickle (UnpicklingError: "),
        "empty": (b"", "not a readable CIFAR-10 batch pickle (EOFError: Ran out of input)"),
    }


BAD_FILES = _bad_files()


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_batch_is_one_line_error_naming_the_file(tmp_path, case):
    folder = tmp_path / "data"
    write_cifar(folder)
    content, message = BAD_FILES[case]
    path = folder / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_cifar10(folder, download=False)
    text = str(err.value)
    assert_one_line(text)
    if case == "truncated":
        assert text.startswith(f"{path}: {message}") and text.endswith(")")
    else:
        assert text == f"{path}: {message}"


# ---------------------------------------------------------------------------
# Not found
# ---------------------------------------------------------------------------


def test_not_found_is_one_line_naming_the_folders(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(cifar10, "download_cifar10", no_download)
    cfg, env, system = tmp_path / "cfg", tmp_path / "env", tmp_path / "sys"
    monkeypatch.setenv("FLQ_DATA_DIR", str(env))
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (system,))
    monkeypatch.setenv("FLQ_NO_DOWNLOAD", "1")
    where = ", ".join(
        str(p)
        for p in (
            cfg,
            cfg / "cifar10",
            cfg / "cifar-10",
            env,
            env / "cifar10",
            env / "cifar-10",
            tmp_path / "xdg-cache" / "flq" / "cifar10",
            system / "cifar-10",
        )
    )
    tail = (
        "; put the extracted cifar-10-batches-py folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)"
        " in one of them or set FLQ_DATA_DIR, or allow the download"
    )
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(cfg)
    assert str(err.value) == f"CIFAR-10 not found in {where}{tail} (disabled by FLQ_NO_DOWNLOAD=1)"
    assert isinstance(err.value, DatasetError) and isinstance(err.value, ValueError)
    monkeypatch.delenv("FLQ_NO_DOWNLOAD")
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(cfg, download=False)
    assert str(err.value) == f"CIFAR-10 not found in {where}{tail} (download=False)"


def test_not_found_when_download_fails(tmp_path, monkeypatch, http_server):
    _, url, requested = http_server  # serves nothing: a 404
    monkeypatch.setattr(cifar10, "BASE_URL", url)
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10()
    text = str(err.value)
    assert_one_line(text)
    assert text.startswith(f"CIFAR-10 not found in {tmp_path / 'xdg-cache' / 'flq' / 'cifar10'}; put the extracted")
    assert text.endswith(
        f"(download failed: could not download CIFAR-10 cifar-10-python.tar.gz: {url}cifar-10-python.tar.gz:"
        " HTTP 404 File not found)"
    )
    assert requested == ["/cifar-10-python.tar.gz"]


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def test_download_from_local_http_server_extracts_and_loads(tmp_path, http_server):
    root, url, requested = http_server
    arrays = write_cifar(tmp_path / "src")
    sha = make_archive(root / "cifar-10-python.tar.gz", tmp_path / "src")
    dest = tmp_path / "dest"
    out = download_cifar10(dest, base_urls=[url], sha256=sha)
    assert out == dest / BATCHES_DIR
    assert requested == ["/cifar-10-python.tar.gz"]
    # The archive is deleted once extracted; nothing else is left.
    assert [p.name for p in dest.iterdir()] == [BATCHES_DIR]
    assert sorted(p.name for p in out.iterdir()) == sorted([*REQUIRED_FILES, "batches.meta"])
    for f in REQUIRED_FILES:
        assert (out / f).read_bytes() == (tmp_path / "src" / f).read_bytes()
    ds = load_cifar10(dest, download=False)
    np.testing.assert_array_equal(ds.test_x, expected_pixels(arrays[TEST_BATCH][0]))


def test_load_downloads_into_user_cache(tmp_path, monkeypatch, http_server):
    root, url, requested = http_server
    arrays = write_cifar(tmp_path / "src", seed=7)
    sha = make_archive(root / "cifar-10-python.tar.gz", tmp_path / "src")
    monkeypatch.setattr(cifar10, "BASE_URL", url)
    monkeypatch.setattr(cifar10, "SHA256", sha)
    ds = load_cifar10()
    cache = tmp_path / "xdg-cache" / "flq" / "cifar10"
    assert ds.source == (cache / BATCHES_DIR).resolve()
    assert [p.name for p in cache.iterdir()] == [BATCHES_DIR]
    np.testing.assert_array_equal(ds.train_y[-N_TRAIN:], arrays["data_batch_5"][1])
    assert requested == ["/cifar-10-python.tar.gz"]
    # Found in the cache now: no more requests.
    assert load_cifar10() is ds
    cifar10.clear_cifar10_cache()
    assert load_cifar10() is not ds
    assert requested == ["/cifar-10-python.tar.gz"]


def test_download_falls_back_to_file_url(tmp_path, http_server):
    _, url, requested = http_server  # 404
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_cifar(tmp_path / "src")
    sha = make_archive(mirror / "cifar-10-python.tar.gz", tmp_path / "src")
    out = download_cifar10(tmp_path / "dest", base_urls=[url, mirror.as_uri()], sha256=sha.upper())
    assert find_cifar10_dir(tmp_path / "dest") == out
    assert requested == ["/cifar-10-python.tar.gz"]


def test_wrong_checksum_leaves_no_file(tmp_path, http_server):
    root, url, _ = http_server
    write_cifar(tmp_path / "src")
    sha = make_archive(root / "cifar-10-python.tar.gz", tmp_path / "src")
    dest = tmp_path / "dest"
    for expected in ("0" * 64, None):  # a wrong test digest; the official one
        with pytest.raises(DatasetError) as err:
            download_cifar10(dest, base_urls=url, sha256=expected)
        text = str(err.value)
        assert_one_line(text)
        want = expected or cifar10.SHA256
        assert text == (
            f"could not download CIFAR-10 cifar-10-python.tar.gz: {url}cifar-10-python.tar.gz: SHA-256 mismatch"
            f" for cifar-10-python.tar.gz (expected {want}, got {sha}); the file was deleted"
        )
        assert list(dest.iterdir()) == []


def test_download_size_limit(tmp_path, monkeypatch, http_server):
    root, url, _ = http_server
    write_cifar(tmp_path / "src")
    sha = make_archive(root / "cifar-10-python.tar.gz", tmp_path / "src")
    monkeypatch.setattr(cifar10, "MAX_ARCHIVE_BYTES", 1000)
    with pytest.raises(DatasetError, match=r"larger than 1000 bytes, refusing it"):
        download_cifar10(tmp_path / "dest", base_urls=url, sha256=sha)
    assert list((tmp_path / "dest").iterdir()) == []


def _member(name, kind=tarfile.REGTYPE, size=3, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, (size if kind == tarfile.REGTYPE else 0), linkname
    return info, (b"bad" if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "member",
    [
        _member("../evil"),
        _member(f"{BATCHES_DIR}/../../evil"),
        _member("/tmp/flq-evil-absolute"),
        _member("evil"),
        _member(f"{BATCHES_DIR}/sub/evil"),
        _member(f"{BATCHES_DIR}/link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member(f"{BATCHES_DIR}/hard", tarfile.LNKTYPE, linkname=f"{BATCHES_DIR}/test_batch"),
        _member(f"{BATCHES_DIR}/fifo", tarfile.FIFOTYPE),
        _member("other", tarfile.DIRTYPE),
    ],
    ids=lambda m: f"{m[0].name}:{m[0].type.decode()}",
)
def test_unsafe_archive_is_refused(tmp_path, http_server, member):
    root, url, _ = http_server
    write_cifar(tmp_path / "src")
    sha = make_archive(root / "cifar-10-python.tar.gz", tmp_path / "src", extra=[member])
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(DatasetError) as err:
        download_cifar10(dest, base_urls=url, sha256=sha)
    assert str(err.value) == (
        f"{dest / 'cifar-10-python.tar.gz'}: member {member[0].name!r} is not a regular file in"
        f" {BATCHES_DIR}/; refusing to extract the archive"
    )
    # Nothing extracted, no archive left, nothing written outside dest.
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["b", "dest"]
    assert not Path("/tmp/flq-evil-absolute").exists()


def test_incomplete_or_corrupt_archive(tmp_path, http_server):
    root, url, _ = http_server
    src = tmp_path / "src"
    write_cifar(src)
    (src / "data_batch_2").unlink()
    sha = make_archive(root / "cifar-10-python.tar.gz", src)
    dest = tmp_path / "dest"
    with pytest.raises(DatasetError) as err:
        download_cifar10(dest, base_urls=url, sha256=sha)
    assert str(err.value) == f"{dest / 'cifar-10-python.tar.gz'}: the archive lacks {BATCHES_DIR}/data_batch_2"
    assert list(dest.iterdir()) == []
    (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    sha = hashlib.sha256((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    with pytest.raises(DatasetError) as err:
        download_cifar10(dest, base_urls=url, sha256=sha)
    assert str(err.value).startswith(f"{dest / 'cifar-10-python.tar.gz'}: corrupt tar.gz archive (")
    assert_one_line(str(err.value))
    assert list(dest.iterdir()) == []


def test_fetch_max_bytes(tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 5000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError, match="larger than 4999 bytes"):
        datasets._fetch(src.as_uri(), dest, "blob", sha, 5, max_bytes=4999)
    assert list(dest.iterdir()) == []
    assert datasets._fetch(src.as_uri(), dest, "blob", sha, 5, max_bytes=5000) == dest / "blob"


def test_rows_repeated_by_reference_are_refused_before_they_fill_memory(tmp_path):
    row = list(range(256)) * 12  # one 3072-value row, pickled once and referenced 5000 times
    blob = pickle.dumps({b"data": [row] * 5000, b"labels": [0] * 5000}, protocol=2)
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    assert len(blob) < 50_000
    with pytest.raises(DatasetError, match="data lists 5000 rows, more than the file can hold"):
        read_batch(path)
    path.write_bytes(batch_bytes(*make_arrays()[TRAIN_BATCHES[0]]) + b"junk")
    with pytest.raises(DatasetError, match="bytes after the end of the pickle"):
        read_batch(path)

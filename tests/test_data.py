"""Tests for flq.datasets and flq.partition (docs/algorithm.md, Data): IDX reading,
finding, downloading, loading, partitioning and per-worker batch order."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import isolate_data_env

from flq import datasets
from flq import partition as partition_module
from flq.datasets import (
    FILES,
    DatasetError,
    DatasetNotFoundError,
    download_dataset,
    find_dataset_dir,
    load_dataset,
    read_idx,
)
from flq.partition import BatchStream, partition

REAL_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as IDX: 0x0000, type code, ndim, big-endian dims, data."""
    arr = np.asarray(arr)
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_dataset(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """Write four synthetic (Fashion-)MNIST IDX .gz files; return the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        datasets.TRAIN_IMAGES: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        datasets.TRAIN_LABELS: (np.arange(n_train) % 10).astype(np.uint8),
        datasets.TEST_IMAGES: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        datasets.TEST_LABELS: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    # Make sure the extremes 0 and 255 appear, to check the scaling exactly.
    arrays[datasets.TRAIN_IMAGES][0, 0, :2] = [0, 255]
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(arr), mtime=0))
    return arrays


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def touch_all(folder: Path, files=FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).write_bytes(b"")
    return folder


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep every test away from the real cache, env, system folders, proxies."""
    isolate_data_env(tmp_path, monkeypatch)
    datasets.clear_dataset_cache()
    yield
    datasets.clear_dataset_cache()


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx_uint8_images(tmp_path, compressed):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = idx_bytes(arr)
    path = tmp_path / ("x.idx3.gz" if compressed else "x.idx3")
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    out = read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_big_endian_types_become_native(tmp_path):
    ints = np.array([[1, -2, 70000], [-(2**31), 2**31 - 1, 0]], dtype=np.int32)
    floats = np.array([0.5, -1.25, 3e38], dtype=np.float32)
    (tmp_path / "i.idx").write_bytes(idx_bytes(ints))
    (tmp_path / "f.idx.gz").write_bytes(gzip.compress(idx_bytes(floats)))
    got_i = read_idx(tmp_path / "i.idx")
    got_f = read_idx(str(tmp_path / "f.idx.gz"))
    assert got_i.dtype == np.dtype("=i4") and got_i.dtype.isnative
    assert got_f.dtype == np.dtype("=f4") and got_f.dtype.isnative
    np.testing.assert_array_equal(got_i, ints)
    np.testing.assert_array_equal(got_f, floats)


def _corrupt_cases():
    good = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    return {
        "bad_magic": b"\x01\x00" + good[2:],
        "unknown_type": good[:2] + b"\x07" + good[3:],
        "zero_dims": b"\x00\x00\x08\x00",
        "short_header": good[:10],
        "too_short": b"\x00\x00",
        "truncated_data": good[:-1],
        "trailing_bytes": good + b"\x00",
        "truncated_gzip": gzip.compress(good)[:-12],
        "gz_name_not_gzip": good,
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_read_idx_corrupt_raises_one_line_naming_file(tmp_path, case):
    payload = _corrupt_cases()[case]
    name = "bad.idx.gz" if case in ("truncated_gzip", "gz_name_not_gzip") else "bad.idx"
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg
    assert "\n" not in msg


def test_read_idx_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


# ---------------------------------------------------------------------------
# names and find_dataset_dir
# ---------------------------------------------------------------------------


def test_canonical_names():
    assert datasets.canonical_name("fashion_mnist") == "fashion_mnist"
    assert datasets.canonical_name("fashion-mnist") == "fashion_mnist"
    assert datasets.canonical_name("FMNIST") == "fashion_mnist"
    assert datasets.canonical_name("mnist") == "mnist"
    with pytest.raises(DatasetError, match="cifar10"):
        datasets.canonical_name("cifar10")


def test_dataset_table_has_sha256_for_every_file():
    for info in datasets.DATASETS.values():
        assert set(info.sha256) == set(FILES)
        for digest in info.sha256.values():
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert datasets.DATASETS["fashion_mnist"].base_urls == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    )
    assert datasets.DATASETS["mnist"].base_urls[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


def test_find_dataset_dir_search_order(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    env = tmp_path / "env"
    system = tmp_path / "sys"
    cache = tmp_path / "xdg-cache" / "flq" / "fashion_mnist"
    monkeypatch.setenv("FLQ_DATA_DIR", str(env))
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (system,))

    expected_order = [
        touch_all(cfg),
        touch_all(cfg / "fashion_mnist"),
        touch_all(cfg / "fashion-mnist"),
        touch_all(env),
        touch_all(env / "fashion_mnist"),
        touch_all(env / "fashion-mnist"),
        touch_all(cache),
        touch_all(system / "fashion-mnist"),
    ]
    assert datasets.search_dirs("fmnist", cfg) == expected_order
    # Remove one file at a time from the winner: the next folder wins.
    for folder in expected_order:
        assert find_dataset_dir("fashion-mnist", data_dir=cfg) == folder
        (folder / datasets.TEST_LABELS).unlink()
    assert find_dataset_dir("fashion_mnist", data_dir=cfg) is None


def test_find_dataset_dir_needs_all_four_files(tmp_path, monkeypatch):
    touch_all(tmp_path / "three", FILES[:3])
    assert find_dataset_dir("mnist", data_dir=tmp_path / "three") is None
    touch_all(tmp_path / "three", FILES[3:])
    assert find_dataset_dir("mnist", data_dir=tmp_path / "three") == tmp_path / "three"


def test_find_dataset_dir_home_cache_and_mnist_system_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.default_cache_dir("mnist") == tmp_path / "home" / ".cache" / "flq" / "mnist"
    system = tmp_path / "sys"
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (system,))
    touch_all(system / "mnist")
    assert find_dataset_dir("mnist") == system / "mnist"
    assert find_dataset_dir("fashion_mnist") is None  # wants sys/fashion-mnist
    touch_all(tmp_path / "home" / ".cache" / "flq" / "mnist")
    assert find_dataset_dir("mnist") == tmp_path / "home" / ".cache" / "flq" / "mnist"


# ---------------------------------------------------------------------------
# download_dataset
# ---------------------------------------------------------------------------


def test_download_from_local_http_server(tmp_path, http_server):
    root, url, requested = http_server
    arrays = write_dataset(root)
    sums = {f: sha256_of(root / f) for f in FILES}
    dest = tmp_path / "dl"
    out = download_dataset("mnist", dest, base_urls=[url], checksums=sums, timeout=10)
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    for f in FILES:
        assert (dest / f).read_bytes() == (root / f).read_bytes()
    assert requested == ["/" + f for f in FILES]
    np.testing.assert_array_equal(read_idx(dest / datasets.TRAIN_IMAGES), arrays[datasets.TRAIN_IMAGES])
    # A second call finds verified files and fetches nothing.
    download_dataset("mnist", dest, base_urls=[url], checksums=sums, timeout=10)
    assert len(requested) == 4


def test_download_falls_back_to_next_mirror_and_file_url(tmp_path, http_server):
    root, url, requested = http_server
    src = tmp_path / "mirror2"
    write_dataset(src)
    sums = {f: sha256_of(src / f) for f in FILES}
    dest = tmp_path / "dl"
    # The HTTP server serves an empty folder (404); the file:// mirror has the files.
    download_dataset("fmnist", dest, base_urls=[url, src.as_uri()], checksums=sums)
    assert requested == ["/" + f for f in FILES]
    for f in FILES:
        assert (dest / f).read_bytes() == (src / f).read_bytes()


def test_download_wrong_checksum_leaves_no_file(tmp_path, http_server):
    root, url, _ = http_server
    write_dataset(root)
    sums = {f: sha256_of(root / f) for f in FILES}
    sums[datasets.TRAIN_LABELS] = "0" * 64
    dest = tmp_path / "dl"
    with pytest.raises(DatasetError) as info:
        download_dataset("mnist", dest, base_urls=[url], checksums=sums, timeout=10)
    msg = str(info.value)
    assert "\n" not in msg
    assert datasets.TRAIN_LABELS in msg and "SHA-256 mismatch" in msg
    assert sha256_of(root / datasets.TRAIN_LABELS) in msg
    # The file before it was kept; the bad one and its temp file are gone.
    assert sorted(p.name for p in dest.iterdir()) == [datasets.TRAIN_IMAGES]


def test_download_with_official_checksums_rejects_synthetic_files(tmp_path, http_server):
    root, url, _ = http_server
    write_dataset(root)
    dest = tmp_path / "dl"
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        download_dataset("fashion_mnist", dest, base_urls=[url], timeout=10)
    assert list(dest.iterdir()) == []


def test_download_unreachable_is_dataset_error(tmp_path, http_server):
    _, url, _ = http_server
    with pytest.raises(DatasetError) as info:
        download_dataset("mnist", tmp_path / "dl", base_urls=[url], timeout=10)
    assert "\n" not in str(info.value)
    assert "404" in str(info.value) or "Not Found" in str(info.value)
    assert list((tmp_path / "dl").iterdir()) == []


# ---------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------


def test_load_synthetic_dataset(tmp_path):
    arrays = write_dataset(tmp_path / "d", n_train=12, n_test=5)
    ds = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    assert ds.name == "mnist"
    assert ds.source == (tmp_path / "d").resolve()
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == np.float32
    assert ds.test_x.shape == (5, 1, 28, 28) and ds.test_x.dtype == np.float32
    assert ds.train_y.shape == (12,) and ds.train_y.dtype == np.int64
    assert ds.test_y.shape == (5,) and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[:, 0], arrays[datasets.TRAIN_IMAGES].astype(np.float32) / np.float32(255))
    assert ds.train_x[0, 0, 0, 0] == 0.0 and ds.train_x[0, 0, 0, 1] == 1.0
    np.testing.assert_array_equal(ds.train_y, arrays[datasets.TRAIN_LABELS])
    np.testing.assert_array_equal(ds.test_y, arrays[datasets.TEST_LABELS])
    # Cached: the same object again, and read-only so no caller can spoil it.
    assert load_dataset("mnist", data_dir=tmp_path / "d", download=False) is ds
    assert not ds.train_x.flags.writeable and not ds.train_y.flags.writeable
    with pytest.raises(ValueError):
        ds.train_x[0, 0, 0, 0] = 5.0


def test_decoded_arrays_are_kept_and_memory_mapped_by_the_next_process(tmp_path, monkeypatch):
    arrays = write_dataset(tmp_path / "d", n_train=12, n_test=5)
    first = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    stamp = datasets._files_stamp((tmp_path / "d").resolve())
    folder = datasets.decoded_cache_dir("mnist", str((tmp_path / "d").resolve()), stamp)
    assert folder.parent.parent == tmp_path / "xdg-cache" / "flq" / "mnist"
    assert sorted(f.name for f in folder.iterdir()) == sorted(f"{a}.npy" for a in datasets.ARRAY_NAMES)
    datasets.clear_dataset_cache()  # as a new process: the arrays come from the .npy files, memory-mapped
    monkeypatch.setattr(datasets, "_load_images", lambda path: pytest.fail("decoded again"))
    again = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    assert isinstance(again.train_x.base, np.memmap) and not again.train_x.flags.writeable
    for a in datasets.ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(again, a), getattr(first, a))
        assert getattr(again, a).dtype == getattr(first, a).dtype
    np.testing.assert_array_equal(again.test_y, arrays[datasets.TEST_LABELS])
    # a damaged cache file is not trusted: the IDX files are decoded again
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    (folder / "train_x.npy").write_bytes((folder / "train_x.npy").read_bytes()[:200])
    datasets.clear_dataset_cache()
    fixed = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    np.testing.assert_array_equal(fixed.train_x, first.train_x)
    assert datasets._read_decoded(folder) is not None  # and stored whole again
    # so is a file whose header is intact but whose values are not what decoding makes
    for name, offset, junk in (("train_y.npy", 128, b"\xff" * 8), ("test_x.npy", 128, b"\xff\xff\xff\x7f")):
        raw = bytearray((folder / name).read_bytes())
        raw[offset : offset + len(junk)] = junk
        (folder / name).write_bytes(bytes(raw))
        datasets.clear_dataset_cache()
        again = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
        np.testing.assert_array_equal(again.train_y, first.train_y)
        np.testing.assert_array_equal(again.test_x, first.test_x)
    # changed files get a new key; FLQ_NO_DECODED_CACHE=1 writes nothing
    monkeypatch.setenv("FLQ_NO_DECODED_CACHE", "1")
    write_dataset(tmp_path / "d", n_train=14, n_test=5, seed=1)
    datasets.clear_dataset_cache()
    assert load_dataset("mnist", data_dir=tmp_path / "d", download=False).train_x.shape[0] == 14
    assert [f.name for f in folder.parent.iterdir()] == [folder.name]


def test_load_rejects_bad_shapes(tmp_path):
    folder = tmp_path / "d"
    write_dataset(folder)
    bad = np.zeros((3, 27, 28), dtype=np.uint8)
    (folder / datasets.TEST_IMAGES).write_bytes(gzip.compress(idx_bytes(bad)))
    with pytest.raises(DatasetError, match="t10k-images"):
        load_dataset("mnist", data_dir=folder, download=False)
    write_dataset(folder)
    (folder / datasets.TRAIN_LABELS).write_bytes(gzip.compress(idx_bytes(np.zeros(11, dtype=np.uint8))))
    with pytest.raises(DatasetError, match="11 labels for 12 images"):
        load_dataset("mnist", data_dir=folder, download=False)


def _assert_not_found_message(msg: str, reason: str, searched):
    assert "\n" not in msg
    assert msg.startswith("Fashion-MNIST not found in ")
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "FLQ_DATA_DIR" in msg
    assert reason in msg
    for d in searched:
        assert str(d) in msg


def test_not_found_without_download_is_one_line(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(datasets, "download_dataset", no_download)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path / "empty", download=False)
    _assert_not_found_message(
        str(info.value),
        "download=False",
        [tmp_path / "empty", tmp_path / "xdg-cache" / "flq" / "fashion_mnist"],
    )
    monkeypatch.setenv("FLQ_NO_DOWNLOAD", "1")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fmnist")
    _assert_not_found_message(str(info.value), "FLQ_NO_DOWNLOAD=1", [])
    assert isinstance(info.value, DatasetError) and isinstance(info.value, ValueError)


def test_not_found_when_download_fails_is_one_line(tmp_path, monkeypatch, http_server):
    _, url, requested = http_server  # serves nothing: every file is a 404
    info = datasets.DATASETS["fashion_mnist"]
    monkeypatch.setitem(
        datasets.DATASETS,
        "fashion_mnist",
        datasets.DatasetInfo(**{**info.__dict__, "base_urls": (url,)}),
    )
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist")
    _assert_not_found_message(str(err.value), "download failed: could not download", [])
    assert requested == ["/" + datasets.TRAIN_IMAGES]


def test_load_downloads_into_user_cache(tmp_path, monkeypatch, http_server):
    root, url, requested = http_server
    arrays = write_dataset(root, n_train=20, n_test=10, seed=3)
    info = datasets.DATASETS["mnist"]
    fake = datasets.DatasetInfo(
        **{
            **info.__dict__,
            "base_urls": (url,),
            "sha256": {f: sha256_of(root / f) for f in FILES},
        }
    )
    monkeypatch.setitem(datasets.DATASETS, "mnist", fake)
    ds = load_dataset("mnist")
    cache = tmp_path / "xdg-cache" / "flq" / "mnist"
    assert ds.source == cache.resolve()
    assert sorted(p.name for p in cache.iterdir()) == sorted([*FILES, "decoded"])  # and the decoded arrays
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.shape == (10,)
    np.testing.assert_array_equal(ds.test_y, arrays[datasets.TEST_LABELS])
    assert len(requested) == 4
    # Now found in the cache: no more requests, same cached object.
    assert load_dataset("mnist") is ds
    assert len(requested) == 4


def test_real_fashion_mnist(monkeypatch):
    if not all((REAL_FASHION_DIR / f).is_file() for f in FILES):
        msg = f"{REAL_FASHION_DIR} lacks the Fashion-MNIST files (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", (REAL_FASHION_DIR.parent,))
    monkeypatch.setenv("FLQ_NO_DOWNLOAD", "1")
    assert find_dataset_dir("fmnist") == REAL_FASHION_DIR
    ds = load_dataset("fashion_mnist")
    assert ds.source == REAL_FASHION_DIR.resolve()
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.train_x.dtype == np.float32
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.test_x.dtype == np.float32
    assert ds.train_y.shape == (60000,) and ds.train_y.dtype == np.int64
    assert ds.test_y.shape == (10000,) and ds.test_y.dtype == np.int64
    for x in (ds.train_x, ds.test_x):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    # First test labels of the official t10k file: ankle boot, pullover, trouser, ...
    np.testing.assert_array_equal(ds.test_y[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    assert load_dataset("fashion-mnist") is ds


# ---------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------

# 20 labels: class 0 x7, class 1 x7, class 2 x6.
TINY_LABELS = np.array([0, 1, 2] * 6 + [0, 1])


def test_iid_partition_sizes_disjoint_and_exact():
    labels = np.arange(103) % 10
    parts = partition(labels, 4, "iid", None, 7, 8)
    assert [p.shape[0] for p in parts] == [25] * 4  # 103 // 4, remainder dropped
    assert all(p.dtype == np.int64 for p in parts)
    allidx = np.concatenate(parts)
    assert np.unique(allidx).shape[0] == 100
    assert allidx.min() >= 0 and allidx.max() < 103
    perm = np.random.default_rng(7).permutation(103)
    np.testing.assert_array_equal(allidx, perm[:100])
    # Pinned: rng.permutation(20) with seed 0, cut in halves.
    tiny = partition(TINY_LABELS, 2, "iid", None, 0, 2)
    assert [p.tolist() for p in tiny] == [
        [4, 19, 6, 2, 13, 16, 3, 11, 10, 8],
        [0, 12, 7, 5, 18, 17, 14, 9, 1, 15],
    ]


def test_dirichlet_tiny_example_pinned():
    # seed 0, alpha 1, 2 workers, batch_size 2 (first try succeeds):
    #   class 0 [6 12 9 18 15 0 3], p=(.2524, .7476): 7p=(1.77, 5.23) -> floor (1, 5),
    #     remainder 1 to worker 0 (fraction .77 > .23) -> (2, 5)
    #   class 1 [10 7 1 19 13 16 4], p=(.9690, .0310): (6.78, .22) -> (7, 0)
    #   class 2 [14 2 11 8 17 5],   p=(.1707, .8293): (1.02, 4.98) -> (1, 5)
    #   worker 0 = [6 12 | 10 7 1 19 13 16 4 | 14], worker 1 = [9 18 15 0 3 | 2 11 8 17 5],
    #   each then shuffled by rng.permutation.
    parts = partition(TINY_LABELS, 2, "non_iid", 1.0, 0, 2)
    assert [p.tolist() for p in parts] == [
        [1, 13, 19, 10, 7, 12, 16, 6, 4, 14],
        [18, 9, 3, 8, 17, 11, 5, 15, 0, 2],
    ]
    assert all(p.dtype == np.int64 for p in parts)
    assert [np.bincount(TINY_LABELS[p], minlength=3).tolist() for p in parts] == [
        [2, 7, 1],
        [5, 0, 5],
    ]


def test_dirichlet_retries_with_the_same_rng(monkeypatch):
    calls = []
    original = partition_module._dirichlet_try

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(partition_module, "_dirichlet_try", counting)
    parts = partition(TINY_LABELS, 2, "non_iid", 0.5, 0, 8)
    assert len(calls) == 3  # tries 1 and 2 leave a worker with < 8 samples
    assert [p.tolist() for p in parts] == [
        [14, 6, 10, 11, 1, 18, 19, 13, 3],
        [17, 16, 0, 9, 7, 4, 15, 12, 8, 5, 2],
    ]
    # Replay: the third draw from one continuing generator gives that result.
    rng = np.random.default_rng(0)
    classes = np.array([0, 1, 2])
    draws = [original(rng, TINY_LABELS, classes, 2, 0.5) for _ in range(3)]
    assert min(len(p) for p in draws[0]) < 8 and min(len(p) for p in draws[1]) < 8
    assert [p.tolist() for p in draws[2]] == [p.tolist() for p in parts]


class _FixedRng:
    """Stand-in generator: identity permutations, preset Dirichlet draws."""

    def __init__(self, draws):
        self.draws = [np.asarray(d, dtype=float) for d in draws]

    def permutation(self, x):
        return np.array(x, copy=True)

    def dirichlet(self, alpha):
        return self.draws.pop(0)


def test_dirichlet_largest_remainder_ties_go_to_lower_worker():
    labels = np.array([0] * 6 + [1] * 5)
    # class 0: 6 * 1/4 = 1.5 each -> floor 1 each, 2 left, all fractions tie -> workers 0, 1.
    # class 1: 5 * (1/8, 3/8, 1/2, 0) = (0.625, 1.875, 2.5, 0) -> floor (0, 1, 2, 0),
    #   2 left: fractions .875 (w1) then .625 (w0) -> (1, 2, 2, 0).
    rng = _FixedRng([[0.25, 0.25, 0.25, 0.25], [0.125, 0.375, 0.5, 0.0]])
    parts = partition_module._dirichlet_try(rng, labels, np.array([0, 1]), 4, 1.0)
    assert [p.tolist() for p in parts] == [[0, 1, 6], [2, 3, 7, 8], [4, 9, 10], [5]]


def test_dirichlet_deterministic_valid_and_class_totals():
    labels = np.random.default_rng(123).integers(0, 10, size=2000)
    a = partition(labels, 8, "non_iid", 0.5, 42, 16)
    b = partition(labels, 8, "non_iid", 0.5, 42, 16)
    c = partition(labels, 8, "non_iid", 0.5, 43, 16)
    assert len(a) == 8
    for x, y in zip(a, b):
        assert x.dtype == np.int64
        np.testing.assert_array_equal(x, y)
    assert any(x.shape != z.shape or not np.array_equal(x, z) for x, z in zip(a, c))
    assert min(len(p) for p in a) >= 16
    allidx = np.concatenate(a)
    # No padding needed: every sample exactly once, class totals preserved.
    np.testing.assert_array_equal(np.sort(allidx), np.arange(2000))
    per_worker = np.stack([np.bincount(labels[p], minlength=10) for p in a])
    np.testing.assert_array_equal(per_worker.sum(axis=0), np.bincount(labels, minlength=10))
    # Skewed, unlike IID (where each class is ~1/10 of every worker): on average
    # a worker's largest class is over a quarter of its samples.
    assert (per_worker.max(axis=1) / per_worker.sum(axis=1)).mean() > 0.25


def test_dirichlet_pads_short_workers_after_100_tries(monkeypatch):
    calls = []
    original = partition_module._dirichlet_try

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(partition_module, "_dirichlet_try", counting)
    labels = np.array([0, 1] * 5)  # 10 samples; 3 workers x 4 > 10: can never succeed
    parts = partition(labels, 3, "non_iid", 1.0, 5, 4)
    assert len(calls) == 100
    again = partition(labels, 3, "non_iid", 1.0, 5, 4)
    for x, y in zip(parts, again):
        np.testing.assert_array_equal(x, y)
    assert all(len(p) >= 4 and p.dtype == np.int64 for p in parts)
    assert all(p.min() >= 0 and p.max() < 10 for p in parts)
    # The 100th draw's shares are kept as prefixes and cover each sample once;
    # short workers are topped up to exactly batch_size.
    lengths = [len(p) for p in parts]
    assert 4 in lengths
    rng = np.random.default_rng(5)
    last = None
    for _ in range(100):
        last = original(rng, labels, np.array([0, 1]), 3, 1.0)
    for p, share in zip(parts, last):
        np.testing.assert_array_equal(p[: len(share)], share)
        assert len(p) == max(4, len(share))
        assert len(np.unique(p[len(share) :])) == len(p) - len(share)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_workers=0), "num_workers"),
        (dict(num_workers=21), "num_workers"),
        (dict(scheme="dirichlet"), "scheme"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=None), "alpha"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=21), "batch_size"),
        (dict(seed=None), "seed"),
    ],
)
def test_partition_bad_arguments(kwargs, word):
    args = dict(labels=TINY_LABELS, num_workers=2, scheme="non_iid", alpha=0.5, seed=0, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        partition(**args)
    assert word in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# BatchStream
# ---------------------------------------------------------------------------


def test_batch_stream_order_and_drop_remainder():
    idx = np.arange(100, 110)  # 10 indices, batch 3 -> 3 batches per pass, 1 dropped
    s = BatchStream(idx, 3, seed=11, worker_id=2)
    assert s.batches_per_pass == 3
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([11, 2, 1])))
    for _ in range(4):  # four passes
        perm = rng.permutation(idx)
        for b in range(3):
            got = s.next_indices()
            assert got.dtype == np.int64 and got.shape == (3,)
            np.testing.assert_array_equal(got, perm[3 * b : 3 * b + 3])


def test_batch_stream_determinism_per_worker():
    idx = np.arange(50)
    first = BatchStream(idx, 5, 0, 0).next_indices()
    s1, s2, s3, s4 = (
        BatchStream(idx, 5, 0, 0),
        BatchStream(idx, 5, 0, 0),
        BatchStream(idx, 5, 0, 1),
        BatchStream(idx, 5, 1, 0),
    )
    seq = [np.concatenate([s.next_indices() for _ in range(25)]) for s in (s1, s2, s3, s4)]
    np.testing.assert_array_equal(seq[0], seq[1])
    np.testing.assert_array_equal(seq[0][:5], first)
    assert not np.array_equal(seq[0], seq[2])
    assert not np.array_equal(seq[0], seq[3])
    # Each pass of 10 batches is a permutation of the 50 indices.
    for k in range(2):
        np.testing.assert_array_equal(np.sort(seq[0][50 * k : 50 * (k + 1)]), idx)


@pytest.mark.parametrize("advance", [0, 1, 3, 4, 7])
def test_batch_stream_state_dict_round_trip(advance):
    idx = np.array([5, 3, 9, 1, 7, 8, 2, 6, 4, 0, 11])  # 11 indices, batch 4: 2 per pass
    original = BatchStream(idx, 4, seed=3, worker_id=1)
    for _ in range(advance):
        original.next_indices()
    state = json.loads(json.dumps(original.state_dict()))
    resumed = BatchStream(idx, 4, seed=999, worker_id=7)  # other seed: state must win
    resumed.load_state_dict(state)
    for _ in range(9):
        np.testing.assert_array_equal(resumed.next_indices(), original.next_indices())


def test_batch_stream_rejects_bad_arguments_and_states():
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(np.arange(3), 4, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(np.arange(3), 0, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        BatchStream(np.arange(3), 1, -1, 0)
    s = BatchStream(np.arange(10), 2, 0, 0)
    s.next_indices()
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(np.arange(10), 5, 0, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="permutation"):
        BatchStream(np.arange(1, 11), 2, 0, 0).load_state_dict(state)

"""Saving and loading a MultiVectorIndex: a directory trusted like a database file.

Layout of a saved index (FORMAT_VERSION 1)::

    manifest.json        format name and version, dim, num_vectors, dtype, count, next_id,
                         masked, slab bounds, and for every data file its byte size and
                         sha256; plus the sha256 of the manifest itself (``manifest_sha256``,
                         of the canonical JSON without that field)
    data_<s>.bin         slab s of the vectors: count x w_s x dim elements (storage.py)
    scales_<s>.bin       int8 only: count x w_s x 2 float32 (scale, norm) pairs
    mask_<s>.bin         masked indexes only: count x w_s bytes, 1 = valid
    ids.bin              count int64 ids, row order
    live.bin             count bytes, 1 = live, 0 = removed (tombstone)

Every file is raw little-endian bytes in C order with no header, so it can be memory-mapped
as it is (``numpy.memmap``; page-aligned because every file starts at offset 0). Rows are
all the rows ever added, removed ones included (their tombstone is 0).

Atomic save: everything is written into a fresh sibling directory ``.<name>.tmp-<random>``,
each file and then the directory are fsynced, and the directory is renamed into place.
When ``path`` already holds an index, the two directories are swapped in one step
(``renameat2(RENAME_EXCHANGE)`` on Linux), then the old one is deleted; a crash at any
point leaves ``path`` holding either the old index or the new one, complete (stale
temporary directories are removed by the next save). Where the atomic swap is unavailable,
the old directory is first renamed aside (``.<name>.old-<random>``) and ``load`` falls back
to it if ``path`` is missing.

Verified load: the manifest's own checksum, then every file's size; with ``verify=True``
also every file's sha256 (streamed in chunks: the data is read once, not kept). A mismatch
raises ``IndexCorruptedError`` (a ValueError) naming the file. ``mmap=True`` maps the data
files without reading them (only ids and tombstones are read into memory): opening costs
O(count * 9) bytes, the vectors are paged in by the searches that touch them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import hashlib
import json
import os
import shutil
import uuid
from typing import Dict, List, Optional

import numpy as np
import torch

from .storage import INDEX_DTYPES, Segment, Store, slab_bounds

FORMAT_NAME = "metaembed-kernels.MultiVectorIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20
_NUMPY_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}


class IndexCorruptedError(ValueError):
    """A saved index failed a check: a file is missing, has the wrong size or checksum."""


# ---- writing ---------------------------------------------------------------------------

class _HashingWriter:
    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write_tensor(self, t: torch.Tensor) -> None:
        """Raw bytes of t (C order), in chunks of rows so that no big copy is made."""
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        rows = t.shape[0] if t.dim() else 1
        row_bytes = max(1, t.numel() * t.element_size() // max(rows, 1))
        step = max(1, CHUNK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            chunk = t[r0: r0 + step].contiguous().numpy()
            view = memoryview(chunk).cast("B")
            self.sha.update(view)
            self.file.write(view)
            self.size += view.nbytes

    def close(self) -> Dict[str, object]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_names(num_slabs: int, dtype: str, masked: bool) -> List[str]:
    names = [f"data_{s}.bin" for s in range(num_slabs)]
    if dtype == "int8":
        names += [f"scales_{s}.bin" for s in range(num_slabs)]
    if masked:
        names += [f"mask_{s}.bin" for s in range(num_slabs)]
    return names + ["ids.bin", "live.bin"]


def _write_directory(store: Store, directory: str) -> None:
    files = {}
    num_slabs = len(store.bounds) - 1

    def write(name, arrays):
        w = _HashingWriter(os.path.join(directory, name))
        try:
            for a in arrays:
                w.write_tensor(a)
        finally:
            files[name] = w.close()

    segs = store.segments
    for s in range(num_slabs):
        write(f"data_{s}.bin", [seg.data[s][: seg.n] for seg in segs])
        if store.dtype == "int8":
            write(f"scales_{s}.bin", [seg.scales[s][: seg.n] for seg in segs])
        if store.masked:
            write(f"mask_{s}.bin", [seg.masks[s][: seg.n] for seg in segs])
    write("ids.bin", [seg.ids_view() for seg in segs])
    write("live.bin", [seg.live_view() for seg in segs])
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": store.dim,
        "num_vectors": store.num_vectors,
        "dtype": store.dtype,
        "count": store.num_rows,
        "live": store.num_live,
        "next_id": store.next_id,
        "masked": store.masked,
        "slab_bounds": store.bounds,
        "files": files,
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _is_index_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def save(store: Store, path) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        raise ValueError(f"path: the parent directory {parent!r} does not exist")
    if os.path.exists(path) and not (os.path.isdir(path) and (_is_index_dir(path) or not os.listdir(path))):
        raise ValueError(f"path {path!r} exists and is not a saved index (nor an empty directory): "
                         "refusing to replace it")
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        _write_directory(store, tmp)
        if os.path.exists(path):
            if _exchange(tmp, path):
                _fsync_dir(parent)
                shutil.rmtree(tmp, ignore_errors=True)  # now the old index
                return
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
            os.rename(tmp, path)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading ---------------------------------------------------------------------------

def _corrupt(path: str, what: str) -> IndexCorruptedError:
    return IndexCorruptedError(f"index file {path!r} is corrupted: {what}")


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a directory holding a saved MultiVectorIndex")
    if not os.path.isfile(manifest_path):
        raise ValueError(f"path {path!r} is not a saved MultiVectorIndex: it has no {MANIFEST}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(manifest_path, f"not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"path {path!r} is not a saved MultiVectorIndex: {MANIFEST} does not name the format "
                         f"{FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise _corrupt(manifest_path, f"format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"the index at {path!r} was written by a newer format version ({version}); this "
                         f"metaembed-kernels reads format versions <= {FORMAT_VERSION}: upgrade the library")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise _corrupt(manifest_path, "its checksum (manifest_sha256) does not match its contents")
    return manifest


def _expected_sizes(m: dict) -> Dict[str, int]:
    bounds, n, dim, dtype = m["slab_bounds"], m["count"], m["dim"], m["dtype"]
    elem = {"float32": 4, "bfloat16": 2, "int8": 1}[dtype]
    sizes = {}
    for s in range(len(bounds) - 1):
        w = bounds[s + 1] - bounds[s]
        sizes[f"data_{s}.bin"] = n * w * dim * elem
        if dtype == "int8":
            sizes[f"scales_{s}.bin"] = n * w * 8
        if m["masked"]:
            sizes[f"mask_{s}.bin"] = n * w
    sizes["ids.bin"] = 8 * n
    sizes["live.bin"] = n
    return sizes


def _check_manifest_fields(path: str, m: dict) -> None:
    manifest_path = os.path.join(path, MANIFEST)
    try:
        ok = (isinstance(m["dim"], int) and m["dim"] >= 1 and isinstance(m["num_vectors"], int)
              and m["num_vectors"] >= 1 and m["dtype"] in INDEX_DTYPES and isinstance(m["count"], int)
              and m["count"] >= 0 and isinstance(m["next_id"], int) and isinstance(m["masked"], bool)
              and m["slab_bounds"] == slab_bounds(m["num_vectors"]) and isinstance(m["files"], dict))
    except KeyError as err:
        raise _corrupt(manifest_path, f"missing field {err}") from None
    if not ok:
        raise _corrupt(manifest_path, "inconsistent fields")
    expected = _expected_sizes(m)
    if set(m["files"]) != set(expected):
        raise _corrupt(manifest_path, f"lists files {sorted(m['files'])}, expected {sorted(expected)}")


def _sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sha.update(view[:n])
    return sha.hexdigest()


def _open_array(path: str, dtype: str, shape, mmap: bool) -> torch.Tensor:
    """A file as a tensor: memory-mapped copy-on-write (never written back) or read."""
    np_dtype = {"int64": np.int64, "uint8": np.uint8, "float32": np.float32}.get(dtype) or _NUMPY_STORAGE[dtype]
    count = int(np.prod(shape))
    if count == 0:
        arr = np.zeros(shape, dtype=np_dtype)
    elif mmap:
        arr = np.memmap(path, dtype=np_dtype, mode="c", shape=tuple(shape))
    else:
        arr = np.fromfile(path, dtype=np_dtype, count=count).reshape(shape)
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def load(path, *, mmap: bool = True, verify: bool = True, device="cpu") -> Store:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        parent, name = os.path.split(path)
        aside = sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")))
        if aside:  # a save was interrupted between its two renames (no atomic swap here)
            path = aside[-1]
    m = read_manifest(path)
    _check_manifest_fields(path, m)
    expected = _expected_sizes(m)
    for name, size in expected.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise _corrupt(file, "missing")
        actual = os.path.getsize(file)
        if actual != size or m["files"][name].get("bytes") != size:
            raise _corrupt(file, f"{actual} bytes, expected {size}")
    if verify:
        for name in expected:
            file = os.path.join(path, name)
            if _sha256_file(file) != m["files"][name].get("sha256"):
                raise _corrupt(file, "sha256 checksum mismatch")

    device = torch.device(device)
    mapped = mmap and device.type == "cpu"
    store = Store(m["dim"], m["num_vectors"], m["dtype"], device)
    store.next_id = m["next_id"]
    store.masked = m["masked"]
    n, D = m["count"], m["dim"]
    if n > 0:
        data, scales, masks = [], [] if m["dtype"] == "int8" else None, [] if m["masked"] else None
        for s, w in enumerate(store.widths):
            data.append(_open_array(os.path.join(path, f"data_{s}.bin"), m["dtype"], (n, w, D), mapped))
            if scales is not None:
                scales.append(_open_array(os.path.join(path, f"scales_{s}.bin"), "float32", (n, w, 2), mapped))
            if masks is not None:
                masks.append(_open_array(os.path.join(path, f"mask_{s}.bin"), "uint8", (n, w), mapped)
                             .view(torch.bool))
        ids = _open_array(os.path.join(path, "ids.bin"), "int64", (n,), False)
        live = _open_array(os.path.join(path, "live.bin"), "uint8", (n,), False).view(torch.bool)
        if device.type != "cpu":
            data = [d.to(device) for d in data]
            scales = None if scales is None else [x.to(device) for x in scales]
            masks = None if masks is None else [x.to(device) for x in masks]
            ids, live = ids.to(device), live.to(device)
        seg = Segment(data, scales, masks, ids, live, n=n, writable=not mapped)
        seg.num_removed = int(n - int(live.sum()))
        if seg.num_removed != n - m["live"]:
            raise _corrupt(os.path.join(path, "live.bin"), f"{n - seg.num_removed} live rows, manifest says "
                                                           f"{m['live']}")
        store.segments.append(seg)
    return store


def describe(path) -> Optional[dict]:
    """The manifest of a saved index (checked), without opening its data."""
    return read_manifest(os.path.abspath(os.fspath(path)))

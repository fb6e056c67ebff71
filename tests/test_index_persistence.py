"""MultiVectorIndex persistence: bit-identical round trips (memory-mapped or read), add after
load, checksums naming the corrupted file, the format-version check, a save killed halfway."""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from metaembed_kernels import IndexCorruptedError, MultiVectorIndex
from metaembed_kernels.index import persistence

DTYPES = ("float32", "bfloat16", "int8")


def build(dtype, seed=0, n=40, masked=True):
    gen = torch.Generator().manual_seed(seed)
    index = MultiVectorIndex(24, 10, dtype=dtype)
    index.add(torch.randn(n, 10, 24, generator=gen))
    mask = torch.rand(n // 2, 10, generator=gen) > 0.3 if masked else None
    index.add(torch.randn(n // 2, 10, 24, generator=gen), ids=torch.arange(1000, 1000 + n // 2), c_mask=mask)
    index.remove([3, 1001])
    return index


def results(index, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(5, 6, 24, generator=gen)
    return index.search_grouped(q, 7, ((1, 1), (2, 4), (6, 10))), index.search(q, 4, filter_ids=list(range(20)))


def assert_identical(a, b):
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_bit_identical_and_add_after_load_appends(tmp_path, dtype, mmap):
    index = build(dtype)
    expected = results(index)
    index.save(tmp_path / "idx")
    loaded = MultiVectorIndex.load(tmp_path / "idx", mmap=mmap)
    assert (len(loaded), loaded.nbytes, loaded.dtype, loaded.dim, loaded.num_vectors) == (
        len(index), index.nbytes, index.dtype, index.dim, index.num_vectors)
    assert torch.equal(loaded.ids(), index.ids())
    assert_identical(results(loaded), expected)
    if mmap:
        assert not loaded._store.segments[0].writable  # a mapped segment is never written
    # add after load appends to both, identically; a second save/load round trip agrees
    more = torch.randn(9, 10, 24, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded.add(more), index.add(more))
    loaded.remove([1002])
    index.remove([1002])
    assert_identical(results(loaded), results(index))
    loaded.save(tmp_path / "idx")  # over itself (its data is mapped from there)
    again = MultiVectorIndex.load(tmp_path / "idx", mmap=mmap)
    assert_identical(results(again), results(index))
    assert again.add(more[:1]).tolist() == index.add(more[:1]).tolist()  # next_id survives


def test_empty_index_round_trip(tmp_path):
    MultiVectorIndex(8, 3, dtype="int8").save(tmp_path / "e")
    loaded = MultiVectorIndex.load(tmp_path / "e")
    assert len(loaded) == 0 and loaded.dtype == "int8" and loaded.add(torch.randn(2, 3, 8)).tolist() == [0, 1]


@pytest.mark.parametrize("name", ["data_0.bin", "data_3.bin", "scales_1.bin", "mask_2.bin", "ids.bin", "live.bin"])
def test_flipped_byte_names_the_file(tmp_path, name):
    build("int8").save(tmp_path / "idx")
    path = tmp_path / "idx" / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptedError, match=name) as info:
        MultiVectorIndex.load(tmp_path / "idx")
    assert isinstance(info.value, ValueError)
    MultiVectorIndex.load(tmp_path / "idx", verify=False)  # the size still matches: opens unverified


def test_truncated_or_missing_file_and_bad_manifest(tmp_path):
    build("bfloat16").save(tmp_path / "idx")
    data = tmp_path / "idx" / "data_1.bin"
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(IndexCorruptedError, match="data_1.bin"):
        MultiVectorIndex.load(tmp_path / "idx", verify=False)  # sizes are always checked
    data.unlink()
    with pytest.raises(IndexCorruptedError, match="data_1.bin.*missing"):
        MultiVectorIndex.load(tmp_path / "idx", verify=False)
    build("bfloat16").save(tmp_path / "idx2")
    manifest = tmp_path / "idx2" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["count"] += 1  # a consistent-looking edit: caught by the manifest's own checksum
    manifest.write_text(json.dumps(m))
    with pytest.raises(IndexCorruptedError, match="manifest.json"):
        MultiVectorIndex.load(tmp_path / "idx2")
    manifest.write_text("{not json")
    with pytest.raises(IndexCorruptedError, match="manifest.json"):
        MultiVectorIndex.load(tmp_path / "idx2")


def test_newer_format_version_and_not_an_index(tmp_path):
    build("float32").save(tmp_path / "idx")
    manifest = tmp_path / "idx" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["format_version"] = persistence.FORMAT_VERSION + 1
    m["manifest_sha256"] = persistence._manifest_digest(m)
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer format version"):
        MultiVectorIndex.load(tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved MultiVectorIndex"):
        MultiVectorIndex.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a saved MultiVectorIndex"):
        MultiVectorIndex.load(tmp_path / "other")
    with pytest.raises(ValueError, match="not a directory"):
        MultiVectorIndex.load(tmp_path / "missing")
    with pytest.raises(TypeError, match="path"):
        MultiVectorIndex.load(3)
    # save refuses to replace a directory that is not an index
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("x")
    with pytest.raises(ValueError, match="not a saved index"):
        build("float32").save(tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.txt").exists()


def test_save_without_atomic_exchange_falls_back(tmp_path, monkeypatch):
    first, second = build("bfloat16", seed=0), build("bfloat16", seed=1)
    first.save(tmp_path / "idx")
    monkeypatch.setattr(persistence, "_exchange", lambda a, b: False)
    second.save(tmp_path / "idx")
    assert_identical(results(MultiVectorIndex.load(tmp_path / "idx")), results(second))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    from metaembed_kernels import MultiVectorIndex
    from metaembed_kernels.index import persistence
    path = sys.argv[1]
    index = MultiVectorIndex(64, 8, dtype="bfloat16")
    index.add(torch.randn(2000, 8, 64, generator=torch.Generator().manual_seed(0)))
    index.save(path)                                   # version 1, complete
    index.add(torch.randn(500, 8, 64, generator=torch.Generator().manual_seed(1)))
    write = persistence._HashingWriter.write_tensor
    def slow_write(self, t):                           # version 2: stall inside the first file
        write(self, t)
        print("WRITING", flush=True)
        time.sleep(60)
    persistence._HashingWriter.write_tensor = slow_write
    index.save(path)
""")


def test_killed_save_leaves_the_previous_index_intact(tmp_path):
    path = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", line
        assert any(p.startswith(".idx.tmp-") for p in os.listdir(tmp_path))  # the new one, half written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    loaded = MultiVectorIndex.load(path)  # version 1, verified
    assert len(loaded) == 2000
    expected = MultiVectorIndex(64, 8, dtype="bfloat16")
    expected.add(torch.randn(2000, 8, 64, generator=torch.Generator().manual_seed(0)))
    q = torch.randn(3, 4, 64)
    assert_identical([loaded.search(q, 5)], [expected.search(q, 5)])
    loaded.save(path)  # the next save cleans the stale temporary directory up
    assert not any(p.startswith(".idx.tmp-") for p in os.listdir(tmp_path))


MMAP_OPEN = textwrap.dedent("""
    import resource, sys, time
    from metaembed_kernels import MultiVectorIndex
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    index = MultiVectorIndex.load(sys.argv[1], mmap=True, verify=False)
    seconds = time.perf_counter() - t
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(seconds, grown, index.nbytes)
""")


def test_mmap_open_reads_no_data(tmp_path):
    index = MultiVectorIndex(128, 64, dtype="bfloat16")
    index.add(torch.zeros(6000, 64, 128))  # 98 MB of vectors
    index.save(tmp_path / "big")
    out = subprocess.run([sys.executable, "-c", MMAP_OPEN, str(tmp_path / "big")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seconds, grown_kib, nbytes = out.stdout.split()
    assert int(nbytes) > 90e6
    assert int(grown_kib) < 16 * 1024, f"opening grew the RSS by {grown_kib} KiB"

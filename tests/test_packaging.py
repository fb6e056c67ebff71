"""Packaging and build: abi3 extension, one version, torch pins, the recorded build torch,
CUDA build decisions (setup.py), ptxas verbosity, the test layout (gate marker)."""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import requires_extension
from metaembed_kernels import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def load_setup():
    """setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("metaembed_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins():
    out = {}
    for line in read("scripts/pins.env").splitlines():
        line = line.split("#")[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# ---- abi3 -------------------------------------------------------------------------------
@requires_extension
def test_extension_is_built_for_the_stable_abi():
    assert _extension._C.__file__.endswith(".abi3.so"), _extension._C.__file__
    source = read("csrc/ops.cpp")
    assert "PyUnicode_AsUTF8(" not in source  # not in the limited API before Python 3.13
    with pytest.raises(TypeError):
        _extension.set_cpu_isa(3)  # the limited-API string conversion still rejects non-str
    with pytest.raises(ValueError, match="got 'nope'"):
        _extension.set_cpu_isa("nope")


# ---- one version ------------------------------------------------------------------------
def test_one_version_number_in_one_place():
    import metaembed_kernels

    assert metaembed_kernels.__version__ == importlib.metadata.version("metaembed-kernels")
    literal = re.compile(r"""(^|\n)\s*(__version__|version)\s*=\s*["'][0-9]""")
    holders = [p for p in ("pyproject.toml", "setup.py", *(
        os.path.join("metaembed_kernels", f) for f in os.listdir(os.path.join(REPO, "metaembed_kernels"))
        if f.endswith(".py"))) if literal.search(read(p))]
    assert holders == [os.path.join("metaembed_kernels", "_version.py")], holders


# ---- torch pins -------------------------------------------------------------------------
def test_one_torch_pin_per_purpose_each_in_one_place():
    p = pins()
    assert {"DEV_TORCH", "CUDA_GATE_TORCH", "COMPAT_TORCH", "COMPAT_TRITON"} <= set(p)
    files = ["Makefile", ".ci/run", "requirements-dev.txt", "benchmarks/requirements-peers.txt"]
    files += [os.path.join("scripts", f) for f in os.listdir(os.path.join(REPO, "scripts"))
              if f.endswith((".sh", ".py")) or f == "Makefile"]
    pinned = re.compile(r"torch\s*==\s*[0-9]")
    offenders = [f for f in files if pinned.search(read(f))]
    assert offenders == [], f"torch pinned outside scripts/pins.env: {offenders}"
    assert "include scripts/pins.env" in read("Makefile")
    for script in os.listdir(os.path.join(REPO, "scripts")):
        if script.endswith(".sh") and "TORCH" in read(os.path.join("scripts", script)):
            assert ". scripts/pins.env" in read(os.path.join("scripts", script)), script
        if script.endswith(".sh"):  # no default torch version of its own (`${TORCH_VERSION:-2.13.0}`)
            assert not re.search(r"TORCH_(VERSION|PIN)\w*:-[0-9]", read(os.path.join("scripts", script))), script
    # pyproject's floors are what make test-compat tests
    pyproject = read("pyproject.toml")
    assert f'"torch>={".".join(p["COMPAT_TORCH"].split(".")[:2])}"' in pyproject
    assert f'"triton>={".".join(p["COMPAT_TRITON"].split(".")[:2])}"' in pyproject


# ---- the torch the extension was built against -----------------------------------------
@requires_extension
def test_build_records_its_torch():
    info = _extension.build_info()
    assert info is not None and info["torch"] == torch.__version__


@requires_extension
def test_a_build_for_another_torch_raises_how_to_rebuild(tmp_path):
    """The package with its binary, as if built against another torch: importing it must
    raise ExtensionBuildMismatch with the rebuild command, not fall back silently."""
    pkg = tmp_path / "metaembed_kernels"
    shutil.copytree(os.path.dirname(_extension.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "_build_info.json", "w") as f:
        json.dump({"torch": "2.0.0+cu117", "torch_cuda": "11.7", "cuda": True}, f)
    code = "import metaembed_kernels"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode != 0
    assert "ExtensionBuildMismatch" in result.stderr
    assert "built against torch 2.0.0+cu117" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
    # the matching record imports
    with open(pkg / "_build_info.json", "w") as f:
        json.dump(_extension.build_info(), f)
    ok = subprocess.run([sys.executable, "-c", code + "; assert metaembed_kernels._extension.is_loaded()"],
                        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_build_only_leaves_its_own_binary_beside_it(tmp_path):
    """An older non-abi3 binary (_C.cpython-3xx-*.so) would win the import over the abi3
    build just made (the importer tries the interpreter's own suffix first): the build
    removes every other build of _C beside it, and nothing else."""
    setup = load_setup()
    names = ["_C.abi3.so", "_C.cpython-311-x86_64-linux-gnu.so", "_C.so", "_build_info.json",
             "_Cx.abi3.so", "other.cpython-311-x86_64-linux-gnu.so", "_C.py"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    removed = setup.remove_stale_binaries(str(tmp_path / "_C.abi3.so"))
    assert sorted(os.path.basename(p) for p in removed) == ["_C.cpython-311-x86_64-linux-gnu.so", "_C.so"]
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - {"_C.cpython-311-x86_64-linux-gnu.so", "_C.so"})


@requires_extension
def test_a_binary_missing_an_op_of_the_table_raises_how_to_rebuild(tmp_path):
    """A binary that registers fewer ops than the package's table (an older build found
    first) raises ExtensionBuildMismatch naming the ops and the binary, not an
    AttributeError from the autograd registration."""
    pkg = tmp_path / "metaembed_kernels"
    shutil.copytree(os.path.dirname(_extension.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "_schemas.py", "a") as f:
        f.write("\nOP_NAMES = OP_NAMES + ('an_op_this_binary_lacks',)\n")
    result = subprocess.run([sys.executable, "-c", "import metaembed_kernels"], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode != 0
    assert "ExtensionBuildMismatch" in result.stderr
    assert "does not define an_op_this_binary_lacks" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_the_link_names_the_shared_cxx_runtime(tmp_path):
    """setup.py puts a shared libstdc++ on the link line (a toolchain that links it statically
    would put a second copy in the extension): the one this process mapped, else the
    compiler's, else nothing."""
    setup = load_setup()
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /opt/x/lib/libstdc++.so.6.0.33\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/libm.so.6\n")
    assert setup.shared_cxx_runtime(maps=str(maps)) == ["/opt/x/lib/libstdc++.so.6.0.33"]
    if sys.platform.startswith("linux"):  # torch is imported here, and it needs libstdc++
        found = setup.shared_cxx_runtime()
        assert len(found) == 1 and os.path.basename(found[0]).startswith("libstdc++.so") and os.path.exists(found[0])
    no_maps = str(tmp_path / "absent")
    if shutil.which(os.environ.get("CXX", "c++").split()[0]):
        found = setup.shared_cxx_runtime(maps=no_maps)
        assert len(found) == 1 and os.path.isabs(found[0]) and os.path.exists(found[0]), found
    assert setup.shared_cxx_runtime("/nonexistent/c++", maps=no_maps) == []
    assert setup.shared_cxx_runtime("false", maps=no_maps) == []


@requires_extension
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_extension_uses_the_process_cxx_runtime():
    """The binary needs libstdc++.so.6 (the one torch loaded) and carries no copy of its
    stream code: a second copy formats numbers with the other copy's locale tables."""
    binary = _extension._C.__file__
    dynamic = subprocess.run(["readelf", "-d", "-W", binary], capture_output=True, text=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    if shutil.which("nm"):
        defined = subprocess.run(["nm", "-D", "--defined-only", binary], capture_output=True, text=True).stdout
        assert "_ZNSo9_M_insertImEERSoT_" not in defined  # std::ostream::_M_insert<unsigned long>


@requires_extension
def test_error_messages_keep_their_numbers():
    """The symptom of a second libstdc++ inside the extension: numbers vanish from the
    messages (or formatting them crashes)."""
    q, c = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"groups\[0\] = \(4, 1\) is out of range: need 1 <= r_q <= Rq=3"):
        torch.ops.metaembed.maxsim_grouped(q, c, [4], [1], None, None)
    with pytest.raises(ValueError, match="must have the same length, got 2 and 1"):
        torch.ops.metaembed.maxsim_grouped(q, c, [1, 2], [1], None, None)


# ---- CUDA build decisions (setup.py) ---------------------------------------------------
def test_cuda_arch_list_without_a_visible_gpu_is_the_documented_default():
    setup = load_setup()
    assert setup.DEFAULT_CUDA_ARCHS == "8.0;9.0+PTX"
    assert setup.DEFAULT_CUDA_ARCHS in read("README.md")
    assert setup.cuda_arch_list({}, gpu_visible=False) == setup.DEFAULT_CUDA_ARCHS
    assert setup.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": " "}, gpu_visible=False) == setup.DEFAULT_CUDA_ARCHS
    assert setup.cuda_arch_list({}, gpu_visible=True) is None  # torch takes the visible GPUs'
    assert setup.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, gpu_visible=False) == "8.6"


def test_default_arch_list_is_one_torch_accepts(monkeypatch):
    """torch turns the default into sm_80 and sm_90 code plus compute_90 PTX (this is the
    list torch 2.11 would have crashed on building, from an empty list)."""
    from torch.utils import cpp_extension

    setup = load_setup()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup.DEFAULT_CUDA_ARCHS)
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags


def test_cuda_build_decision_skips_with_one_line_or_requires():
    setup = load_setup()
    assert setup.cuda_decision("auto", "13.0", "/usr/local/cuda", (13, 0))[0] is True
    build, reason = setup.cuda_decision("auto", "12.8", "/usr/local/cuda", (13, 0))
    assert build is False and "nvcc 13.0 does not match torch's CUDA 12.8" in reason
    build, reason = setup.cuda_decision("auto", None, "/usr/local/cuda", (13, 0))
    assert build is False and "not a CUDA build" in reason
    assert setup.cuda_decision("auto", "13.0", None, None)[0] is False
    assert setup.cuda_decision("0", "13.0", "/usr/local/cuda", (13, 0))[0] is False
    with pytest.raises(RuntimeError, match="METAEMBED_BUILD_CUDA=1 but"):
        setup.cuda_decision("1", "12.8", "/usr/local/cuda", (13, 0))


def test_ptxas_verbose_only_in_the_cuda_gate():
    setup = load_setup()
    assert "-Xptxas=-v" not in setup.nvcc_flags(["-O3"], {})
    assert "-Xptxas=-v" in setup.nvcc_flags(["-O3"], {"METAEMBED_PTXAS_VERBOSE": "1"})
    assert "METAEMBED_PTXAS_VERBOSE=1" in read("scripts/cuda_gate.sh")
    assert read("setup.py").count('"-Xptxas=-v"') == 1  # one place adds it


def test_cpu_isas_build_switch():
    setup = load_setup()
    assert setup.omitted_cpu_isas("all") == [] and setup.omitted_cpu_isas("") == []
    assert setup.omitted_cpu_isas("none") == ["avx2", "avx512", "avx512_bf16", "amx"]
    assert setup.omitted_cpu_isas(" AVX2 ") == ["avx512", "avx512_bf16", "amx"]
    assert setup.omitted_cpu_isas("avx512,amx") == ["avx2", "avx512_bf16"]
    with pytest.raises(ValueError, match=r"unknown \['sse4'\]; expected all, none or a comma list of avx2"):
        setup.omitted_cpu_isas("avx2,sse4")
    with pytest.raises(ValueError, match="amx build on avx512's kernels"):
        setup.omitted_cpu_isas("avx2,amx")
    # every omitted variant's files compile to stubs: one guard per file, the macro setup.py defines
    for name in setup.CPU_ISAS:
        stem = name.replace("_", "")
        for path in (f"csrc/cpu/isa_{stem}.cpp", f"csrc/cpu/index_isa_{stem}.cpp"):
            assert read(path).count(f"!defined(METAEMBED_OMIT_{name.upper()})") == 1, path
    # the out-of-tree builds of the CUDA gate and test-compat build none and check it
    for script in ("scripts/cuda_gate.sh", "scripts/test_compat.sh"):
        assert "METAEMBED_CPU_ISAS=none" in read(script)
        assert "list(_extension.supported_cpu_isas()) == ['generic']" in read(script)


# ---- test layout ------------------------------------------------------------------------
def test_make_test_is_the_fast_loop_and_ci_runs_everything():
    makefile = read("Makefile")
    test_recipe = re.search(r"^test: install\n\t(.*)$", makefile, re.M).group(1)
    assert '-m "not gate"' in test_recipe and "--durations=15" in test_recipe
    gate_recipe = re.search(r"^gate: install\n\t(.*)$", makefile, re.M).group(1)
    assert "-m gate" in gate_recipe
    ci = read(".ci/run")
    for job in ("test", "gate", "cuda-gate", "test-compat"):
        assert re.search(rf"^job {job}$", ci, re.M), job


def test_compile_gates_carry_the_gate_marker():
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_triton.py", "--collect-only", "-q",
                             "-m", "gate", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    assert "test_compile_gate_passes_for_sm80_and_sm90" in result.stdout, result.stdout[-2000:]
    assert "test_gate_detects_a_spilling_kernel" in result.stdout

// Op schemas (common/schemas.h), defined once. Device kernels register in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd are registered in Python
// (metaembed_kernels/_autograd.py).
//
// Also the Python module `metaembed_kernels._C` itself, with a few introspection helpers
// (no pybind11: the module only needs to exist so that importing it loads the ops).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "common/schemas.h"
#include "index_schemas.h"
#include "cpu/isa_select.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(metaembed, m) {
  metaembed::define_ops(m);
  metaembed::define_index_ops(m);
}

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(metaembed::cpu::active_kernels()->name);
}

// A str argument as UTF-8 (limited API: PyUnicode_AsUTF8 is not part of it before 3.13).
std::string utf8(PyObject* arg, bool* ok) {
  PyObject* bytes = PyUnicode_AsUTF8String(arg);  // sets TypeError for a non-str
  *ok = bytes != nullptr;
  if (!bytes) return {};
  std::string out(PyBytes_AsString(bytes));
  Py_DECREF(bytes);
  return out;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  bool ok = false;
  const std::string name = utf8(arg, &ok);
  if (!ok) return nullptr;
  const char* previous = metaembed::cpu::active_kernels()->name;
  if (!metaembed::cpu::set_active_isa(name.c_str())) {
    PyErr_Format(PyExc_ValueError, "cpu isa must be 'auto' or one this CPU supports, got '%s'", name.c_str());
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

PyObject* py_supported_cpu_isas(PyObject*, PyObject*) {
  const auto names = metaembed::cpu::supported_isas();
  PyObject* list = PyList_New(0);
  for (const auto& n : names) {
    PyObject* s = PyUnicode_FromString(n.c_str());
    PyList_Append(list, s);
    Py_DECREF(s);
  }
  return list;
}

// The active ISA's calibration loop for "fp32" (fp16 too: converted to fp32) or "bf16".
const metaembed::cpu::PeakLoop* peak_loop(const char* dtype) {
  const auto* k = metaembed::cpu::active_kernels();
  if (std::strcmp(dtype, "fp32") == 0 || std::strcmp(dtype, "fp16") == 0) return &k->peak_fp32;
  if (std::strcmp(dtype, "bf16") == 0) return &k->peak_bf16;
  PyErr_Format(PyExc_ValueError, "dtype must be 'fp32', 'fp16' or 'bf16', got '%s'", dtype);
  return nullptr;
}

// Measured peak (GFLOP/s) of the active ISA's micro-kernel instruction for `dtype`, over
// `threads` threads running independent chains for about `seconds`: the calibration that
// benchmarks report every provider against. 0.0 when the ISA has no calibration loop.
PyObject* peak(const char* dtype, int threads, double seconds) {
  const metaembed::cpu::PeakLoop* loop = peak_loop(dtype);
  if (!loop) return nullptr;
  if (!loop->run) return PyFloat_FromDouble(0.0);
  if (threads <= 0) threads = at::get_num_threads();
  using clock = std::chrono::steady_clock;
  double best = 0.0;
  Py_BEGIN_ALLOW_THREADS;
  auto run = [&](int64_t iters) {  // returns seconds; records the best GFLOP/s seen
    std::vector<double> flops(threads, 0.0);
    const auto t0 = clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) flops[i] = loop->run(iters);
    });
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    double total = 0;
    for (double f : flops) total += f;
    best = std::max(best, total / dt * 1e-9);
    return dt;
  };
  // Grow the run until it lasts a third of the budget, then keep the best of three.
  int64_t iters = 1 << 14;
  while (run(iters) < seconds / 3) iters *= 2;
  best = 0.0;
  for (int rep = 0; rep < 3; ++rep) run(iters);
  Py_END_ALLOW_THREADS;
  return PyFloat_FromDouble(best);
}

PyObject* py_peak_gflops(PyObject*, PyObject* args) {
  const char* dtype = nullptr;
  int threads = 0;
  double seconds = 0.2;
  if (!PyArg_ParseTuple(args, "s|id", &dtype, &threads, &seconds)) return nullptr;
  return peak(dtype, threads, seconds);
}

PyObject* py_fma_peak_gflops(PyObject*, PyObject* args) {  // the fp32 peak (older name)
  int threads = 0;
  double seconds = 0.2;
  if (!PyArg_ParseTuple(args, "|id", &threads, &seconds)) return nullptr;
  return peak("fp32", threads, seconds);
}

PyObject* py_peak_instruction(PyObject*, PyObject* args) {
  const char* dtype = nullptr;
  if (!PyArg_ParseTuple(args, "s", &dtype)) return nullptr;
  const metaembed::cpu::PeakLoop* loop = peak_loop(dtype);
  if (!loop) return nullptr;
  return PyUnicode_FromString(loop->run ? loop->instruction : "none");
}

// Whether this build registered the CUDA kernels (csrc/cuda): tests tell "not built with
// CUDA" from "built, but a kernel is missing".
PyObject* py_built_with_cuda(PyObject*, PyObject*) {
#ifdef METAEMBED_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Instruction set the CPU kernels use."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Force the CPU kernels' instruction set; returns the previous."},
    {"supported_cpu_isas", py_supported_cpu_isas, METH_NOARGS, "Instruction sets usable on this CPU."},
    {"peak_gflops", py_peak_gflops, METH_VARARGS,
     "peak_gflops(dtype, threads=0, seconds=0.2): 'fp32' | 'fp16' | 'bf16' peak of the active ISA"},
    {"peak_instruction", py_peak_instruction, METH_VARARGS, "peak_instruction(dtype): what peak_gflops times"},
    {"fma_peak_gflops", py_fma_peak_gflops, METH_VARARGS, "fma_peak_gflops(threads=0, seconds=0.2): fp32 peak"},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "metaembed_kernels C++ ops", -1, methods};
  return PyModule_Create(&module);
}

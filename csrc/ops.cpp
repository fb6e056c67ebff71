// Op schemas (common/schemas.h), defined once. Device kernels register in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd are registered in Python
// (metaembed_kernels/_autograd.py).
//
// Also the Python module `metaembed_kernels._C` itself, with a few introspection helpers
// (no pybind11: the module only needs to exist so that importing it loads the ops).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
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

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  const char* previous = metaembed::cpu::active_kernels()->name;
  if (!metaembed::cpu::set_active_isa(name)) {
    PyErr_Format(PyExc_ValueError, "cpu isa must be 'auto' or one this CPU supports, got '%s'", name);
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

// Measured FMA peak (GFLOP/s) over `threads` threads running independent FMA chains for
// about `seconds`: the calibration that benchmarks report every provider against.
PyObject* py_fma_peak_gflops(PyObject*, PyObject* args) {
  int threads = 0;
  double seconds = 0.2;
  if (!PyArg_ParseTuple(args, "|id", &threads, &seconds)) return nullptr;
  if (threads <= 0) threads = at::get_num_threads();
  if (metaembed::cpu::fma_peak_loop(1) == 0.0) return PyFloat_FromDouble(0.0);  // no AVX2 build
  using clock = std::chrono::steady_clock;
  double best = 0.0;
  Py_BEGIN_ALLOW_THREADS;
  auto run = [&](int64_t iters) {  // returns seconds; records the best GFLOP/s seen
    std::vector<double> flops(threads, 0.0);
    const auto t0 = clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) flops[i] = metaembed::cpu::fma_peak_loop(iters);
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
    {"fma_peak_gflops", py_fma_peak_gflops, METH_VARARGS, "fma_peak_gflops(threads=0, seconds=0.2)"},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "metaembed_kernels C++ ops", -1, methods};
  return PyModule_Create(&module);
}

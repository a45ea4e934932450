// Python module stub for the setup.py build: `import red_kernels._C` loads this library, whose
// static initialisers register the red_kernels_C operators with the torch dispatcher. The CMake
// build for C++ stacks omits it and is loaded with torch.ops.load_library instead.
//
// _C.cpu_isa() names the build of the CPU row kernels that runs (common/cpu_isa.h): "base", "avx2"
// or "avx512"; _C.cpu_isa_supported() the widest this CPU can run; _C._set_cpu_isa(name) switches
// (benchmarks).
#ifdef RED_KERNELS_PYTHON_MODULE
#include <Python.h>

#include <cstring>
#include <exception>

#include "common/cpu_isa.h"

static PyObject* rk_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(red_kernels::cpu_isa_name(red_kernels::cpu_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* rk_cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(red_kernels::cpu_isa_name(red_kernels::cpu_isa_supported()));
}

// For benchmarks that compare builds side by side in one process: not thread-safe against running
// kernels' choice of build (each call picks one), and not part of the public API.
static PyObject* rk_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  red_kernels::CpuIsa want;
  if (std::strcmp(name, "base") == 0) {
    want = red_kernels::CpuIsa::kBase;
  } else if (std::strcmp(name, "avx2") == 0) {
    want = red_kernels::CpuIsa::kAvx2;
  } else if (std::strcmp(name, "avx512") == 0) {
    want = red_kernels::CpuIsa::kAvx512;
  } else {
    PyErr_Format(PyExc_ValueError, "cpu isa must be base, avx2 or avx512, got '%s'", name);
    return nullptr;
  }
  return PyUnicode_FromString(red_kernels::cpu_isa_name(red_kernels::set_cpu_isa(want)));
}

static PyMethodDef red_kernels_methods[] = {
    {"cpu_isa", rk_cpu_isa, METH_NOARGS,
     "The CPU row-kernel build that runs: 'base', 'avx2' or 'avx512' (RED_KERNELS_CPU_ISA)."},
    {"cpu_isa_supported", rk_cpu_isa_supported, METH_NOARGS,
     "The widest CPU row-kernel build this CPU can run."},
    {"_set_cpu_isa", rk_set_cpu_isa, METH_O,
     "Switch the CPU row-kernel build (capped at what the CPU supports); returns the one chosen."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef red_kernels_module = {
    PyModuleDef_HEAD_INIT, "_C", "red_kernels compiled kernels", -1, red_kernels_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&red_kernels_module); }
#endif

// Python module stub for the setup.py build: `import red_kernels._C` loads this library, whose
// static initialisers register the red_kernels_C operators with the torch dispatcher. The CMake
// build for C++ stacks omits it and is loaded with torch.ops.load_library instead.
#ifdef RED_KERNELS_PYTHON_MODULE
#include <Python.h>

static struct PyModuleDef red_kernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                                "red_kernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&red_kernels_module); }
#endif

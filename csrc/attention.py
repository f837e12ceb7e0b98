"""
csrc/train/attention.c from Python: cffi over csrc/libattention.so (`make lib`), the causal attention
forward and backward that model.py trains with on CPUs at small head sizes. Importing it raises
FileNotFoundError, naming `make lib`, when the library has not been built.
"""

import os

from cffi import FFI

from csrc import engine

LIB_PATH = os.path.join(engine.HERE, "libattention.so")
ffi = FFI()
ffi.cdef(engine.declarations(["train/attention.h"]))
lib = engine.dlopen(ffi, LIB_PATH, ["train/attention.c", "train/attention.h"])


def load(path=""):
    """The library at path (another build: the tests' kernel paths), or csrc/libattention.so for ""."""
    if path not in _builds:
        _builds[path] = ffi.dlopen(path)
    return _builds[path]


_builds = {"": lib}


def float_ptr(tensor):
    """A float * to a contiguous fp32 torch tensor's data."""
    return ffi.cast("float *", tensor.data_ptr())

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


def sequences(bounds, parents):
    """The kernels' bounds, parents and n_seqs arguments for model.c_attention's: None (one sequence) or
    contiguous int32 tensors of n_seqs + 1 offsets and n_seqs parents (or None)."""
    if bounds is None:
        return ffi.NULL, ffi.NULL, 1
    return int_ptr(bounds), ffi.NULL if parents is None else int_ptr(parents), len(bounds) - 1


def int_ptr(tensor):
    return ffi.cast("int *", tensor.data_ptr())

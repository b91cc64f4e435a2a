"""LAPACK's banded symmetric routines, called so that threads run them in parallel.

``dsbtrd`` reduces a band matrix to tridiagonal form (bulge chasing with Givens rotations, O(n^2 b))
and ``dsterf`` returns a tridiagonal matrix's eigenvalues (root-free QL/QR, O(n^2)). SciPy ships
both in ``scipy.linalg.cython_lapack``, whose functions are ``nogil`` C functions published as
capsules. Calling them through ``ctypes`` releases the GIL for the whole call, so a thread pool runs
one matrix per core; SciPy's own ``scipy.linalg.lapack`` wrappers hold the GIL and would serialise.

SciPy is imported here only (``scipy.linalg.cython_lapack``), never at package import: the CPU
spectra path does not need it.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["tridiagonalize", "tridiagonal_eigenvalues", "band_eigenvalues"]

_INT = ctypes.POINTER(ctypes.c_int)
_DOUBLE = ctypes.POINTER(ctypes.c_double)
_CHAR = ctypes.c_char_p


@functools.lru_cache(maxsize=None)
def _routine(name: str, *argtypes):
    """A ctypes function for ``scipy.linalg.cython_lapack.<name>``."""
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(address)


def _int(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def _ptr(array: np.ndarray):
    return array.ctypes.data_as(_DOUBLE)


def tridiagonalize(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal ``d`` and off-diagonal ``e`` of a tridiagonal matrix similar to a band matrix.

    ``band`` is ``[b + 1, n]`` float64 in LAPACK's lower band layout (``band[i, j] = A[j + i, j]``).
    """
    width, n = band.shape
    kd = width - 1
    d = np.empty(n)
    e = np.zeros(max(n - 1, 1))
    if kd == 0 or n == 1:
        d[:] = band[0]
        return d, e[: n - 1]
    ab = np.array(band, dtype=np.float64, order="F")  # dsbtrd overwrites its input
    work = np.empty(n)
    q = np.empty(1)
    info = ctypes.c_int(0)
    dsbtrd = _routine("dsbtrd", _CHAR, _CHAR, _INT, _INT, _DOUBLE, _INT, _DOUBLE, _DOUBLE, _DOUBLE, _INT, _DOUBLE, _INT)
    dsbtrd(b"N", b"L", ctypes.byref(_int(n)), ctypes.byref(_int(kd)), _ptr(ab), ctypes.byref(_int(width)),
           _ptr(d), _ptr(e), _ptr(q), ctypes.byref(_int(1)), _ptr(work), ctypes.byref(info))
    if info.value != 0:
        raise RuntimeError(f"LAPACK dsbtrd failed (info={info.value})")
    return d, e[: n - 1]


def tridiagonal_eigenvalues(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending, float64) of the symmetric tridiagonal matrix ``(d, e)``."""
    n = len(d)
    values = np.array(d, dtype=np.float64)
    off = np.zeros(max(n - 1, 1))
    off[: n - 1] = e
    info = ctypes.c_int(0)
    dsterf = _routine("dsterf", _INT, _DOUBLE, _DOUBLE, _INT)
    dsterf(ctypes.byref(_int(n)), _ptr(values), _ptr(off), ctypes.byref(info))
    if info.value != 0:
        raise RuntimeError(f"LAPACK dsterf did not converge (info={info.value})")
    return values


def band_eigenvalues(band: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending, float64) of a symmetric band matrix in lower band layout."""
    return tridiagonal_eigenvalues(*tridiagonalize(band))

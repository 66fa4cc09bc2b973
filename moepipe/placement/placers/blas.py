"""numpy's BLAS pinned to one thread while a placer solves.

A solve's matrix products are small (up to a few million multiply-adds, batched over layers),
yet OpenBLAS spreads each one over all its threads: on an idle machine that burns CPU on every
core for little gain (a 1,024-device solve used 1.3x its wall time in CPU), and on a machine
shared with other processes each product waits for busy cores (milliseconds per product; a
batched [64, 64, 256] x [64, 256, 64] product took 0.26 s on two threads and 0.01 s on one).
One thread also makes the results independent of the machine's core count: OpenBLAS splits
larger products differently by thread count, which changes their rounding.

Best effort: OpenBLAS (what numpy's wheels ship) is found among the process's loaded libraries
on Linux; elsewhere, or with another BLAS, this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Optional

_api: Optional[tuple] = None  # (get, set) of OpenBLAS's thread count
_searched = False
_lock = threading.Lock()
_depth = 0
_saved = 0


def openblas_threads_api() -> Optional[tuple]:
    """(get_num_threads, set_num_threads) of the OpenBLAS numpy loaded, or None."""
    global _api, _searched
    if _searched:
        return _api
    _searched = True
    import numpy  # noqa: F401  (loads its BLAS)

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in os.path.basename(line.split()[-1]).lower()})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    put.restype, put.argtypes = None, [ctypes.c_int]
                    _api = (get, put)
                    return _api
    return None


@contextmanager
def one_blas_thread():
    """Run the block with OpenBLAS on one thread, then restore its thread count (nested and
    concurrent uses: the outermost restores)."""
    global _depth, _saved
    api = openblas_threads_api()
    if api is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = api[0]()
            if _saved != 1:
                api[1](1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved != 1:
                api[1](_saved)

"""The thread count of casp's CPU kernels: numba's pool follows torch's
(``torch.set_num_threads``, ``OMP_NUM_THREADS``), so one setting governs every matmul of a
run. Each kernel splits its work over output rows, every row is summed by one thread in a
fixed order, so a result does not depend on the number of threads.

numba's OpenMP threading layer shares libgomp with torch, and starting it sets the OpenMP
thread count to numba's pool size (observed here: torch.set_num_threads(1), then the first
numba.set_num_threads, and torch reports 2 threads). The first call below starts numba's
pool and puts torch's count back."""
from __future__ import annotations

import torch

_synced = 0          # torch's thread count numba was last set to (0: numba not started)


def sync_numba_threads() -> int:
    """Set numba's thread count to torch's (capped by numba's pool size); returns it."""
    global _synced
    torch_threads = torch.get_num_threads()
    if torch_threads == _synced:
        return min(torch_threads, _pool_size())
    import numba

    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(wanted)           # the first call starts the pool
    torch.set_num_threads(torch_threads)
    _synced = torch_threads
    return wanted


def _pool_size() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS

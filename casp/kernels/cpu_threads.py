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

_started = False


def sync_numba_threads() -> int:
    """Set numba's thread count to torch's (capped by numba's pool size); returns it."""
    global _started
    import numba

    torch_threads = torch.get_num_threads()
    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if not _started:
        numba.set_num_threads(wanted)           # starts the pool
        torch.set_num_threads(torch_threads)
        _started = True
    elif numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted

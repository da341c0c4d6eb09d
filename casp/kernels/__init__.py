"""casp's own compute kernels: quantized matmuls on the CPU straight from the stored codes
(numba, multi-threaded, results independent of the thread count), and QuIP#'s activation
transform. casp.kernels.packed_matmul says how a quantized linear picks its path."""

// Reused buffers for the large outputs the CPU kernels write whole: the
// losses' (N, V) gradients, the continuous noise's z and eps.
//
// A fresh buffer from torch's CPU allocator is untouched memory (glibc maps
// every allocation above its mmap threshold anew and unmaps it when freed):
// the kernel's first write to each page takes a page fault in which the OS
// zeroes the page, and at LM sizes that costs as much as the kernel's own
// traffic. Measured on a 2-core Xeon VM, 4x512x32769 absorbing DSE
// forward+backward, with huge pages advised: fp32 31.6 -> 20.3 ms, bf16
// 30.3 -> 15.4 ms once the memory is not fresh (clear_page took ~60% of the
// step). So a freed gradient buffer goes back to a small pool instead of to
// the OS, and the next call of the same size takes it; new buffers are
// 2 MiB-aligned and advised huge pages (MADV_HUGEPAGE, Linux), which cuts the
// faults of the first call 512 times. The pool holds at most max_bytes of
// free buffers (default 2 GiB, FASTBOUND_CPU_BUFFER_CACHE=<bytes> at start-up,
// or fastbound.cpu_buffer_cache at run time; 0 turns it off), the most
// recently freed first; a call whose size finds no free buffer releases the
// free ones (the sizes changed), so buffers of stale sizes are not held. Below 1 MiB buffers come from torch's allocator (glibc
// keeps such blocks in its heap; from ~1 MiB up it maps and unmaps them, or trims
// them off the heap's top: a 256 x 3072 perturb spent ~18% in page faults).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastbound {
namespace cpu {

// An uninitialised contiguous tensor of `sizes` and `options` (CPU) whose
// memory returns to the pool when its storage dies. Its storage cannot be
// resized; every caller writes every element.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

struct BufferCache {
  int64_t max_bytes;   // most bytes of free buffers kept
  int64_t held_bytes;  // bytes of free buffers kept now
};

// Sets the most bytes kept (max_bytes >= 0; freeing what is above it), or
// only reports (max_bytes < 0).
BufferCache buffer_cache(int64_t max_bytes);

}  // namespace cpu
}  // namespace fastbound

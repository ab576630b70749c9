// Outputs of the fused CPU path, kept for reuse.
//
// From 32 MiB on glibc maps every allocation afresh, and the kernel faults in and zeroes its pages
// on the first write: at B=32 3x224x224 the 193 MB of K views cost about 10 ms of page faults,
// against 24 ms for the views themselves, every call. Below, whether glibc's heap reuses a freed
// block depends on the process's history (its mmap threshold moves with what was freed before): at
// B=256 3x32x32 (31.5 MiB) measured 0 or 1,536 page faults a call. So every output from 1 MiB on
// comes from our own mappings, advised onto transparent huge pages (Linux) and, when the tensor is
// freed, kept: the next call of the same size takes the mapping back with its pages already in
// place, as torch's CUDA caching allocator does for GPU memory. At most kMaxCachedOutputs freed
// mappings are kept (the oldest unmapped first); `release_cached_outputs` unmaps them all.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mtdl {

constexpr int64_t kOwnMappingBytes = int64_t{1} << 20;
constexpr int64_t kMaxCachedOutputs = 2;

// An uninitialised contiguous CPU tensor: from the pool from kOwnMappingBytes on (Linux), at::empty
// otherwise. The pool's tensors hold a fixed mapping (not resizable); their contents are whatever
// the last user left.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Unmaps every freed mapping the pool keeps; returns their bytes.
int64_t release_cached_outputs();

// Bytes of freed mappings the pool keeps now.
int64_t cached_output_bytes();

}  // namespace mtdl

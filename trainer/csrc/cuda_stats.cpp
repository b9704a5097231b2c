// The CUDA caching allocator's statistics, which tch does not expose: what
// torch.cuda.max_memory_allocated() and torch.cuda.reset_peak_memory_stats() read, for the
// GPU check's comparison of the memory preflight with what a learner really allocates.
// Compiled by build.rs against the headers of the libtorch the crate links, only where that
// libtorch has its CUDA backend and the CUDA runtime headers are installed.
#include <c10/cuda/CUDACachingAllocator.h>

// No C++ exception crosses into Rust: -1 (or nothing done) when libtorch refuses.
extern "C" long long rlt_cuda_peak_allocated(int device) {
  using c10::CachingAllocator::StatType;
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
  } catch (...) {
    return -1;
  }
}

extern "C" void rlt_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (...) {
  }
}

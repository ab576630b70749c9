#include "output_pool.h"

#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace mtdl {
namespace {

#ifdef __linux__
struct Mapping {
  void* ptr;
  size_t bytes;
};

class OutputPool;
OutputPool& pool();

// Freed mappings by age, behind one mutex: a tensor may be freed on any thread.
class OutputPool {
 public:
  OutputPool() {
    // A DataLoader worker forked while another thread held the lock would wait on it forever.
    pthread_atfork(nullptr, nullptr, [] { new (&pool().mutex_) std::mutex(); });
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          void* ptr = it->ptr;
          free_.erase(it);
          return ptr;
        }
      }
    }
    void* ptr = map(bytes);
    if (ptr == nullptr && release() > 0) ptr = map(bytes);  // the kept ones may be what is missing
    TORCH_CHECK(ptr != nullptr, "fused_views_cpu: cannot map ", bytes, " bytes for the output: ",
                std::strerror(errno));
    return ptr;
  }

  void give_back(void* ptr, size_t bytes) {
    std::vector<Mapping> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({ptr, bytes});
      while (static_cast<int64_t>(free_.size()) > kMaxCachedOutputs) {
        evicted.push_back(free_.front());
        free_.pop_front();
      }
    }
    for (const Mapping& m : evicted) munmap(m.ptr, m.bytes);
  }

  int64_t release() {
    std::deque<Mapping> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
    }
    int64_t bytes = 0;
    for (const Mapping& m : all) {
      munmap(m.ptr, m.bytes);
      bytes += static_cast<int64_t>(m.bytes);
    }
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t bytes = 0;
    for (const Mapping& m : free_) bytes += static_cast<int64_t>(m.bytes);
    return bytes;
  }

 private:
  // A fresh mapping (nullptr if refused), its 2 MiB-aligned part advised onto huge pages before anything
  // touches it (the first write then faults once per 2 MiB, not per 4 KiB; advice only, ignored under
  // THP "never").
  static void* map(size_t bytes) {
    void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) return nullptr;
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const auto begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
    const auto end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    return ptr;
  }

  std::mutex mutex_;
  std::deque<Mapping> free_;
};

// Never destroyed: a tensor from the pool may be freed after static destructors have run.
OutputPool& pool() {
  static OutputPool* instance = new OutputPool;
  return *instance;
}
#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "empty_output: negative size in ", sizes);
    numel *= s;
  }
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
#ifdef __linux__
  if (bytes >= kOwnMappingBytes) {
    constexpr int64_t kPage = 4096;
    const auto mapped = static_cast<size_t>((bytes + kPage - 1) / kPage * kPage);
    void* ptr = pool().take(mapped);
    return at::from_blob(ptr, sizes, [mapped](void* p) { pool().give_back(p, mapped); }, options);
  }
#endif
  return at::empty(sizes, options);
}

int64_t release_cached_outputs() {
#ifdef __linux__
  return pool().release();
#else
  return 0;
#endif
}

int64_t cached_output_bytes() {
#ifdef __linux__
  return pool().cached();
#else
  return 0;
#endif
}

}  // namespace mtdl

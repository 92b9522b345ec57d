// The pool of reused output buffers (buffer_pool.h).
#include "buffer_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastbound {
namespace cpu {
namespace {

constexpr size_t kPage = size_t(1) << 12, kHuge = size_t(1) << 21;
constexpr size_t kMinPooled = size_t(1) << 20;  // below, glibc's heap reuses freed memory itself
constexpr size_t kMinHuge = size_t(4) << 20;    // from here, 2 MiB-aligned and advised huge pages
constexpr int64_t kDefaultMaxBytes = int64_t(2) << 30;

int64_t max_bytes_from_env() {
  const char* text = std::getenv("FASTBOUND_CPU_BUFFER_CACHE");
  if (text == nullptr || *text == '\0') return kDefaultMaxBytes;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return (*end == '\0' && value >= 0) ? static_cast<int64_t>(value) : kDefaultMaxBytes;
}

struct Pool {
  std::mutex mutex;
  std::deque<std::pair<size_t, void*>> free;  // (capacity, memory), the most recently freed last
  size_t held = 0;                            // sum of the free buffers' capacities
  size_t lent = 0;                            // sum of the capacities of live tensors' buffers
  size_t max_bytes = static_cast<size_t>(max_bytes_from_env());

  // Frees the oldest free buffers until at most `limit` bytes are held; with the lock held.
  void trim(size_t limit) {
    while (!free.empty() && held > limit) {
      held -= free.front().first;
      std::free(free.front().second);
      free.pop_front();
    }
  }
};

// Never destroyed: a tensor freed during the interpreter's exit still finds it.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// Tells torch's profiler (profile_memory) of a buffer lent (+capacity) or given back (-capacity),
// as torch's CPU allocator reports its own; with the lock held.
void report(Pool& p, void* memory, int64_t change) {
  p.lent += change;
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(memory, change, p.lent, p.lent + p.held, c10::Device(c10::DeviceType::CPU));
  }
}

void give_back(void* memory, size_t capacity) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    report(p, memory, -static_cast<int64_t>(capacity));
    if (capacity <= p.max_bytes) {
      p.trim(p.max_bytes - capacity);
      p.free.emplace_back(capacity, memory);
      p.held += capacity;
      return;
    }
  }
  std::free(memory);
}

void* take(size_t capacity) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    for (auto it = p.free.rbegin(); it != p.free.rend(); ++it) {
      if (it->first == capacity) {
        void* memory = it->second;
        p.held -= capacity;
        p.free.erase(std::next(it).base());
        report(p, memory, static_cast<int64_t>(capacity));
        return memory;
      }
    }
    // A miss: the sizes changed (variable batches, an evaluation between training steps), so
    // the free buffers of the old sizes go back to the OS instead of staying held.
    p.trim(0);
  }
  void* memory = nullptr;
  const bool huge = capacity >= kMinHuge;
  if (posix_memalign(&memory, huge ? kHuge : kPage, capacity) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(memory, capacity, MADV_HUGEPAGE);  // advice only: the contents never change
#endif
  std::lock_guard<std::mutex> lock(p.mutex);
  report(p, memory, static_cast<int64_t>(capacity));
  return memory;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kMinPooled) return at::empty(sizes, options);
  const size_t unit = nbytes >= kMinHuge ? kHuge : kPage;
  const size_t capacity = (nbytes + unit - 1) & ~(unit - 1);
  void* memory = take(capacity);
  // No catch: once from_blob has wrapped the deleter, a later failure (bad_alloc) gives the
  // memory back itself, and a second give_back would lend one block twice. A failure before
  // that leaks the block, which is the safe side.
  return at::from_blob(memory, sizes, [capacity](void* m) { give_back(m, capacity); }, options);
}

BufferCache buffer_cache(int64_t max_bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (max_bytes >= 0) {
    p.max_bytes = static_cast<size_t>(max_bytes);
    p.trim(p.max_bytes);
  }
  return {static_cast<int64_t>(p.max_bytes), static_cast<int64_t>(p.held)};
}

}  // namespace cpu
}  // namespace fastbound

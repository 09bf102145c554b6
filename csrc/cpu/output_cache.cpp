// Host memory cache for the CPU kernels' large outputs.
//
// glibc serves allocations above its mmap threshold (32 MiB at most) with fresh pages
// and unmaps them on free, so every large activation is page-faulted and zeroed by the
// kernel on first write. For a B0 stage-2 activation (38 MB) that costs more than the
// fused kernel's own pass over it; below 32 MiB whether a block is fresh depends on the
// allocation history (glibc's dynamic threshold and heap trimming). Outputs of at least
// kMinBytes (64 KiB) therefore come from this cache: blocks rounded up to 64 KiB below
// 2 MiB, to 2 MiB (2 MiB aligned, advised for transparent huge pages) above; a freed
// block is kept (while the cached total stays under the cap) and handed
// to the next request of the same rounded size. Like PyTorch's CUDA caching allocator,
// cached blocks stay reserved until empty_cache(). EFFNET_CPU_CACHE_MB sets the cap
// (default 1024; 0 turns the cache off). Thread-safe; the cache object is never
// destroyed, so tensors freed during interpreter shutdown still find it.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <pybind11/stl.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/binding_registry.h"

namespace effnet::cpu {
namespace {

constexpr size_t kBlock = size_t(2) << 20;
constexpr size_t kSmallBlock = size_t(64) << 10;
constexpr size_t kMinBytes = size_t(64) << 10;

// Requests round up to 64 KiB below 2 MiB and to 2 MiB above, so a freed block serves
// every later request of its size class.
size_t rounded_size(size_t n) {
  const size_t unit = n >= kBlock ? kBlock : kSmallBlock;
  return (std::max(n, size_t(1)) + unit - 1) / unit * unit;
}

size_t cap_from_env() {
  const char* env = std::getenv("EFFNET_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0 && mb < (1LL << 40),
              "EFFNET_CPU_CACHE_MB must be a non-negative integer of MiB below 2^40, got '",
              env, "'");
  return size_t(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    const size_t size = rounded_size(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(size >= kBlock ? kBlock : kSmallBlock, size);
      TORCH_CHECK(p != nullptr, "effnet_kernels: out of host memory allocating ", size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (size >= kBlock) madvise(p, size, MADV_HUGEPAGE);  // a hint; ignored where THP is off
#endif
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = size;
      in_use_ += size;
    }
    return {p, p, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void empty_cache() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [size, list] : free_) blocks.insert(blocks.end(), list.begin(), list.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* p : blocks) std::free(p);
  }

  std::unordered_map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {{"cached_bytes", int64_t(cached_)}, {"in_use_bytes", int64_t(in_use_)},
            {"cap_bytes", int64_t(cap_)}, {"hits", hits_}, {"misses", misses_}};
  }

  bool enabled() const { return cap_ > 0; }

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // intentionally leaked, see header
    return *cache;
  }

 private:
  static void release(void* p) { instance().put_back(p); }

  void put_back(void* p) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      const size_t size = it->second;
      live_.erase(it);
      in_use_ -= size;
      if (cached_ + size <= cap_) {
        free_[size].push_back(p);
        cached_ += size;
        return;
      }
    }
    std::free(p);
  }

  const size_t cap_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t cached_ = 0, in_use_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt) {
  OutputCache& cache = OutputCache::instance();
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * options.dtype().itemsize();
  if (!cache.enabled() || nbytes < kMinBytes || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options.memory_format(fmt));
  }
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), fmt);
}

std::unordered_map<std::string, int64_t> output_cache_stats() {
  return OutputCache::instance().stats();
}

void empty_output_cache() { OutputCache::instance().empty_cache(); }

}  // namespace effnet::cpu

EFFNET_BINDINGS(bind_output_cache) {
  auto cpu = m.def_submodule("cpu");
  cpu.def("output_cache_stats", &effnet::cpu::output_cache_stats,
          "bytes cached / in use / cap and hit-miss counts of the CPU output cache");
  cpu.def("empty_output_cache", &effnet::cpu::empty_output_cache,
          "free every cached block of the CPU output cache");
  cpu.def(
      "empty_cached",
      [](std::vector<int64_t> sizes, const at::Tensor& like, bool channels_last) {
        TORCH_CHECK(like.device().is_cpu(), "empty_cached: like must be a CPU tensor, got ",
                    like.device());
        TORCH_CHECK(!channels_last || sizes.size() == 4,
                    "empty_cached: channels_last needs 4 sizes, got ", sizes.size());
        return effnet::cpu::empty_output(
            sizes, like.options(),
            channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      },
      "an uninitialized CPU tensor with like's dtype, from the output cache when large",
      pybind11::arg("sizes"), pybind11::arg("like"), pybind11::arg("channels_last"));
}

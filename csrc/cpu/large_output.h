// Output tensors for the streaming CPU kernels (student_sgd_step, param_distance), whose outputs are as large as
// the flat parameter vector and are typically freed a step later.
//
// Why not the default allocator (glibc malloc): a freshly mapped output is faulted in 4 KiB pages by the kernel's
// first write, and glibc maps them afresh more often than not. Above 32 MiB every allocation is a new mapping;
// below, freeing two 1.3 MB outputs (a 0.3M-parameter step) leaves a free heap top above glibc's trim threshold,
// which it returns to the OS, so the next call faults ~600 pages again. Measured on a 2-core VM: ~1.1 ms of
// faults for a 0.05 ms step at 0.3M parameters, ~15 ms per output at 11M (44 MB). Whether a call pays depends on
// the heap's history, so the op's time swung by 20x between runs.
//
// So outputs of at least kPooledBytes come from a small pool: a freed block is kept (at most kMaxCachedPerSize
// per size and kMaxCachedBytes in all) and handed to the next request of the same size, already faulted in. Only
// memory is reused; every call writes every element. Blocks of at least kHugeBytes are also 2 MiB aligned and
// marked MADV_HUGEPAGE (what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does), so a new one faults in 2 MiB pages
// (~3 ms for 44 MB instead of ~15); where transparent huge pages are off the advice is a no-op.
#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ltdd_fast {
namespace large_output_detail {

constexpr size_t kPooledBytes = size_t(256) << 10;  // smaller outputs: the default allocator
constexpr size_t kHugeBytes = size_t(32) << 20;     // glibc's largest mmap threshold on 64-bit
constexpr size_t kPage = size_t(4) << 10;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxCachedPerSize = 4;              // a step's two outputs and the distance's v, with room
constexpr size_t kMaxCachedBytes = size_t(512) << 20;

inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// The bytes a request of n takes: whole pages (whole huge pages from kHugeBytes), so requests of one tensor
// size share one pool entry and a huge-page block's tail is not faulted in 4 KiB pages.
inline size_t block_bytes(size_t n) { return n >= kHugeBytes ? round_up(n, kHugePage) : round_up(n, kPage); }

class Pool {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    return p;
  }
  // false: the pool is full, the caller frees the block
  bool give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& blocks = free_[bytes];
    if (blocks.size() >= kMaxCachedPerSize || cached_ + bytes > kMaxCachedBytes) return false;
    blocks.push_back(p);
    cached_ += bytes;
    return true;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors have run.
inline Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

struct Block {
  void* ptr;
  size_t bytes;
};

inline void release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  if (!pool().give(block->ptr, block->bytes)) std::free(block->ptr);
  delete block;
}

struct PooledAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return c10::DataPtr(nullptr, c10::Device(c10::DeviceType::CPU));
    const size_t bytes = block_bytes(nbytes);
    void* p = pool().take(bytes);
    if (p == nullptr) {
      const bool huge = bytes >= kHugeBytes;
      TORCH_CHECK(posix_memalign(&p, huge ? kHugePage : 64, bytes) == 0, "ltdd_fast: out of memory allocating ",
                  nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a failure changes nothing
#endif
    }
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline PooledAllocator* pooled_allocator() {
  static PooledAllocator* allocator = new PooledAllocator();  // a storage may resize itself during shutdown too
  return allocator;
}

}  // namespace large_output_detail

// An uninitialised contiguous tensor with like's shape, dtype and device (CPU).
inline at::Tensor empty_output(const at::Tensor& like) {
  if (static_cast<size_t>(like.numel()) * like.element_size() < large_output_detail::kPooledBytes)
    return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  return at::Tensor(at::detail::empty_generic(like.sizes(), large_output_detail::pooled_allocator(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type(),
                                              at::MemoryFormat::Contiguous));
}

}  // namespace ltdd_fast

// qbert's CPU kernels split their work over qbert's own thread pool while this thread runs torch serially
// (set_serial_torch below: a one-call encoder's forward), else over torch's OpenMP team (at::parallel_for),
// whose workers torch's own ops between the kernels keep awake.
//
// Why: GNU OpenMP's waiting threads spin for milliseconds (at a barrier and after a parallel region) unless
// OMP_WAIT_POLICY=PASSIVE was set before torch loaded; beside another busy process a spinning thread takes
// the core from the thread that holds the work. This pool's waiting threads spin for a bound and then
// sleep (kSpinIdle on an idle machine, so back-to-back kernels find their workers awake; kSpinShared when
// more threads are runnable than cores, so a waiting thread gives a shared core up after microseconds;
// parallel.cpp).
//
// parallel_for splits [begin, end) exactly as at::parallel_for does (the same number of contiguous chunks
// of the same size; chunk i to thread i, the calling thread taking chunk 0), at torch.get_num_threads()
// threads, so the kernels' work partition is unchanged. Like at::parallel_for it calls f once, on the calling
// thread, when the range is not above the grain, at one thread, or nested (inside a pool worker or an OpenMP
// region). While another thread's call holds the pool, the calling thread runs the same chunks itself, in
// order.
#pragma once

#include <algorithm>
#include <cstdint>

namespace qbert::cpu {

namespace detail {
// Runs fn(ctx, b, e) for each chunk [b, e) of [begin, end) of chunk_size, num_chunks (>= 2) of them.
using ChunkFn = void (*)(const void* ctx, int64_t begin, int64_t end);
void run_chunks(int64_t begin, int64_t end, int64_t chunk_size, int64_t num_chunks, ChunkFn fn, const void* ctx);
// The thread count to split for: num_threads(), or 1 when nested (see above).
int64_t split_threads();
}  // namespace detail

// The thread count qbert's kernels split for: torch.get_num_threads(), or, while this thread's torch ops
// run serially (set_serial_torch), the count torch had before.
int64_t num_threads();

// On this thread, from now on: true: torch's own ops run serially (torch.set_num_threads(1)), so no OpenMP
// worker is woken, and so none spins, between qbert's kernels, which keep the thread count torch had;
// false: torch gets that count back. Returns the previous setting. A fused encoder's forward on the CPU
// turns it on where every layer is one qbert call (qbert/nn/fused.py).
bool set_serial_torch(bool on);

// Within its scope torch's ops on this thread run at that count again, also where set_serial_torch is on:
// around a torch op that does a kernel's main work (sdpa, GELU below AVX-512).
class TorchThreads {
 public:
  TorchThreads() : serial_(set_serial_torch(false)) {}
  ~TorchThreads() { set_serial_torch(serial_); }
  TorchThreads(const TorchThreads&) = delete;
  TorchThreads& operator=(const TorchThreads&) = delete;

 private:
  bool serial_;
};

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t threads = (n > grain && n > 1) ? detail::split_threads() : 1;
  if (threads <= 1) {
    f(begin, end);
    return;
  }
  // at::parallel_for's split: min(threads, ceil(n / grain)) chunks of ceil(n / chunks) each.
  int64_t chunks = grain > 0 ? std::min<int64_t>(threads, (n + grain - 1) / grain) : threads;
  const int64_t chunk_size = (n + chunks - 1) / chunks;
  chunks = (n + chunk_size - 1) / chunk_size;
  if (chunks <= 1) {
    f(begin, end);
    return;
  }
  detail::run_chunks(begin, end, chunk_size, chunks,
                     [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); }, &f);
}

}  // namespace qbert::cpu

// qbert's CPU thread pool (parallel.h says why it exists and what parallel_for promises).
#include "cpu/parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qbert::cpu {
namespace {

// How long a waiting thread (a worker between tasks, the caller waiting for its workers) spins before it
// sleeps. A sleeping thread costs a wake-up (a futex call, and on a VM an inter-processor interrupt) when
// work comes; a spinning one holds its core. While the machine has no more runnable threads than this
// process has cores, a thread spins up to kSpinIdle: that covers the gaps between the kernels of an encoder
// forward (microseconds inside a layer; the Python between layers and torch's serial ops around the encoder
// take longer: a 50 us bound here measured slower on all-MiniLM-L6-v2 real-text batches). Beside
// other busy threads it sleeps after kSpinShared: then a core it holds is taken from a thread with work (a
// 500 us bound there measured ~1.8x slower than 50 us on BERT-base beside one busy process), and a core it
// leaves lets the scheduler move that work there.
constexpr std::chrono::nanoseconds kSpinShared{50'000};
constexpr std::chrono::nanoseconds kSpinIdle{1'000'000};
// How long an answer of oversubscribed() is reused: reading it costs a few microseconds.
constexpr std::chrono::nanoseconds kLoadRecheck{1'000'000};
// pause instructions between two reads of the clock while spinning.
constexpr int kPausesPerClockRead = 64;

int64_t allowed_cores() {
  static const int64_t cores = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? int64_t{CPU_COUNT(&set)} : int64_t{1};
  }();
  return cores;
}

// Whether more threads are runnable on the machine than this process has cores (the running count of
// /proc/loadavg, the reading thread included). Where it cannot be read: true, the safe answer.
bool oversubscribed() {
  constexpr int64_t kNever = -1;  // checked_at before the first reading (steady_clock counts up from >= 0)
  static std::atomic<int64_t> checked_at{kNever};
  static std::atomic<bool> answer{true};
  const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
  const int64_t at = checked_at.load(std::memory_order_relaxed);
  if (at != kNever && now - at < kLoadRecheck.count()) return answer.load(std::memory_order_relaxed);
  bool over = true;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    double load1, load5, load15;
    long running, total;
    if (std::fscanf(f, "%lf %lf %lf %ld/%ld", &load1, &load5, &load15, &running, &total) == 5)
      over = running > allowed_cores();
    std::fclose(f);
  }
  answer.store(over, std::memory_order_relaxed);
  checked_at.store(now, std::memory_order_relaxed);
  return over;
}

// Spins until done(), or until it should sleep (above); returns done().
template <class Done>
bool spin(const Done& done) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < kPausesPerClockRead; ++i) {
      if (done()) return true;
      _mm_pause();
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > kSpinShared && (waited > kSpinIdle || oversubscribed())) return done();
  }
}

struct Job {
  detail::ChunkFn fn;
  const void* ctx;
  int64_t begin, end, chunk_size;

  void run(int64_t chunk) const {
    const int64_t b = begin + chunk * chunk_size;
    c10::ParallelGuard guard(true);  // nested at::parallel_for / qbert parallel_for calls run inline
    fn(ctx, b, std::min(end, b + chunk_size));
  }
};

class Pool {
 public:
  // Runs job's chunks 1..chunks-1 on workers and chunk 0 on the calling thread; false (nothing run) when
  // another thread's call holds the pool.
  bool try_run(const Job& job, int64_t chunks) {
    std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
    if (!call.owns_lock()) return false;
    while (static_cast<int64_t>(workers_.size()) < chunks - 1) {
      workers_.push_back(std::make_unique<Worker>());
      std::thread(&Pool::loop, this, workers_.back().get()).detach();
    }
    job_ = &job;
    error_ = nullptr;
    pending_.store(chunks - 1);
    for (int64_t i = 0; i + 1 < chunks; ++i) {
      Worker& w = *workers_[i];
      w.chunk = i + 1;
      w.seq.fetch_add(1);  // seq_cst, against the worker's store of sleeping
      if (w.sleeping.load()) {
        std::lock_guard<std::mutex> lock(w.mu);
        w.cv.notify_one();
      }
    }
    std::exception_ptr own;
    try {
      job.run(0);
    } catch (...) {
      own = std::current_exception();
    }
    if (!spin([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(done_mu_);
      caller_sleeping_.store(true);
      done_cv_.wait(lock, [&] { return pending_.load() == 0; });
      caller_sleeping_.store(false);
    }
    if (own) std::rethrow_exception(own);
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  struct alignas(64) Worker {
    std::atomic<uint32_t> seq{0};  // bumped by the caller for each chunk it hands this worker
    std::atomic<bool> sleeping{false};
    std::mutex mu;
    std::condition_variable cv;
    int64_t chunk = 0;  // written by the caller before it bumps seq
  };

  [[noreturn]] void loop(Worker* w) {
    uint32_t seen = 0;
    for (;;) {
      if (!spin([&] { return w->seq.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> lock(w->mu);
        w->sleeping.store(true);  // seq_cst, against the caller's bump of seq
        w->cv.wait(lock, [&] { return w->seq.load() != seen; });
        w->sleeping.store(false);
      }
      seen = w->seq.load(std::memory_order_acquire);
      try {
        job_->run(w->chunk);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
        std::lock_guard<std::mutex> lock(done_mu_);
        done_cv_.notify_one();
      }
    }
  }

  std::mutex call_mu_;  // one call at a time
  std::vector<std::unique_ptr<Worker>> workers_;
  const Job* job_ = nullptr;
  std::atomic<int64_t> pending_{0};  // chunks handed out and not finished
  std::atomic<bool> caller_sleeping_{false};
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  std::mutex error_mu_;
  std::exception_ptr error_;  // the first exception a worker's chunk threw
};

// Workers never exit, so the pool is never destroyed; a forked child makes a pool of its own on first use
// (its parent's workers do not exist there).
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
  std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool;
    if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;  // another thread installed one first: p now holds it
  }
  return *p;
}

// While this thread's torch ops run serially: the thread count torch had before (0: they do not).
thread_local int64_t t_serial_torch_threads = 0;

}  // namespace

int64_t num_threads() { return t_serial_torch_threads > 0 ? t_serial_torch_threads : at::get_num_threads(); }

bool set_serial_torch(bool on) {
  const bool was = t_serial_torch_threads > 0;
  if (on && !was) {
    t_serial_torch_threads = at::get_num_threads();
    at::set_num_threads(1);
  } else if (!on && was) {
    at::set_num_threads(static_cast<int>(t_serial_torch_threads));
    t_serial_torch_threads = 0;
  }
  return was;
}

namespace detail {

int64_t split_threads() { return at::in_parallel_region() ? 1 : num_threads(); }

void run_chunks(int64_t begin, int64_t end, int64_t chunk_size, int64_t num_chunks, ChunkFn fn, const void* ctx) {
  const Job job{fn, ctx, begin, end, chunk_size};
  if (t_serial_torch_threads == 0) {
    // Torch's own ops run on OpenMP around this call (an op-by-op forward): its workers are awake and
    // spinning, and a second pool beside them would compete for the cores. One chunk to each.
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) job.run(c);
    });
    return;
  }
  if (pool().try_run(job, num_chunks)) return;
  for (int64_t i = 0; i < num_chunks; ++i) job.run(i);  // the pool is busy with another thread's call
}

}  // namespace detail
}  // namespace qbert::cpu

#include "cpu_kernels/thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ktjax {
namespace {

// The ticket packs (generation, chunk count, next chunk) in one atomic word so that a
// worker waking late can never claim a chunk of a job other than the one it saw: a claim
// is a CAS that fails once the generation moves on or the chunks run out.
constexpr int kChunkBits = 16;
constexpr uint64_t kChunkMask = (uint64_t{1} << kChunkBits) - 1;
constexpr int kMaxThreads = static_cast<int>(kChunkMask);
// Between jobs a worker polls before it sleeps, so a decode step's many short calls find it
// awake (waking a sleeper costs tens of µs). It first spins on PAUSE (500 take ~12 µs on Zen,
// ~25 µs on Sapphire Rapids), then yields the CPU between polls: a pinned worker that only
// spun would hold its CPU against XLA's own threads running the ops between our calls.
constexpr int kPauseSpins = 500;
constexpr int kDefaultPollMicros = 1000;

uint32_t gen_of(uint64_t t) { return static_cast<uint32_t>(t >> (2 * kChunkBits)); }
uint64_t count_of(uint64_t t) { return (t >> kChunkBits) & kChunkMask; }
uint64_t next_of(uint64_t t) { return t & kChunkMask; }

thread_local bool t_in_parallel = false;  // nested calls run inline

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n;
  int64_t chunks;
  std::atomic<int64_t> remaining;
  std::mutex error_mutex;
  std::exception_ptr error;
};

class Pool {
 public:
  explicit Pool(int threads) { start(threads); }

  int size() const { return threads_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    stop_workers();
    start(threads);
  }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    const int64_t chunks = std::min<int64_t>(n, threads_);
    if (t_in_parallel || !job_lock.owns_lock() || chunks == 1) {
      fn(0, n);
      return;
    }
    Job job;
    job.fn = &fn;
    job.n = n;
    job.chunks = chunks;
    job.remaining.store(chunks, std::memory_order_relaxed);
    job_.store(&job, std::memory_order_relaxed);
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      gen = ++generation_;  // wraps; only equality matters
      ticket_.store((uint64_t(gen) << (2 * kChunkBits)) | (uint64_t(chunks) << kChunkBits),
                    std::memory_order_release);
    }
    wake_.notify_all();

    t_in_parallel = true;
    work_on(gen);
    t_in_parallel = false;
    while (job.remaining.load(std::memory_order_acquire) != 0) cpu_relax();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void start(int threads) {
    threads_ = threads;
    poll_for_ = std::chrono::microseconds(poll_micros());
    stop_ = false;
    const std::vector<int> cpus = pinning_cpus(threads);
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { worker_loop(); });
      if (!cpus.empty()) pin(workers_.back(), cpus[i]);
    }
  }

  // CPUs to pin workers to, one each (worker i to the i-th CPU this process may run on; the
  // calling thread, XLA's, stays free): a worker that migrates loses its cache and its spin.
  // Empty (no pinning) with KTJAX_PIN_THREADS=0 or when the process may use fewer CPUs than
  // there are threads.
  static std::vector<int> pinning_cpus(int threads) {
    const char* env = std::getenv("KTJAX_PIN_THREADS");
    if (env != nullptr && std::string(env) == "0") return {};
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return {};
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    if (static_cast<int>(cpus.size()) < threads) return {};
    return cpus;
  }

  // How long an idle worker polls before it sleeps: KTJAX_SPIN_US, else 1 ms.
  static int64_t poll_micros() {
    const char* env = std::getenv("KTJAX_SPIN_US");
    if (env == nullptr) return kDefaultPollMicros;
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return end != env && *end == '\0' && v >= 0 ? v : kDefaultPollMicros;
  }

  static void pin(std::thread& t, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(t.native_handle(), sizeof set, &set);  // best effort
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  // Claims and runs chunks of generation `gen` until none is left.
  void work_on(uint32_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while (gen_of(t) == gen && next_of(t) < count_of(t)) {
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      // A claimed, unfinished chunk keeps the job (and its caller's stack) alive.
      Job* job = job_.load(std::memory_order_relaxed);
      const int64_t c = static_cast<int64_t>(next_of(t));
      const int64_t begin = job->n * c / job->chunks;
      const int64_t end = job->n * (c + 1) / job->chunks;
      try {
        (*job->fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(job->error_mutex);
        if (!job->error) job->error = std::current_exception();
      }
      job->remaining.fetch_sub(1, std::memory_order_acq_rel);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void worker_loop() {
    t_in_parallel = true;
    uint32_t seen = gen_of(ticket_.load(std::memory_order_acquire));
    for (;;) {
      uint32_t gen = poll(seen);
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        gen = generation_;
      }
      seen = gen;
      work_on(gen);
    }
  }

  // The generation after `seen` once it is published, or `seen` when none came within the
  // poll time.
  uint32_t poll(uint32_t seen) const {
    if (poll_for_.count() == 0) return gen_of(ticket_.load(std::memory_order_acquire));
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      const uint32_t gen = gen_of(ticket_.load(std::memory_order_acquire));
      if (gen != seen) return gen;
      if (i < kPauseSpins) {
        cpu_relax();
      } else {
        if (std::chrono::steady_clock::now() - start >= poll_for_) return seen;
        sched_yield();
      }
    }
  }

  int threads_ = 1;
  std::chrono::microseconds poll_for_{kDefaultPollMicros};
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // one parallel_for at a time
  std::mutex wake_mutex_;
  std::condition_variable wake_;
  bool stop_ = false;          // guarded by wake_mutex_
  uint32_t generation_ = 0;    // guarded by wake_mutex_; mirrored in ticket_
  std::atomic<uint64_t> ticket_{0};
  std::atomic<Job*> job_{nullptr};
};

int default_threads() {
  if (const char* env = std::getenv("KTJAX_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= kMaxThreads) return static_cast<int>(v);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
}

std::mutex g_pool_mutex;
Pool* g_pool = nullptr;  // never destroyed: sleeping workers must not block process exit
pid_t g_pool_pid = 0;

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  // After fork() the child has none of the parent's workers: start a fresh pool and leak
  // the old one, whose threads do not exist here.
  if (g_pool == nullptr || g_pool_pid != getpid()) {
    g_pool = new Pool(default_threads());
    g_pool_pid = getpid();
  }
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(n, fn);
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads) {
    throw std::invalid_argument("num_threads must be in [1, " + std::to_string(kMaxThreads) +
                                "], got " + std::to_string(n));
  }
  pool().resize(n);
}

}  // namespace ktjax

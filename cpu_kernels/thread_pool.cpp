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

#include "cpu_kernels/numa.h"

namespace ktjax {
namespace {

// The ticket packs (generation, chunk count, next chunk) in one atomic word so that a
// worker waking late can never claim a chunk of a job other than the one it saw: a claim
// is a CAS that fails once the generation moves on or the chunks run out. A fixed job
// (chunk i on thread i) carries next = kFixed, which no claim accepts.
constexpr int kChunkBits = 16;
constexpr uint64_t kChunkMask = (uint64_t{1} << kChunkBits) - 1;
constexpr uint64_t kFixed = kChunkMask;
constexpr int kMaxThreads = static_cast<int>(kChunkMask) - 1;
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

// Host kernels compute with IEEE denormals on every thread. XLA's threads flush them
// (FTZ/DAZ), and a pool first started from an FFI call would hand that mode on to its workers
// (threads inherit it), so a result would depend on the thread that computed it: MXFP4's two
// smallest scales are denormal, and a dequantization flushed them to zero intermittently.
class IeeeDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  IeeeDenormals() : saved_(__builtin_ia32_stmxcsr()) { __builtin_ia32_ldmxcsr(saved_ & ~kFlushBits); }
  ~IeeeDenormals() { __builtin_ia32_ldmxcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) and DAZ (bit 6)
  unsigned saved_;
#endif
};

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
  int nodes() const { return static_cast<int>(node_ids_.size()); }
  const std::vector<int>& node_first() const { return node_first_; }
  const std::vector<int>& node_ids() const { return node_ids_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    stop_workers();
    start(threads);
  }

  // Runs [0, n) in `chunks` contiguous chunks (0: one per thread). fixed: n is the thread
  // count and thread i runs chunk [i, i + 1) (its node's share).
  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t chunks = 0, bool fixed = false) {
    if (n <= 0) return;
    const IeeeDenormals ieee;  // for the caller's chunks (workers set it once: worker_loop)
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    chunks = std::min<int64_t>({n, chunks > 0 ? chunks : threads_, static_cast<int64_t>(kFixed) - 1});
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
      ticket_.store((uint64_t(gen) << (2 * kChunkBits)) | (uint64_t(chunks) << kChunkBits) | (fixed ? kFixed : 0),
                    std::memory_order_release);
    }
    wake_.notify_all();

    t_in_parallel = true;
    work_on(gen, 0);
    t_in_parallel = false;
    while (job.remaining.load(std::memory_order_acquire) != 0) cpu_relax();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void start(int threads) {
    threads_ = threads;
    poll_for_ = std::chrono::microseconds(poll_micros());
    stop_ = false;
    const std::vector<int> cpus = place(threads);
    // The generation a new worker has seen is the one before it was started, not what it
    // reads once running: a job published in between (a fixed one waits for every thread)
    // must not look old to it.
    uint32_t started_at;
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      started_at = generation_;
    }
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this, i, started_at] { worker_loop(i, started_at); });
      if (!cpus.empty()) pin(workers_.back(), cpus[i]);
    }
  }

  // The CPU of each thread (thread 0, the caller -- XLA's thread -- stays free), node by
  // node, and the nodes' thread ranges in node_first_. A worker that migrated would lose its
  // cache and its spin. Several nodes: threads in proportion to each node's CPUs, at least
  // one each. No pinning (empty; one node) with KTJAX_PIN_THREADS=0 or when the process may
  // use fewer CPUs than there are threads.
  std::vector<int> place(int threads) {
    node_ids_ = {-1};
    node_first_ = {0, threads};
    const char* env = std::getenv("KTJAX_PIN_THREADS");
    if (env != nullptr && std::string(env) == "0") return {};
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return {};
    std::vector<int> allowed;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) allowed.push_back(c);
    if (static_cast<int>(allowed.size()) < threads) return {};
    const std::vector<NumaNode> nodes = read_numa_nodes(numa_nodes_dir(), allowed);
    if (nodes.size() < 2 || threads < static_cast<int>(nodes.size())) return allowed;
    std::vector<int> count;
    int64_t total = 0, sum = 0;
    for (const NumaNode& n : nodes) total += static_cast<int64_t>(n.cpus.size());
    for (const NumaNode& n : nodes) {
      count.push_back(std::max<int>(1, static_cast<int>(threads * static_cast<int64_t>(n.cpus.size()) / total)));
      sum += count.back();
    }
    for (size_t k = 0; sum != threads; k = (k + 1) % nodes.size()) {  // settle the rounding
      if (sum > threads && count[k] > 1) --count[k], --sum;
      if (sum < threads && count[k] < static_cast<int>(nodes[k].cpus.size())) ++count[k], ++sum;
    }
    std::vector<int> cpus;
    node_ids_.clear();
    node_first_ = {0};
    for (size_t k = 0; k < nodes.size(); ++k) {
      cpus.insert(cpus.end(), nodes[k].cpus.begin(), nodes[k].cpus.begin() + count[k]);
      node_ids_.push_back(nodes[k].id);
      node_first_.push_back(static_cast<int>(cpus.size()));
    }
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

  // Runs this thread's chunks of generation `gen`: of a fixed job, chunk `self`; otherwise
  // claims chunks until none is left.
  void work_on(uint32_t gen, int self) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    if (gen_of(t) == gen && next_of(t) == kFixed) {
      // This thread's chunk is unfinished, so the job (and its caller's stack) is alive.
      if (static_cast<uint64_t>(self) < count_of(t)) run_chunk(job_.load(std::memory_order_relaxed), self);
      return;
    }
    while (gen_of(t) == gen && next_of(t) < count_of(t)) {
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      // A claimed, unfinished chunk keeps the job alive.
      run_chunk(job_.load(std::memory_order_relaxed), static_cast<int64_t>(next_of(t)));
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  static void run_chunk(Job* job, int64_t c) {
    try {
      (*job->fn)(job->n * c / job->chunks, job->n * (c + 1) / job->chunks);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job->error_mutex);
      if (!job->error) job->error = std::current_exception();
    }
    job->remaining.fetch_sub(1, std::memory_order_acq_rel);
  }

  void worker_loop(int self, uint32_t seen) {
    t_in_parallel = true;
    const IeeeDenormals ieee;
    for (;;) {
      uint32_t gen = poll(seen);
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        gen = generation_;
      }
      seen = gen;
      work_on(gen, self);
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
  std::vector<int> node_ids_;    // system number of each node the threads are spread over
  std::vector<int> node_first_;  // node k's threads: [node_first_[k], node_first_[k + 1])
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

void parallel_for_each(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(n, fn, /*chunks=*/n);
}

void parallel_for_balanced(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(n, fn, /*chunks=*/int64_t{8} * pool().size());
}

int num_threads() { return pool().size(); }

int num_nodes() { return pool().nodes(); }

std::vector<int> node_ids() { return pool().node_ids(); }

void parallel_for_nodes(const std::function<void(int, int, int64_t, int64_t)>& fn) {
  Pool& p = pool();
  const int nodes = p.nodes();
  const std::vector<int>& first = p.node_first();
  // Thread i's part is part i - first[k] of its node k. Several nodes: each thread runs its
  // own part (fixed); one node: any thread may take any part.
  p.run(p.size(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int k = static_cast<int>(std::upper_bound(first.begin(), first.end(), i) - first.begin()) - 1;
      fn(k, nodes, i - first[k], first[k + 1] - first[k]);
    }
  }, /*chunks=*/0, /*fixed=*/nodes > 1);
}

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads) {
    throw std::invalid_argument("num_threads must be in [1, " + std::to_string(kMaxThreads) +
                                "], got " + std::to_string(n));
  }
  pool().resize(n);
}

}  // namespace ktjax

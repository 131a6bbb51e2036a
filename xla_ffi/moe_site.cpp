#include "xla_ffi/moe_site.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "cpu_kernels/isa.h"
#include "cpu_kernels/moe/moe.h"
#include "cpu_kernels/store/store.h"
#include "xla_ffi/cuda_driver.h"

namespace ktjax {
namespace {

std::mutex g_sites_mu;
std::map<int64_t, std::unique_ptr<MoeSite>> g_sites;
int64_t g_next_site = 1;

std::atomic<bool> g_dry_run{false};

std::mutex g_error_mu;
std::string g_error;

// Page-locked memory through the driver; nullptr where there is no usable CUDA driver.
void* pinned_alloc(size_t bytes) {
  const CudaDriver& d = cuda_driver();
  if (!d.error.empty() || d.init(0) != 0) return nullptr;
  CuContext current = nullptr;
  bool pushed = false;
  if (d.ctx_get_current(&current) != 0 || current == nullptr) {
    int dev = 0;
    CuContext primary = nullptr;
    if (d.device_get(&dev, 0) != 0 || d.primary_ctx_retain(&primary, dev) != 0) return nullptr;
    if (d.ctx_push(primary) != 0) return nullptr;
    pushed = true;
  }
  void* p = nullptr;
  if (d.host_alloc(&p, bytes, kCuMemHostAllocPortable) != 0) p = nullptr;
  if (pushed) {
    CuContext popped = nullptr;
    d.ctx_pop(&popped);
  }
  return p;
}

// The worker that runs submitted jobs: one thread for the process (jobs of one program run
// one after the other anyway); the MoE kernel spreads each over the host pool from here.
class Worker {
 public:
  void push(MoeSite* site) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(site);
    }
    pending_.fetch_add(1, std::memory_order_release);
    cv_.notify_one();
  }

  static Worker& get() {
    // Never destroyed: the detached thread may outlive static destruction at exit.
    static Worker* w = [] {
      auto* w = new Worker;
      std::thread([w] { w->loop(); }).detach();
      return w;
    }();
    return *w;
  }

 private:
  void loop() {
    for (;;) {
      // Spin briefly first: in a decode step the next layer's job follows within microseconds.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
      while (pending_.load(std::memory_order_acquire) == 0 &&
             std::chrono::steady_clock::now() < spin_until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      MoeSite* site = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        site = queue_.front();
        queue_.pop_front();
      }
      pending_.fetch_sub(1, std::memory_order_relaxed);
      site->run();
      site->done.fetch_add(1, std::memory_order_release);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<MoeSite*> queue_;
  std::atomic<int64_t> pending_{0};
};

void record_moe_site_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  if (g_error.empty()) g_error = what;
}

}  // namespace

std::string take_moe_site_error() {
  std::lock_guard<std::mutex> lock(g_error_mu);
  std::string e;
  e.swap(g_error);
  return e;
}

void set_moe_dry_run(bool on) { g_dry_run.store(on); }

void MoeSite::run() {
  if (g_dry_run.load(std::memory_order_relaxed)) return std::fill(out, out + tokens * hidden, 0.f);
  try {
    const int64_t l = *layer;
    if (l < 0 || l >= static_cast<int64_t>(handles.size()))
      throw std::invalid_argument("layer index " + std::to_string(l) + " outside the " +
                                  std::to_string(handles.size()) + " expert sets");
    auto sw = store_get(handles[l]);
    const ExpertSet ex = expert_set(*sw, handles[l]);
    if (ex.hidden != hidden)
      throw std::invalid_argument("expert set " + std::to_string(handles[l]) + " has hidden size " +
                                  std::to_string(ex.hidden) + ", the call " + std::to_string(hidden));
    moe_forward(ex, MoeArgs{x, ids, weights, tokens, top_k, out}, active_isa());
  } catch (const std::exception& e) {
    std::fill(out, out + tokens * hidden, 0.f);
    record_moe_site_error("host MoE (site " + std::to_string(id) + ", layer " + std::to_string(*layer) +
                          "): " + e.what());
  } catch (...) {  // nothing may escape the worker thread
    std::fill(out, out + tokens * hidden, 0.f);
    record_moe_site_error("host MoE (site " + std::to_string(id) + "): unknown failure");
  }
}

MoeSite& reserve_moe_site(int64_t tokens, int64_t hidden, int64_t top_k,
                          const std::vector<int64_t>& handles, bool pinned, int64_t at) {
  if (tokens < 1 || hidden < 1 || top_k < 1)
    throw std::invalid_argument("moe site: tokens, hidden and top_k must be positive, got " +
                                std::to_string(tokens) + ", " + std::to_string(hidden) + ", " +
                                std::to_string(top_k));
  if (handles.empty()) throw std::invalid_argument("moe site: no expert sets (handles is empty)");
  if (at < 0) throw std::invalid_argument("moe site: id " + std::to_string(at) + " is negative");
  // Held throughout, so a checked id stays free until it is ours (reservations are rare:
  // one per traced call or exported site).
  std::lock_guard<std::mutex> lock(g_sites_mu);
  if (at > 0 && g_sites.count(at))
    throw std::invalid_argument("moe site " + std::to_string(at) + " is taken");
  auto site = std::make_unique<MoeSite>();
  site->tokens = tokens;
  site->hidden = hidden;
  site->top_k = top_k;
  site->handles = handles;
  // One allocation, each buffer 64-byte aligned.
  auto up = [](size_t b) { return (b + 63) / 64 * 64; };
  const size_t xb = up(site->x_bytes()), rb = up(site->route_bytes());
  const size_t total = 2 * xb + 2 * rb + 64;
  uint8_t* base = pinned ? static_cast<uint8_t*>(pinned_alloc(total)) : nullptr;
  site->pinned = base != nullptr;
  if (base == nullptr) {
    base = static_cast<uint8_t*>(std::aligned_alloc(64, total));
    if (base == nullptr) throw std::bad_alloc();
  }
  std::memset(base, 0, total);
  site->x = reinterpret_cast<float*>(base);
  site->out = reinterpret_cast<float*>(base + xb);
  site->ids = reinterpret_cast<int32_t*>(base + 2 * xb);
  site->weights = reinterpret_cast<float*>(base + 2 * xb + rb);
  site->layer = reinterpret_cast<int32_t*>(base + 2 * xb + 2 * rb);
  site->id = at > 0 ? at : g_next_site;
  g_next_site = std::max(g_next_site, site->id + 1);
  MoeSite& ref = *site;
  g_sites[ref.id] = std::move(site);
  return ref;
}

void advance_moe_sites(int64_t first) {
  std::lock_guard<std::mutex> lock(g_sites_mu);
  g_next_site = std::max(g_next_site, first);
}

MoeSite* find_moe_site(int64_t id) {
  std::lock_guard<std::mutex> lock(g_sites_mu);
  auto it = g_sites.find(id);
  return it == g_sites.end() ? nullptr : it->second.get();
}

void submit_moe_job(MoeSite* site) {
  site->submitted.fetch_add(1, std::memory_order_relaxed);
  Worker::get().push(site);
}

void wait_moe_job(MoeSite* site, double timeout_s) {
  const int64_t want = site->submitted.load(std::memory_order_relaxed);
  const auto start = std::chrono::steady_clock::now();
  // Spin briefly, then yield (the host pool's threads may want this core: the job of a
  // decode step takes a fraction of a millisecond), then sleep.
  for (int64_t i = 0; site->done.load(std::memory_order_acquire) < want; ++i) {
    if (i < 2000) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s) {
      std::fill(site->out, site->out + site->tokens * site->hidden, 0.f);
      record_moe_site_error("host MoE (site " + std::to_string(site->id) + "): no result after " +
                            std::to_string(static_cast<int>(timeout_s)) + " s");
      return;
    }
    if (waited < 0.01)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace ktjax

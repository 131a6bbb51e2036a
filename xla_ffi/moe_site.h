// A call site of the stream-ordered host MoE (ktjax_moe_submit / ktjax_moe_wait): the host
// buffers one traced call (one bucket of one program) exchanges with the device, reserved
// once when the program is traced, at fixed addresses (pinned by cuMemHostAlloc where a CUDA
// driver is present), and the state of its job on the host MoE worker.
//
// The job reads the layer index and routing the device copied into the buffers, picks the
// layer's expert set and runs the fused MoE kernel on the host pool. An expert id of -1 is a
// slot the host skips (its expert runs on the device). A failing job writes zeros and records
// its error, which take_moe_site_error() hands to the caller after the step: a host function
// inside a CUDA graph has no other way to fail, and must not hang or crash the process.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace ktjax {

struct MoeSite {
  int64_t id = 0;
  int64_t tokens = 0, hidden = 0, top_k = 0;
  std::vector<int64_t> handles;  // expert set per layer
  bool pinned = false;           // buffers from cuMemHostAlloc (CUDA handlers need that)
  // Host buffers: x f32[T, H], ids s32[T, k], weights f32[T, k], layer s32, out f32[T, H].
  float* x = nullptr;
  int32_t* ids = nullptr;
  float* weights = nullptr;
  int32_t* layer = nullptr;
  float* out = nullptr;
  // Jobs submitted and finished (the worker's release store orders `out` before `done`).
  std::atomic<int64_t> submitted{0}, done{0};

  size_t x_bytes() const { return static_cast<size_t>(tokens * hidden) * sizeof(float); }
  size_t route_bytes() const { return static_cast<size_t>(tokens * top_k) * 4; }

  // Runs the job on the calling thread: out = MoE(x), or zeros and a recorded error.
  void run();
};

// Reserves a site's buffers (never freed: a compiled program may run until the process ends).
// pinned: try page-locked memory through the CUDA driver (device 0's primary context when the
// calling thread has none current), else ordinary memory. at: the id to take (an exported
// program names its sites), 0 for the next free one. Throws std::invalid_argument on a bad
// shape, empty handles or a taken id.
MoeSite& reserve_moe_site(int64_t tokens, int64_t hidden, int64_t top_k,
                          const std::vector<int64_t>& handles, bool pinned, int64_t at = 0);
// Site ids given out from now on are at least `first` (an export's own range).
void advance_moe_sites(int64_t first);
// The site with this id, or nullptr.
MoeSite* find_moe_site(int64_t id);

// Hands the job to the host MoE worker thread and returns at once (a CUDA host function).
void submit_moe_job(MoeSite* site);
// Waits for the site's last submitted job (a CUDA host function; blocks its stream). Past
// `timeout_s` the wait gives up, zeroes `out` and records an error rather than hang (one
// layer's job takes milliseconds, a prefill chunk's well under a second).
void wait_moe_job(MoeSite* site, double timeout_s = 30.0);

// Dry run (for measurements): jobs write zeros without running the kernel, so a step's time
// is everything but the host experts' compute.
void set_moe_dry_run(bool on);

// The first error recorded by a job since the last call ("" if none), cleared by the call.
std::string take_moe_site_error();

}  // namespace ktjax

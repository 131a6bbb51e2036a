// Process-wide worker pool: the only global mutable state in the native module. Workers spin
// briefly, then sleep; each is pinned to its own CPU unless KTJAX_PIN_THREADS=0 or the process
// may use fewer CPUs than there are threads.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace ktjax {

// Splits [0, n) into at most num_threads() contiguous chunks and runs fn(begin, end) on
// each, using the pool's workers and the calling thread; returns when all chunks are done.
// The first exception thrown by fn is rethrown here. A call made from inside fn, or while
// another thread's parallel_for is running, runs fn(0, n) on the calling thread instead.
void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

// Like parallel_for, but every index is its own chunk (past 65534 indices, neighbours share
// one), claimed by whichever thread is free: for work items of uneven cost, or threads that
// may stall (a shared or virtual machine), where equal static shares leave everyone waiting
// for the slowest thread. Put the costliest items first.
void parallel_for_each(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

// Like parallel_for, but in up to 8 chunks per thread, claimed as threads come free: for
// passes over many rows of even cost, where a static split would wait for the slowest core
// (on a shared or virtual machine, some cores run at half the speed of others; figures in
// docs/kernel-notes.md#moe-row-passes).
void parallel_for_balanced(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

// Memory nodes the pool's threads are spread over: 1, unless workers are pinned on a machine
// with several NUMA nodes. node_ids(): their system numbers (-1 for the single-node case).
int num_nodes();
std::vector<int> node_ids();

// Runs fn(node, nodes, part, parts) for every part of every node, part `part` of node `node`
// on a thread of that node (pinned there) when there are several nodes; on one node, any
// thread takes any of num_threads() parts. Kernels split weights by node first (node k's
// share of the row blocks sits in node k's memory, see store) and then by part.
void parallel_for_nodes(const std::function<void(int node, int nodes, int64_t part, int64_t parts)>& fn);

// Threads taking part in parallel_for, the caller included. Defaults to the environment
// variable KTJAX_NUM_THREADS, else the hardware concurrency.
int num_threads();

// Resizes the pool (n >= 1; throws std::invalid_argument otherwise). Waits for a
// parallel_for in flight to finish.
void set_num_threads(int n);

}  // namespace ktjax

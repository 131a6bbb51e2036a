// Memory nodes (NUMA) for the thread pool and the weight store: on a machine with several,
// each node holds a share of every packed weight's row blocks in its own memory, and only
// that node's threads read them (thread_pool.h parallel_for_nodes).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ktjax {

struct NumaNode {
  int id;                 // the system's node number
  std::vector<int> cpus;  // its CPUs this process may use
};

// The nodes holding CPUs of `allowed`, from node_dir/node<N>/cpulist (sysfs format, e.g.
// "0-3,8"); nodes with none of them are left out. Empty if node_dir holds no node.
std::vector<NumaNode> read_numa_nodes(const std::string& node_dir, const std::vector<int>& allowed);

// Where the machine's nodes are read from: KTJAX_NUMA_NODES_DIR (tests give a made-up
// topology), else /sys/devices/system/node.
std::string numa_nodes_dir();

// Part p of `parts` equal shares of [0, n).
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t p, int64_t parts) {
  return {n * p / parts, n * (p + 1) / parts};
}

// Asks the kernel to keep the whole pages inside [p, p + bytes) on node `node_id` (moving
// those already touched). Best effort: an error leaves the default placement.
void bind_to_node(void* p, size_t bytes, int node_id);

}  // namespace ktjax

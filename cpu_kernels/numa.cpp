#include "cpu_kernels/numa.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace ktjax {
namespace {

// "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; malformed parts are skipped.
std::vector<int> parse_cpulist(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    int lo = 0, hi = 0;
    char dash = 0;
    std::stringstream ps(part);
    if (!(ps >> lo)) continue;
    hi = lo;
    if (ps >> dash && !(dash == '-' && ps >> hi)) continue;
    for (int c = lo; c <= hi && c - lo < 65536; ++c) cpus.push_back(c);
  }
  return cpus;
}

}  // namespace

std::vector<NumaNode> read_numa_nodes(const std::string& node_dir, const std::vector<int>& allowed) {
  std::vector<NumaNode> nodes;
  // Node numbers are small and may have gaps (offline nodes): probe a fixed range.
  for (int id = 0; id < 1024; ++id) {
    std::ifstream f(node_dir + "/node" + std::to_string(id) + "/cpulist");
    if (!f) continue;
    std::string text;
    std::getline(f, text);
    NumaNode node{id, {}};
    for (int c : parse_cpulist(text))
      if (std::find(allowed.begin(), allowed.end(), c) != allowed.end()) node.cpus.push_back(c);
    if (!node.cpus.empty()) nodes.push_back(std::move(node));
  }
  return nodes;
}

std::string numa_nodes_dir() {
  const char* env = std::getenv("KTJAX_NUMA_NODES_DIR");
  return env != nullptr ? env : "/sys/devices/system/node";
}

void bind_to_node(void* p, size_t bytes, int node_id) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
  if (node_id < 0 || node_id >= 1024 || end <= begin) return;
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[node_id / (8 * sizeof(unsigned long))] |= 1UL << (node_id % (8 * sizeof(unsigned long)));
  constexpr int kMpolBind = 2, kMpolMfMove = 1 << 1;  // pages already touched move too
#ifdef SYS_mbind
  syscall(SYS_mbind, begin, end - begin, kMpolBind, mask, 1024 + 1, kMpolMfMove);
#endif
}

}  // namespace ktjax

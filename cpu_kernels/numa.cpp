#include "cpu_kernels/numa.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace ktjax {
namespace {

// "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; malformed parts are skipped. C parsing, not
// iostreams: a module built with a static libstdc++ crashed in the stream's locale facets
// once the process had loaded the shared one (numpy imported first).
std::vector<int> parse_cpulist(const char* text) {
  std::vector<int> cpus;
  for (const char* p = text; *p != '\0';) {
    char* end = nullptr;
    const long lo = std::strtol(p, &end, 10);
    long hi = lo;
    const bool number = end != p;
    p = end;
    if (number && *p == '-') {
      hi = std::strtol(p + 1, &end, 10);
      if (end == p + 1) hi = -1;  // "3-": malformed
      p = end;
    }
    const bool whole = number && (*p == ',' || *p == '\0' || *p == '\n');
    for (long c = lo; whole && c <= hi && c >= 0 && c - lo < 65536; ++c) cpus.push_back(static_cast<int>(c));
    while (*p != '\0' && *p != ',') ++p;  // on to the next part
    if (*p == ',') ++p;
  }
  return cpus;
}

}  // namespace

std::vector<NumaNode> read_numa_nodes(const std::string& node_dir, const std::vector<int>& allowed) {
  std::vector<NumaNode> nodes;
  // Node numbers are small and may have gaps (offline nodes): probe a fixed range.
  for (int id = 0; id < 1024; ++id) {
    const std::string path = node_dir + "/node" + std::to_string(id) + "/cpulist";
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (f == nullptr) continue;
    char text[4096] = {};
    const bool read = std::fgets(text, sizeof text, f) != nullptr;
    std::fclose(f);
    if (!read) continue;
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

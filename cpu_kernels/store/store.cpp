#include "cpu_kernels/store/store.h"

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace ktjax {
namespace {

struct Store {
  std::mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<const StoredWeight>> items;
  int64_t next = 1;  // 0 is never a valid handle
};

Store& store() {
  static Store* s = new Store();  // never destroyed: FFI calls may outlive static teardown
  return *s;
}

[[noreturn]] void unknown(int64_t h) {
  throw std::invalid_argument("unknown or released weight handle " + std::to_string(h));
}

}  // namespace

int64_t store_put(std::shared_ptr<const StoredWeight> w) {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  const int64_t h = s.next++;
  s.items.emplace(h, std::move(w));
  return h;
}

int64_t store_put_at(int64_t handle, std::shared_ptr<const StoredWeight> w) {
  if (handle < 1 || handle >= (int64_t{1} << 62))
    throw std::invalid_argument("weight handle " + std::to_string(handle) + " is outside [1, 2^62)");
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.items.emplace(handle, std::move(w)).second)
    throw std::invalid_argument("weight handle " + std::to_string(handle) + " is taken");
  if (s.next <= handle) s.next = handle + 1;
  return handle;
}

void store_advance(int64_t first) {
  if (first < 1 || first >= (int64_t{1} << 62))
    throw std::invalid_argument("weight handle " + std::to_string(first) + " is outside [1, 2^62)");
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.next < first) s.next = first;
}

std::shared_ptr<const StoredWeight> store_get(int64_t handle) {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.items.find(handle);
  if (it == s.items.end()) unknown(handle);
  return it->second;
}

void store_release(int64_t handle) {
  Store& s = store();
  std::shared_ptr<const StoredWeight> victim;  // freed outside the lock
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.items.find(handle);
    if (it == s.items.end()) unknown(handle);
    victim = std::move(it->second);
    s.items.erase(it);
  }
}

int64_t store_size() {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<int64_t>(s.items.size());
}

}  // namespace ktjax

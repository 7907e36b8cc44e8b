// Internal interface between the emulator's core (kkemu.cpp: fibers, scheduler, warp rendezvous)
// and its PTX instructions (kkemu_ptx.cpp).  Not seen by kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace kkemu {

// One cp.async in flight: its destination, source, size, the source bytes as they were at issue
// (what lands in shared memory), and the kernel line that issued it.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
  unsigned char data[16];
  const char* file;
  int line;
};

// A thread's cp.async state: copies issued since the last commit, and the committed groups not
// yet completed, oldest first.  Reset at every block start.
struct AsyncQueue {
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;
  void clear() {
    uncommitted.clear();
    groups.clear();
  }
};

// kkemu.cpp: the running emulated thread's queue.
AsyncQueue& current_async_queue(const char* what);
// kkemu.cpp: whether [p, p + n) lies in the running block's shared memory (its kernel's static
// __shared__ arrays, or the dynamic shared memory of the launch).
bool in_shared_memory(const void* p, size_t n);

// kkemu_ptx.cpp: performs a kMma or kLdmatrix collective once all 32 lanes of a warp have arrived;
// lanes[j] is lane j's operand block (WarpOp documentation in kkemu.h).  Each lane checked its own
// operands before the rendezvous, so this cannot fail.
void resolve_matrix_op(WarpOp op, int arg, void* const lanes[32]);
// kkemu_ptx.cpp: the full PTX name of a kMma / kLdmatrix collective, qualifiers included.
std::string matrix_op_name(WarpOp op, int arg);

}  // namespace kkemu

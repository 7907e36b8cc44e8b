// kkemu: the PTX instructions behind kk::ptx (csrc/cuda/ptx.cuh): mma.sync (m16n8k16 bf16/f16,
// m16n8k8 tf32), ldmatrix.sync.m8n8 and cp.async with its groups.  The point is to reproduce what
// a kernel can get wrong: which lane holds which element, which lanes must take part, which
// addresses are legal, and when an asynchronous copy's data may be read.  Section names are those
// of the PTX ISA (docs.nvidia.com/cuda/parallel-thread-execution; checked against its 9.x text):
//   "Matrix Fragments for mma.m16n8k16 with floating point type", "Matrix Fragments for
//   mma.m16n8k8", "Multiply-and-Accumulate Instruction: mma", "Warp-level matrix load
//   instruction: ldmatrix", "Completion Mechanisms for Asynchronous Copy Operations",
//   "cp.async", "cp.async.commit_group", "cp.async.wait_group / cp.async.wait_all",
//   "Addresses as Operands", "Alternate Floating-Point Data Formats".
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "kkemu_internal.h"

namespace kkemu {

namespace {

// ================================================================================================
// Fragment layouts.  g = groupID = %laneid >> 2, t = threadID_in_group = %laneid % 4; element i of
// a lane's fragment sits at (row, col) of the matrix.  B is indexed [k][n].
// ================================================================================================
struct Pos {
  int row, col;
};

// "Matrix Fragments for mma.m16n8k16 with floating point type", .f16/.bf16 A (16x16): a0..a7, two
// per .f16x2 register: row g for a0,a1,a4,a5 and g+8 otherwise; col 2t + (i&1), plus 8 for i >= 4.
Pos frag_a_k16(int lane, int i) { return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)}; }
// ... .f16/.bf16 B (16x8): b0..b3: row (k) 2t + (i&1), plus 8 for i >= 2; col (n) g.
Pos frag_b_k16(int lane, int i) { return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2}; }
// "Matrix Fragments for mma.m16n8k8", .tf32 A (16x8): a0..a3: row g for a0,a2 and g+8 for a1,a3;
// col t for a0,a1 and t+4 for a2,a3.
Pos frag_a_tf32(int lane, int i) { return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)}; }
// ... .tf32 B (8x8): b0 at row (k) t, b1 at t+4; col (n) g.
Pos frag_b_tf32(int lane, int i) { return {(lane & 3) + 4 * i, lane >> 2}; }
// C/D with .f32 elements, the same for both shapes: c0..c3: row g for c0,c1 and g+8 for c2,c3;
// col 2t + (i&1).
Pos frag_c(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// A lane's operands of one mma, on its fiber's stack while it waits for the warp.
struct MmaLane {
  uint32_t a[4], b[2];
  float c[4], d[4];
};

uint16_t half_of(uint32_t reg, int i) { return (uint16_t)(reg >> (16 * (i & 1))); }  // low half first

// A .tf32 operand is read from a .b32 register holding a float's bit pattern.  The ISA leaves the
// tf32 layout implementation defined ("Alternate Floating-Point Data Formats": float's range,
// >= 10 mantissa bits, converted with cvt.rna.tf32.f32).  The sm_80 / sm_90 tensor cores are known
// to use the sign, exponent and top 10 mantissa bits and ignore the low 13, i.e. to truncate a
// plain float (hardware behaviour, not an ISA guarantee); this does the same, which also equals
// the exact value for operands that went through cvt.rna.tf32.f32 (low bits zero).  A NaN stays a
// NaN (truncating a NaN whose payload lies in the low bits would turn it into an infinity).
double tf32_operand(uint32_t bits) {
  const float f = f32_from(bits);
  return f != f ? (double)f : (double)f32_from(bits & 0xffffe000u);
}

// D = A*B + C for one warp.  Rounding: "the accumulation order, rounding and handling of subnormal
// inputs are unspecified" ("Multiply-and-Accumulate Instruction: mma", Precision and rounding;
// products are at least single precision, accumulation at least single precision), so no fixed
// sequence of fp32 FMAs is the device's either.  This computes each dot product as exactly as
// double allows (every product of bf16/f16/tf32 operands is exact in double; the K products and C
// are summed in k order in double) and rounds once to float (nearest even).  That is the most
// accurate result the ISA admits, it barely depends on the order of k (a kernel's data layout does
// not change the result), and a kernel checked against a float64 reference with a tolerance fit
// for the device passes or fails for its layout, not for a rounding artefact of the emulation.
// Subnormal operands are used as they are.
void resolve_mma(MmaType type, void* const lanes[32]) {
  const int K = type == kMmaTf32 ? 8 : 16;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& L = *static_cast<const MmaLane*>(lanes[l]);
    if (type == kMmaTf32) {
      for (int i = 0; i < 4; ++i) {
        const Pos p = frag_a_tf32(l, i);
        A[p.row][p.col] = tf32_operand(L.a[i]);
      }
      for (int i = 0; i < 2; ++i) {
        const Pos p = frag_b_tf32(l, i);
        B[p.row][p.col] = tf32_operand(L.b[i]);
      }
    } else {
      const auto value = [type](uint16_t h) { return (double)(type == kMmaBf16 ? bf16_to_f32(h) : f16_to_f32(h)); };
      for (int i = 0; i < 8; ++i) {
        const Pos p = frag_a_k16(l, i);
        A[p.row][p.col] = value(half_of(L.a[i >> 1], i));
      }
      for (int i = 0; i < 4; ++i) {
        const Pos p = frag_b_k16(l, i);
        B[p.row][p.col] = value(half_of(L.b[i >> 1], i));
      }
    }
    for (int i = 0; i < 4; ++i) {
      const Pos p = frag_c(l, i);
      C[p.row][p.col] = (double)L.c[i];
    }
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = C[m][n];
      for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
      D[m][n] = (float)acc;
    }
  for (int l = 0; l < 32; ++l) {
    MmaLane& L = *static_cast<MmaLane*>(lanes[l]);
    for (int i = 0; i < 4; ++i) {
      const Pos p = frag_c(l, i);
      L.d[i] = D[p.row][p.col];
    }
  }
}

// ================================================================================================
// ldmatrix ("Warp-level matrix load instruction: ldmatrix", .m8n8 .b16): lanes 8i..8i+7 hold the
// addresses of rows 0..7 of matrix i (for .x1 and .x2 the higher lanes' addresses are not used on
// sm_80+); "each thread in a warp loads fragments of a row, with thread 0 receiving the first
// fragment", four threads per row of 8 elements: lane l receives row l/4, elements 2(l%4) and
// 2(l%4)+1 (one 32-bit fragment, lower column in the low half) in register i.  .trans loads the
// matrix "in column-major format": lane l receives column l/4, rows 2(l%4) and 2(l%4)+1.
// ================================================================================================
struct LdmatrixLane {
  const unsigned char* row;
  uint32_t r[4];
};

uint32_t element(const unsigned char* row, int col) {
  uint16_t v;
  std::memcpy(&v, row + 2 * col, 2);
  return v;
}

void resolve_ldmatrix(int num, bool trans, void* const lanes[32]) {
  for (int m = 0; m < num; ++m) {
    const unsigned char* rows[8];
    for (int j = 0; j < 8; ++j) rows[j] = static_cast<const LdmatrixLane*>(lanes[8 * m + j])->row;
    for (int l = 0; l < 32; ++l) {
      const int r = l >> 2, c = 2 * (l & 3);
      const uint32_t lo = trans ? element(rows[c], r) : element(rows[r], c);
      const uint32_t hi = trans ? element(rows[c + 1], r) : element(rows[r], c + 1);
      static_cast<LdmatrixLane*>(lanes[l])->r[m] = lo | hi << 16;
    }
  }
}

// Fault messages outlive the faulting fiber's frame (it never resumes), so they are built here.
thread_local char t_msg[512];

[[noreturn]] void fault(const char* file, int line, const char* f, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] void fault(const char* file, int line, const char* f, ...) {
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(t_msg, sizeof(t_msg), f, ap);
  va_end(ap);
  kernel_fault(t_msg, file, line);
}

const char* kNotShared = "(a static __shared__ array must be declared in the kernel itself for the emulation to know it)";

// Completes one committed group: its copies land in shared memory now.  The source was captured at
// issue; the hardware reads it at some time before the group completes, so a source that changed
// in between makes the result undefined ("Completion Mechanisms for Asynchronous Copy Operations":
// modifying the source before completion is undefined), and is reported rather than silently
// resolved one way.  Two copies of one group to the same bytes are undefined too ("cp.async.
// commit_group": no ordering within a group).
void complete_group(std::vector<AsyncCopy>& group) {
  std::sort(group.begin(), group.end(), [](const AsyncCopy& x, const AsyncCopy& y) { return x.dst < y.dst; });
  for (size_t i = 0; i < group.size(); ++i) {
    const AsyncCopy& c = group[i];
    if (i > 0) {
      const AsyncCopy& p = group[i - 1];
      if (static_cast<const char*>(p.dst) + p.bytes > static_cast<const char*>(c.dst))
        fault(c.file, c.line,
              "cp.async: two copies of one cp.async-group write the same shared memory (%p, %d bytes, from "
              "%s:%d; and %p, %d bytes): undefined, as a group's copies are unordered",
              p.dst, p.bytes, p.file, p.line, c.dst, c.bytes);
    }
    if (std::memcmp(c.src, c.data, (size_t)c.bytes) != 0)
      fault(c.file, c.line,
            "cp.async: its global source %p (%d bytes) was modified before the copy completed (undefined: "
            "the source must not change until a wait_group completes the copy)",
            c.src, c.bytes);
  }
  for (const AsyncCopy& c : group) std::memcpy(c.dst, c.data, (size_t)c.bytes);
}

}  // namespace

void resolve_matrix_op(WarpOp op, int arg, void* const lanes[32]) {
  if (op == kMma)
    resolve_mma(static_cast<MmaType>(arg), lanes);
  else
    resolve_ldmatrix(arg & 7, (arg & 8) != 0, lanes);
}

std::string matrix_op_name(WarpOp op, int arg) {
  if (op == kMma) {
    switch (arg) {
      case kMmaBf16: return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
      case kMmaF16: return "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
      case kMmaTf32: return "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32";
      default: return "mma.sync.aligned (unknown type)";
    }
  }
  return std::string("ldmatrix.sync.aligned.m8n8.x") + std::to_string(arg & 7) + ((arg & 8) ? ".trans" : "") +
         ".shared.b16";
}

void mma_sync(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file,
              int line) {
  MmaLane L;
  std::memcpy(L.a, a, sizeof(L.a));
  std::memcpy(L.b, b, sizeof(L.b));
  std::memcpy(L.c, c, sizeof(L.c));
  warp_collective(kMma, 0xffffffffu, reinterpret_cast<uintptr_t>(&L), (int)type, 32, file, line);
  std::memcpy(d, L.d, sizeof(L.d));  // d may be c: written only after every lane's c was read
}

// The alignment and state-space checks are the lane's own, before the warp meets: a lane whose row
// address is used must point at 16 aligned bytes of shared memory ("ldmatrix": "the matrix
// addresses must be naturally aligned"; a generic address outside .shared is undefined).
void ldmatrix_sync(int num, bool trans, uint32_t* r, const void* row, const char* file, int line) {
  if (num != 1 && num != 2 && num != 4) fault(file, line, "ldmatrix: .x%d is not .x1, .x2 or .x4", num);
  if ((int)lane_id() < 8 * num) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
      fault(file, line, "ldmatrix.x%d%s: row address %p is not 16-byte aligned", num, trans ? ".trans" : "", row);
    if (!in_shared_memory(row, 16))
      fault(file, line, "ldmatrix.x%d%s: row address %p is not in the block's shared memory %s", num,
            trans ? ".trans" : "", row, kNotShared);
  }
  LdmatrixLane L{static_cast<const unsigned char*>(row), {0, 0, 0, 0}};
  warp_collective(kLdmatrix, 0xffffffffu, reinterpret_cast<uintptr_t>(&L), num | (trans ? 8 : 0), 32, file, line);
  std::memcpy(r, L.r, sizeof(uint32_t) * (size_t)num);
}

// "cp.async": dst in .shared, src in .global, both aligned to cp-size ("Addresses as Operands":
// naturally aligned to the access size, otherwise undefined).
void cp_async(void* dst, const void* src, int bytes, const char* file, int line) {
  AsyncQueue& q = current_async_queue("cp.async");
  if (bytes != 4 && bytes != 8 && bytes != 16) fault(file, line, "cp.async: cp-size %d is not 4, 8 or 16", bytes);
  if (reinterpret_cast<uintptr_t>(dst) % (uintptr_t)bytes != 0)
    fault(file, line, "cp.async of %d bytes: the shared-memory destination %p is misaligned (needs %d-byte alignment)",
          bytes, dst, bytes);
  if (reinterpret_cast<uintptr_t>(src) % (uintptr_t)bytes != 0)
    fault(file, line, "cp.async of %d bytes: the global source %p is misaligned (needs %d-byte alignment)", bytes, src,
          bytes);
  if (!in_shared_memory(dst, (size_t)bytes))
    fault(file, line, "cp.async: the destination %p is not in the block's shared memory %s", dst, kNotShared);
  if (in_shared_memory(src, 1)) fault(file, line, "cp.async: the source %p is in shared memory, not global", src);
  AsyncCopy c{dst, src, bytes, {}, file, line};
  std::memcpy(c.data, src, (size_t)bytes);
  q.uncommitted.push_back(c);
}

// "cp.async.commit_group": all uncommitted copies of the thread form a new group; none makes an
// empty group (trivially complete).
void cp_async_commit() {
  AsyncQueue& q = current_async_queue("cp.async.commit_group");
  q.groups.push_back(std::move(q.uncommitted));
  q.uncommitted.clear();
}

// "cp.async.wait_group N": wait until at most the N most recent groups are pending, i.e. complete
// the older ones, oldest first (groups complete in commit order).  Uncommitted copies belong to no
// group and stay in flight.
//
// A thread that exits with copies in flight is not reported: the ISA does not forbid it (a
// prefetch that is never consumed is legal), and only the issuing thread's wait could make the
// data visible, so no thread may read it.  The emulation drops such copies (fiber_reset), so a
// thread that reads them anyway, e.g. after a __syncthreads that the issuer reached without its
// wait, sees the old contents, as it may on the device.
void cp_async_wait(int pending) {
  AsyncQueue& q = current_async_queue("cp.async.wait_group");
  while ((int)q.groups.size() > pending) {
    complete_group(q.groups.front());
    q.groups.pop_front();
  }
}

}  // namespace kkemu

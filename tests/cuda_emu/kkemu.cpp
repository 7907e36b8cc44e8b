// kkemu runtime: fibers, the block scheduler, launch checks and the CUDA runtime API subset of the
// host emulation.  See include/kkemu.h for what is modelled and why.
#include <cuda_runtime.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define KKEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KKEMU_ASAN 1
#endif
#endif
#if defined(KKEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "kkemu_internal.h"

namespace kkemu {

thread_local uint3 t_tid{0, 0, 0};
thread_local BlockState* t_block = nullptr;

namespace {

// ================================================================================================
// Device model.  Figures: CUDA C++ Programming Guide, "Technical Specifications per Compute
// Capability" (8.0: 164 KB shared memory per SM, 163 KB per block with opt-in; 9.0: 228 KB and
// 227 KB; 1 KB reserved per block; 48 KB per block without opt-in; 1024 threads per block; block
// dims 1024 x 1024 x 64; grid dims 2^31-1 x 65535 x 65535); SM counts of the A100 (108) and of the
// H100 SXM / H200 (132).
// ================================================================================================
struct Device {
  const char* name;
  int major, minor, sms;
  int optin, per_sm, reserved;
  int l2_bytes;
};
constexpr int kSmemDefault = 48 * 1024;
constexpr int kMaxThreads = 1024;
const Device kH100{"kkemu H100 (sm_90)", 9, 0, 132, 232448, 233472, 1024, 50 << 20};
const Device kA100{"kkemu A100 (sm_80)", 8, 0, 108, 166912, 167936, 1024, 40 << 20};
Device g_dev = kH100;

// ================================================================================================
// Errors: the CUDA convention of a per-thread last error; the message of the last failure is kept
// so that cudaGetErrorString returns it (kernelkit puts that string into kk_last_error).
// ================================================================================================
thread_local cudaError_t t_err = cudaSuccess;
thread_local char t_err_msg[2048] = "";
thread_local cudaError_t t_err_msg_code = cudaSuccess;
std::string g_last_fault;  // last kernel-side fault, for tests (kkemu_last_fault)

cudaError_t set_error(cudaError_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
cudaError_t set_error(cudaError_t code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(t_err_msg, sizeof(t_err_msg), fmt, ap);
  va_end(ap);
  t_err = code;
  t_err_msg_code = code;
  if (std::getenv("KKEMU_VERBOSE")) std::fprintf(stderr, "kkemu: %s\n", t_err_msg);
  return code;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

// ================================================================================================
// Kernels: name and static shared memory, from this library's own symbol table.  A kernel's
// static __shared__ arrays are its function-local statics, whose demangled symbol names are
// "<kernel>::<array>" (a kernel has no other static locals).
// ================================================================================================
struct SharedVar {
  uintptr_t addr;
  size_t size;
};
struct KernelInfo {
  std::string name;
  std::vector<SharedVar> vars;
  int64_t static_bytes = 0;
  int max_dyn = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize; -1: default (48 KB - static)
};
std::unordered_map<uintptr_t, KernelInfo> g_kernels;  // by address
bool g_symbols_loaded = false;

std::string demangle(const char* s) {
  int status = 0;
  char* d = abi::__cxa_demangle(s, nullptr, nullptr, &status);
  std::string out = (status == 0 && d) ? d : s;
  std::free(d);
  return out;
}

std::string short_name(std::string n) {
  const std::string anon = "(anonymous namespace)::";
  for (size_t pos; (pos = n.find(anon)) != std::string::npos;) n.erase(pos, anon.size());
  return n;
}

void load_symbols() {
  g_symbols_loaded = true;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&load_symbols), &info) || !info.dli_fname) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::ifstream f(info.dli_fname, std::ios::binary);
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() < sizeof(Elf64_Ehdr)) return;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(data.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(data.data() + eh->e_shoff);
  int symtab_idx = -1;
  for (int i = 0; i < eh->e_shnum; ++i)
    if (sh[i].sh_type == SHT_SYMTAB) symtab_idx = i;
  if (symtab_idx < 0) return;
  const auto* syms = reinterpret_cast<const Elf64_Sym*>(data.data() + sh[symtab_idx].sh_offset);
  const size_t nsyms = sh[symtab_idx].sh_size / sizeof(Elf64_Sym);
  const char* strtab = data.data() + sh[sh[symtab_idx].sh_link].sh_offset;
  std::unordered_map<std::string, uintptr_t> func_by_name;
  std::vector<std::pair<std::string, SharedVar>> vars;
  for (size_t i = 0; i < nsyms; ++i) {
    const Elf64_Sym& s = syms[i];
    const int type = ELF64_ST_TYPE(s.st_info);
    if (type == STT_FUNC && s.st_value != 0) {
      std::string n = demangle(strtab + s.st_name);
      if (n.compare(0, 5, "void ") == 0) n.erase(0, 5);  // a template's name carries its return type
      const uintptr_t addr = base + s.st_value;
      g_kernels[addr].name = short_name(n);
      func_by_name[n] = addr;
    } else if (type == STT_OBJECT && s.st_size > 0) {
      std::string n = demangle(strtab + s.st_name);
      if (n.find("::") != std::string::npos) vars.push_back({n, SharedVar{base + s.st_value, s.st_size}});
    }
  }
  for (auto& [n, v] : vars) {
    auto it = func_by_name.find(n.substr(0, n.rfind("::")));
    if (it == func_by_name.end()) continue;  // a static of a host function, or of a namespace
    KernelInfo& k = g_kernels[it->second];
    k.vars.push_back(v);
    k.static_bytes += (int64_t)v.size;
  }
}

KernelInfo& kernel_info(const void* fn) {
  if (!g_symbols_loaded) load_symbols();
  KernelInfo& k = g_kernels[reinterpret_cast<uintptr_t>(fn)];
  if (k.name.empty()) k.name = fmt("kernel@%p", fn);
  return k;
}

// ================================================================================================
// Fibers.  x86-64: a small context switch saving the callee-saved registers and the SSE/x87
// control words (System V ABI); elsewhere ucontext.
// ================================================================================================
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .type kkemu_ctx_switch,@function
kkemu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kkemu_ctx_switch, .-kkemu_ctx_switch
  .p2align 4
  .type kkemu_ctx_entry,@function
kkemu_ctx_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size kkemu_ctx_entry, .-kkemu_ctx_entry
)");
extern "C" void kkemu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void kkemu_ctx_entry();
#endif

enum class St : int { kRunnable, kBarrier, kWarp, kDone, kFault };

struct Fiber {
  char* stack = nullptr;  // usable stack (a guard page lies below it)
  size_t stack_size = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  void* asan_fake = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0;
  St state = St::kRunnable;
  const char* file = "";
  int line = 0;
  // warp collective / barrier operands and result
  WarpOp op = kShfl;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  AsyncQueue async;  // cp.async copies in flight (kkemu_ptx.cpp)
};

constexpr size_t kStackSize = 256 * 1024;

struct Runner {
  std::vector<Fiber*> fibers;
  Fiber* cur = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  const Body* body = nullptr;
  std::string fault;  // set by a fiber or the scheduler: the block's launch fails
  // The running launch's shared memory, for the address checks of ldmatrix and cp.async.
  const std::vector<SharedVar>* shared_vars = nullptr;
  const char* dyn_smem = nullptr;
  size_t dyn_bytes = 0;
  int mode = 0;       // fiber order between barriers: 0 forward, 1 reverse, 2 shuffled
  uint64_t seed = 0;
};
thread_local Runner* t_runner = nullptr;
int g_mode = 0;
uint64_t g_seed = 1;

Runner& runner() {
  if (!t_runner) t_runner = new Runner();  // per host thread, kept for the process's life
  return *t_runner;
}

void fiber_main(Fiber* f);

void fiber_reset(Fiber* f) {
  if (!f->stack) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char* mem = static_cast<char*>(mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "kkemu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    f->stack = mem + page;
    f->stack_size = kStackSize;
  }
#if defined(KKEMU_ASAN)
  __asan_unpoison_memory_region(f->stack, f->stack_size);  // frames abandoned by a failed block
#endif
#if defined(__x86_64__)
  uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(f->stack + f->stack_size)) & ~uintptr_t(15));
  uint64_t* fr = top - 8;  // the frame kkemu_ctx_switch pops: control words, r15..r12, rbx, rbp, ret
  uint32_t mxcsr = 0;
  uint16_t fcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  fr[0] = (uint64_t)mxcsr | ((uint64_t)fcw << 32);
  fr[1] = 0;                                          // r15
  fr[2] = 0;                                          // r14
  fr[3] = reinterpret_cast<uint64_t>(&fiber_main);    // r13: called by kkemu_ctx_entry
  fr[4] = reinterpret_cast<uint64_t>(f);              // r12: its argument
  fr[5] = 0;                                          // rbx
  fr[6] = 0;                                          // rbp
  fr[7] = reinterpret_cast<uint64_t>(&kkemu_ctx_entry);
  f->sp = fr;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->uc, reinterpret_cast<void (*)()>(+[](unsigned hi, unsigned lo) {
                fiber_main(reinterpret_cast<Fiber*>(((uintptr_t)hi << 32) | lo));
              }),
              2, (unsigned)(p >> 32), (unsigned)p);
#endif
  f->state = St::kRunnable;
  f->async.clear();  // copies a thread left in flight when it exited are dropped (kkemu_ptx.cpp)
}

// Scheduler -> fiber f, until f blocks, finishes or faults.
void resume(Runner& R, Fiber* f) {
  R.cur = f;
  t_tid = f->tid;
#if defined(KKEMU_ASAN)
  __sanitizer_start_switch_fiber(&R.sched_fake, f->stack, f->stack_size);
#endif
#if defined(__x86_64__)
  kkemu_ctx_switch(&R.sched_sp, f->sp);
#else
  swapcontext(&R.sched_uc, &f->uc);
#endif
#if defined(KKEMU_ASAN)
  __sanitizer_finish_switch_fiber(R.sched_fake, nullptr, nullptr);
#endif
  R.cur = nullptr;
}

// Fiber -> scheduler.  `final`: the fiber never resumes (finished or faulted).
void yield(Runner& R, Fiber* f, bool final) {
#if defined(KKEMU_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake, R.sched_bottom, R.sched_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  kkemu_ctx_switch(&f->sp, R.sched_sp);
#else
  swapcontext(&f->uc, &R.sched_uc);
#endif
#if defined(KKEMU_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#endif
}

void fiber_main(Fiber* f) {
  Runner& R = runner();
#if defined(KKEMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &R.sched_bottom, &R.sched_size);
#endif
  (*R.body)();
  f->state = St::kDone;
  yield(R, f, true);
  __builtin_trap();  // a finished fiber is never resumed
}

Fiber* current(const char* what) {
  Runner* R = t_runner;
  if (!R || !R->cur) {
    std::fprintf(stderr, "kkemu: %s called outside a kernel\n", what);
    std::abort();
  }
  return R->cur;
}

std::string thread_str(const Fiber* f) {
  return fmt("thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case kShfl: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync/__any_sync/__all_sync";
    case kSyncwarp: return "__syncwarp";
    case kMatchAny: return "__match_any_sync";
    case kMma: return "mma.sync.aligned";
    case kLdmatrix: return "ldmatrix.sync.aligned";
  }
  return "?";
}

// Resolves every warp collective whose lanes have all arrived.  As in the PTX ISA (shfl.sync,
// vote.sync, bar.warp.sync), a collective waits for the non-exited threads of its mask: lanes that
// exited, or do not exist in a partial last warp, are not waited for, but reading a value from one
// is undefined, so a shuffle that does is reported.  The matrix instructions (mma, ldmatrix) are
// .aligned: every lane of the warp executes the same instruction with the same qualifiers, and a
// lane that exited (or a partial warp) makes them undefined, so that is reported too.  Returns
// whether any collective was resolved; sets R.fault for a misuse that would hang or be undefined
// on the device.
bool resolve_warps(Runner& R, int n) {
  bool any = false;
  for (int w0 = 0; w0 < n && R.fault.empty(); w0 += 32) {
    const int nl = std::min(32, n - w0);
    for (int l = 0; l < nl && R.fault.empty(); ++l) {
      Fiber* f = R.fibers[w0 + l];
      if (f->state != St::kWarp) continue;
      const unsigned M = f->mask;
      const std::string name = f->op >= kMma ? matrix_op_name(f->op, f->arg) : std::string(op_name(f->op));
      const std::string where = fmt("%s at %s:%d (%s, mask 0x%08x)", name.c_str(), f->file, f->line,
                                    thread_str(f).c_str(), M);
      if (!(M >> l & 1u)) {
        R.fault = where + ": the mask does not include the calling lane";
        break;
      }
      if (f->width < 1 || f->width > 32 || (f->width & (f->width - 1))) {
        R.fault = where + fmt(": width %d is not a power of two <= 32", f->width);
        break;
      }
      unsigned live = 0;  // the lanes of the mask that take part: existing and not exited
      bool ready = true;
      for (int j = 0; j < nl && ready && R.fault.empty(); ++j) {
        if (!(M >> j & 1u)) continue;
        Fiber* g = R.fibers[w0 + j];
        if (g->state == St::kDone) continue;
        live |= 1u << j;
        if (g->state == St::kWarp) {
          const bool site = f->op == kSyncwarp || (g->line == f->line && std::strcmp(g->file, f->file) == 0);
          if (g->op != f->op || g->mask != M || !site)
            R.fault = where + fmt(": lane %d waits in %s at %s:%d with mask 0x%08x instead", j, op_name(g->op),
                                  g->file, g->line, g->mask);
          else if (f->op >= kMma && g->arg != f->arg)
            R.fault = where + fmt(": lane %d executes it as %s (the warp's lanes must use the same qualifiers)", j,
                                  matrix_op_name(g->op, g->arg).c_str());
        } else {
          ready = false;  // still running, or at a block barrier (a deadlock if it stays there)
        }
      }
      if (!ready || !R.fault.empty()) continue;
      if (f->op >= kMma) {
        if (live != 0xffffffffu) {
          const int j = __builtin_ctz(~live);
          R.fault = where + (j >= nl ? fmt(": the warp has only %d threads (a partial last warp), and the "
                                           "instruction needs all 32 lanes",
                                           nl)
                                     : fmt(": lane %d has exited, and the instruction needs all 32 lanes of the "
                                           "warp",
                                           j));
          break;
        }
        void* lanes[32];
        for (int j = 0; j < 32; ++j) lanes[j] = reinterpret_cast<void*>(R.fibers[w0 + j]->value);
        resolve_matrix_op(f->op, f->arg, lanes);
        for (int j = 0; j < 32; ++j) R.fibers[w0 + j]->state = St::kRunnable;
        any = true;
        continue;
      }
      for (int j = 0; j < nl && R.fault.empty(); ++j) {
        if (!(live >> j & 1u)) continue;
        Fiber* g = R.fibers[w0 + j];
        const int seg = (j / g->width) * g->width, wd = g->width;
        int src = j;
        switch (g->op) {
          case kShfl: src = seg + (g->arg & (wd - 1)); break;
          case kShflUp: src = (j - seg) >= g->arg ? j - g->arg : j; break;
          case kShflDown: src = (j - seg) + g->arg < wd ? j + g->arg : j; break;
          case kShflXor: src = (j ^ g->arg) < seg + wd ? (j ^ g->arg) & 31 : j; break;
          default: break;
        }
        if (g->op <= kShflXor) {
          if (!(live >> src & 1u)) {
            const char* why = !(M >> src & 1u) ? "which is not in the mask"
                              : src >= nl      ? "which does not exist (partial warp)"
                                               : "which has exited";
            R.fault = fmt("%s at %s:%d (mask 0x%08x): lane %d reads lane %d, %s", op_name(g->op), g->file, g->line,
                          M, j, src, why);
            break;
          }
          g->result = R.fibers[w0 + src]->value;
        } else if (g->op == kBallot || g->op == kMatchAny) {
          unsigned bits = 0;
          for (int i = 0; i < nl; ++i) {
            if (!(live >> i & 1u)) continue;
            const uint64_t v = R.fibers[w0 + i]->value;
            if (g->op == kBallot ? v != 0 : v == g->value) bits |= 1u << i;
          }
          g->result = bits;
        } else {
          g->result = 0;
        }
      }
      if (!R.fault.empty()) break;
      for (int j = 0; j < nl; ++j)
        if (live >> j & 1u) R.fibers[w0 + j]->state = St::kRunnable;
      any = true;
    }
  }
  return any;
}

std::string describe_states(Runner& R, int n) {
  std::string s;
  int shown = 0;
  for (int i = 0; i < n && shown < 6; ++i) {
    Fiber* f = R.fibers[i];
    if (f->state == St::kBarrier || f->state == St::kWarp) {
      s += fmt("; %s waits in %s at %s:%d", thread_str(f).c_str(),
               f->state == St::kBarrier ? "__syncthreads" : op_name(f->op), f->file, f->line);
      ++shown;
    }
  }
  return s;
}

// Runs one block to completion: a sweep runs every runnable fiber until it blocks; then warp
// collectives and the block barrier are resolved.  No progress in a round is a deadlock.
void run_block(Runner& R, int n) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = R.mode == 1 ? n - 1 - i : i;
  std::mt19937_64 rng(R.seed);
  int done = 0;
  for (;;) {
    if (R.mode == 2) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      Fiber* f = R.fibers[i];
      if (f->state != St::kRunnable) continue;
      resume(R, f);
      ran = true;
      if (!R.fault.empty()) return;
      if (f->state == St::kDone) ++done;
    }
    if (done == n) return;
    bool resolved = resolve_warps(R, n);
    if (!R.fault.empty()) return;
    if (!resolved) {
      int nbar = 0;
      Fiber* first = nullptr;
      for (int i = 0; i < n; ++i)
        if (R.fibers[i]->state == St::kBarrier) {
          ++nbar;
          if (!first) first = R.fibers[i];
        }
      if (nbar > 0 && nbar + done == n) {
        if (done > 0) {
          Fiber* gone = nullptr;
          for (int i = 0; i < n && !gone; ++i)
            if (R.fibers[i]->state == St::kDone) gone = R.fibers[i];
          R.fault = fmt("__syncthreads at %s:%d is never reached by %d of the block's %d threads: they exited "
                        "(first: %s)",
                        first->file, first->line, done, n, thread_str(gone).c_str());
          return;
        }
        int64_t count = 0;
        for (int i = 0; i < n; ++i) {
          Fiber* f = R.fibers[i];
          if (f->line != first->line || std::strcmp(f->file, first->file) != 0) {
            R.fault = fmt("divergent barrier: %s waits in __syncthreads at %s:%d, %s at %s:%d",
                          thread_str(first).c_str(), first->file, first->line, thread_str(f).c_str(), f->file,
                          f->line);
            return;
          }
          count += (int64_t)f->value;
        }
        for (int i = 0; i < n; ++i) {
          R.fibers[i]->result = (uint64_t)count;
          R.fibers[i]->state = St::kRunnable;
        }
        resolved = true;
      }
    }
    if (!ran && !resolved) {
      R.fault = fmt("deadlock: %d of %d threads finished, the others wait forever", done, n) + describe_states(R, n);
      return;
    }
  }
}

// ================================================================================================
// Launches
// ================================================================================================
std::mutex g_launch_mutex;  // blocks run one at a time in the process (static shared memory)

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  int64_t dyn, stat;
};
std::vector<LaunchRecord> g_launches;

void poison(void* p, size_t n) { std::memset(p, 0xFF, n); }  // NaN in float, half and bfloat16

}  // namespace

void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                 const Body& body) {
  (void)stream;  // execution is synchronous: every stream is ordered with the host
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  KernelInfo& K = kernel_info(kernel);
  const char* kn = K.name.c_str();
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      nthreads > (uint64_t)kMaxThreads) {
    set_error(cudaErrorInvalidConfiguration,
              "kkemu: launch of %s: block (%u, %u, %u) is not a valid block (at most 1024 x 1024 x 64, %d threads)",
              kn, block.x, block.y, block.z, kMaxThreads);
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              "kkemu: launch of %s: grid (%u, %u, %u) is not a valid grid (at most 2^31-1 x 65535 x 65535)", kn,
              grid.x, grid.y, grid.z);
    return;
  }
  if (K.static_bytes > kSmemDefault) {
    set_error(cudaErrorInvalidValue, "kkemu: %s: %lld bytes of static shared memory exceed 48 KB", kn,
              (long long)K.static_bytes);
    return;
  }
  const int64_t max_dyn = K.max_dyn >= 0 ? K.max_dyn : kSmemDefault - K.static_bytes;
  if ((int64_t)smem > max_dyn) {
    set_error(cudaErrorInvalidValue,
              "kkemu: launch of %s: %zu bytes of dynamic shared memory exceed the kernel's limit of %lld "
              "(%lld static; raise it with cudaFuncSetAttribute(MaxDynamicSharedMemorySize), up to %d - static "
              "on %s)",
              kn, smem, (long long)max_dyn, (long long)K.static_bytes, g_dev.optin, g_dev.name);
    return;
  }
  g_launches.push_back({K.name, grid, block, (int64_t)smem, K.static_bytes});

  Runner& R = runner();
  const int n = (int)nthreads;
  while ((int)R.fibers.size() < n) R.fibers.push_back(new Fiber());
  for (int i = 0; i < n; ++i) {
    Fiber* f = R.fibers[i];
    f->linear = i;
    f->tid = uint3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y), (unsigned)(i / (block.x * block.y))};
  }
  void* dyn = nullptr;
  if (smem > 0 && posix_memalign(&dyn, 16, smem) != 0) {
    set_error(cudaErrorMemoryAllocation, "kkemu: cannot allocate %zu bytes of dynamic shared memory", smem);
    return;
  }
  BlockState B{};
  B.block_dim = block;
  B.grid_dim = grid;
  B.dyn_smem = dyn;
  R.body = &body;
  R.shared_vars = &K.vars;
  R.dyn_smem = static_cast<const char*>(dyn);
  R.dyn_bytes = smem;
  R.fault.clear();
  R.mode = g_mode;
  for (uint64_t bz = 0; bz < grid.z && R.fault.empty(); ++bz)
    for (uint64_t by = 0; by < grid.y && R.fault.empty(); ++by)
      for (uint64_t bx = 0; bx < grid.x && R.fault.empty(); ++bx) {
        B.block_idx = uint3{(unsigned)bx, (unsigned)by, (unsigned)bz};
        for (const SharedVar& v : K.vars) poison(reinterpret_cast<void*>(v.addr), v.size);
        if (dyn) poison(dyn, smem);
        for (int i = 0; i < n; ++i) fiber_reset(R.fibers[i]);
        R.seed = g_seed ^ (bx * 0x9E3779B97F4A7C15ull) ^ (by << 20) ^ (bz << 40);
        t_block = &B;
        run_block(R, n);
        t_block = nullptr;
        if (!R.fault.empty()) {
          g_last_fault = fmt("kernel %s, block (%u,%u,%u): ", kn, B.block_idx.x, B.block_idx.y, B.block_idx.z) + R.fault;
          set_error(cudaErrorLaunchFailure, "kkemu: %s", g_last_fault.c_str());
        }
      }
  R.body = nullptr;
  R.shared_vars = nullptr;
  R.dyn_smem = nullptr;
  R.dyn_bytes = 0;
  std::free(dyn);
}

void* dynamic_smem() {
  current("dynamic shared memory");
  return t_block->dyn_smem;
}

void syncthreads(const char* file, int line) { (void)syncthreads_count(0, file, line); }

int syncthreads_count(int pred, const char* file, int line) {
  Fiber* f = current("__syncthreads");
  f->state = St::kBarrier;
  f->file = file;
  f->line = line;
  f->value = (uint64_t)pred;
  yield(runner(), f, false);
  return (int)f->result;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                         int line) {
  Fiber* f = current(op_name(op));
  f->state = St::kWarp;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->file = file;
  f->line = line;
  yield(runner(), f, false);
  return f->result;
}

unsigned lane_id() { return (unsigned)(current("lane id")->linear % 32); }

AsyncQueue& current_async_queue(const char* what) { return current(what)->async; }

bool in_shared_memory(const void* p, size_t n) {
  const Runner* R = t_runner;
  if (!R || !R->shared_vars) return false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const auto inside = [&](uintptr_t base, size_t size) { return a >= base && n <= size && a - base <= size - n; };
  if (R->dyn_smem && inside(reinterpret_cast<uintptr_t>(R->dyn_smem), R->dyn_bytes)) return true;
  for (const SharedVar& v : *R->shared_vars)
    if (inside(v.addr, v.size)) return true;
  return false;
}

unsigned active_mask() {
  Fiber* f = current("__activemask");
  Runner& R = runner();
  const int w0 = f->linear / 32 * 32;
  unsigned m = 0;
  for (int j = 0; j < 32 && w0 + j < (int)(t_block->block_dim.x * t_block->block_dim.y * t_block->block_dim.z); ++j)
    if (R.fibers[w0 + j]->state != St::kDone) m |= 1u << j;
  return m;
}

void kernel_fault(const char* what, const char* file, int line) {
  Fiber* f = current(what);
  Runner& R = runner();
  R.fault = fmt("%s at %s:%d in %s", what, file, line, thread_str(f).c_str());
  f->state = St::kFault;
  yield(R, f, true);
  __builtin_trap();
}

}  // namespace kkemu

using namespace kkemu;

// ================================================================================================
// CUDA runtime API
// ================================================================================================
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_err;
  t_err = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return t_err; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t err) {
  if (err != cudaSuccess && err == t_err_msg_code && t_err_msg[0]) return t_err_msg;
  return cudaGetErrorName(err);
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) {
  return dev == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice, "kkemu: device %d does not exist", dev);
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return set_error(cudaErrorInvalidDevice, "kkemu: device %d does not exist", dev);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreads; break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSmemDefault; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock:
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrMultiProcessorCount: *value = g_dev.sms; break;
    case cudaDevAttrL2CacheSize: *value = g_dev.l2_bytes; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = g_dev.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = g_dev.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = g_dev.per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_dev.optin; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = 32; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = g_dev.reserved; break;
    default: return set_error(cudaErrorInvalidValue, "kkemu: device attribute %d is not emulated", (int)attr);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev) {
  if (dev != 0) return set_error(cudaErrorInvalidDevice, "kkemu: device %d does not exist", dev);
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "%s", g_dev.name);
  p->major = g_dev.major;
  p->minor = g_dev.minor;
  p->multiProcessorCount = g_dev.sms;
  p->sharedMemPerBlock = kSmemDefault;
  p->sharedMemPerBlockOptin = (size_t)g_dev.optin;
  p->sharedMemPerMultiprocessor = (size_t)g_dev.per_sm;
  p->reservedSharedMemPerBlock = (size_t)g_dev.reserved;
  p->maxThreadsPerBlock = kMaxThreads;
  p->maxThreadsPerMultiProcessor = 2048;
  p->warpSize = 32;
  p->regsPerBlock = p->regsPerMultiprocessor = 65536;
  p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = p->maxGridSize[2] = 65535;
  p->l2CacheSize = g_dev.l2_bytes;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char(0));
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (posix_memalign(ptr, 256, bytes) != 0)
    return set_error(cudaErrorMemoryAllocation, "kkemu: cudaMalloc(%zu) failed", bytes);
  poison(*ptr, bytes);  // device memory starts with garbage
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (bytes) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) { return cudaMemset(ptr, value, bytes); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t kkemu_func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  KernelInfo& K = kernel_info(func);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (int64_t)value + K.static_bytes > g_dev.optin)
      return set_error(cudaErrorInvalidValue,
                       "kkemu: cudaFuncSetAttribute(%s, MaxDynamicSharedMemorySize, %d): with %lld bytes of static "
                       "shared memory the limit on %s is %lld",
                       K.name.c_str(), value, (long long)K.static_bytes, g_dev.name,
                       (long long)(g_dev.optin - K.static_bytes));
    K.max_dyn = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return set_error(cudaErrorInvalidValue, "kkemu: function attribute %d is not emulated", (int)attr);
}

// ================================================================================================
// Test controls
// ================================================================================================
// Device to emulate: preset "h100" (also "h200", "sm90") or "a100" ("sm80"); sms / optin / per_sm
// override the preset's SM count and shared-memory sizes when > 0 (to steer a launch plan).
// Resets every kernel's MaxDynamicSharedMemorySize attribute.  Returns 0, or -1 for a bad preset.
KKEMU_EXPORT int kkemu_set_device(const char* preset, int sms, int optin, int per_sm) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const std::string p = preset ? preset : "h100";
  if (p == "h100" || p == "h200" || p == "sm90") g_dev = kH100;
  else if (p == "a100" || p == "sm80") g_dev = kA100;
  else return -1;
  if (sms > 0) g_dev.sms = sms;
  if (optin > 0) g_dev.optin = optin;
  if (per_sm > 0) g_dev.per_sm = per_sm;
  for (auto& kv : g_kernels) kv.second.max_dyn = -1;
  return 0;
}

// Fiber order between barriers: 0 forward, 1 reverse, 2 shuffled with `seed`.
KKEMU_EXPORT void kkemu_set_schedule(int mode, uint64_t seed) {
  g_mode = mode;
  g_seed = seed;
}

KKEMU_EXPORT int64_t kkemu_launch_count(void) { return (int64_t)g_launches.size(); }
KKEMU_EXPORT void kkemu_clear_launches(void) {
  g_launches.clear();
  g_last_fault.clear();
}
// Launch i: its kernel's name into name[cap], and grid xyz, block xyz, dynamic and static shared
// memory bytes into out[8].  Returns 0, or -1 for a bad index.
KKEMU_EXPORT int kkemu_launch_record(int64_t i, char* name, int64_t cap, int64_t* out) {
  if (i < 0 || i >= (int64_t)g_launches.size()) return -1;
  const LaunchRecord& r = g_launches[(size_t)i];
  std::snprintf(name, (size_t)cap, "%s", r.name.c_str());
  const int64_t v[8] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z, r.dyn, r.stat};
  std::memcpy(out, v, sizeof(v));
  return 0;
}
KKEMU_EXPORT const char* kkemu_last_fault(void) { return g_last_fault.c_str(); }

}  // extern "C"

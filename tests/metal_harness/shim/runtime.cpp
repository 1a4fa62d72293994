// Emulation runtime: runs every threadgroup of a kernel launch on one CPU
// thread, with each emulated GPU thread as a coroutine on its own stack.
//
// A thread runs alone until it reaches a synchronisation point (threadgroup
// barrier, simdgroup barrier or SIMD-group function), then the next thread of
// the chosen order runs. A barrier releases its threads only when every
// thread of the threadgroup waits at the same barrier. A SIMD-group call
// completes only when every unfinished lane of the simdgroup waits at the
// same call. Anything else (threads that return while others wait, lanes at
// different calls) stops the launch with a message, as do out-of-bounds
// buffer accesses and crashes inside the kernel.
//
// Coroutines start with makecontext/setcontext and switch with
// _setjmp/_longjmp, which skip the signal-mask system call of swapcontext.

#include "mtl_abi.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

extern "C" char __start_mtl_tgmem[] __attribute__((weak));
extern "C" char __stop_mtl_tgmem[] __attribute__((weak));

namespace {

constexpr int kSimdWidth = 32;
constexpr int kMaxThreadsPerThreadgroup = 1024;
constexpr long kMaxThreadgroupMemory = 32768;
constexpr size_t kStackSize = 256 * 1024;
constexpr int kMaxExchangeBytes = 16;

enum class State { ready, at_barrier, at_simd, done };

enum Order { order_forward = 0, order_reverse = 1, order_shuffled = 2 };

struct Thread {
  State state = State::ready;
  bool started = false;
  jmp_buf env;
  ucontext_t start;
  char* stack = nullptr;
  mtl::thread_attributes attributes;
  int line = 0;
  int op = 0;
  int scope = 0;
  unsigned char deposit[kMaxExchangeBytes];
  int deposit_size = 0;
  unsigned char* lanes_target = nullptr;
  unsigned active_mask = 0;
};

// Coroutine stacks of one launch, each with a guard page below it. They are
// unmapped when the launch ends because every guard page is a separate
// mapping. Every kernel library has its own copy of this runtime, so stacks
// kept per library exhausted the process's mapping limit (vm.max_map_count)
// after a few dozen libraries.
class Stacks {
 public:
  bool allocate(int count) {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    stride_ = kStackSize + page_;
    size_ = stride_ * size_t(count);
    void* memory = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
      return false;
    }
    base_ = static_cast<char*>(memory);
    for (int i = 0; i < count; ++i) {
      mprotect(base_ + size_t(i) * stride_, page_, PROT_NONE);
    }
    return true;
  }
  ~Stacks() {
    if (base_) {
      munmap(base_, size_);
    }
  }
  char* stack(int index) const { return base_ + size_t(index) * stride_ + page_; }

 private:
  char* base_ = nullptr;
  size_t page_ = 0;
  size_t stride_ = 0;
  size_t size_ = 0;
};

struct Launch {
  void* const* buffers = nullptr;
  const long long* sizes = nullptr;
  Stacks stacks;
  std::vector<Thread> threads;
  int thread_count = 0;
  int current = -1;
  jmp_buf scheduler_env;
  std::string error;
  mtl::uint3_pod group_position{0, 0, 0};
};

Launch* g_launch = nullptr;

std::string describe_thread(int index) {
  char text[160];
  if (index < 0 || !g_launch) {
    return "the scheduler";
  }
  const auto& a = g_launch->threads[index].attributes;
  std::snprintf(text, sizeof(text), "thread (%u, %u, %u) of threadgroup (%u, %u, %u)",
                a.thread_position_in_threadgroup.x, a.thread_position_in_threadgroup.y,
                a.thread_position_in_threadgroup.z, a.threadgroup_position_in_grid.x,
                a.threadgroup_position_in_grid.y, a.threadgroup_position_in_grid.z);
  return text;
}

std::string describe_group() {
  char text[96];
  const auto& p = g_launch->group_position;
  std::snprintf(text, sizeof(text), "threadgroup (%u, %u, %u)", p.x, p.y, p.z);
  return text;
}

[[noreturn]] void abort_launch(const std::string& message) {
  if (g_launch->error.empty()) {
    g_launch->error = message;
  }
  _longjmp(g_launch->scheduler_env, 2);
}

Thread& current_thread() {
  if (!g_launch || g_launch->current < 0) {
    std::fprintf(stderr, "metal emulator: kernel runtime call outside a kernel thread\n");
    std::abort();
  }
  return g_launch->threads[g_launch->current];
}

// Suspend the current thread and return to the scheduler.
void suspend(State state) {
  Thread& thread = current_thread();
  thread.state = state;
  if (_setjmp(thread.env) == 0) {
    _longjmp(g_launch->scheduler_env, 1);
  }
}

void thread_main() {
  Thread& thread = current_thread();
  mtl_kernel_entry(g_launch->buffers, g_launch->sizes, &thread.attributes);
  thread.state = State::done;
  _longjmp(g_launch->scheduler_env, 1);
}

// Run thread `index` until it suspends, finishes or fails. Returns false when
// the launch must stop.
bool resume(int index) {
  Launch& launch = *g_launch;
  Thread& thread = launch.threads[index];
  int code = _setjmp(launch.scheduler_env);
  if (code == 0) {
    launch.current = index;
    if (!thread.started) {
      thread.started = true;
      setcontext(&thread.start);
    }
    _longjmp(thread.env, 1);
  }
  launch.current = -1;
  return code == 1;
}

const char* signal_name(int signal) {
  switch (signal) {
    case SIGSEGV:
      return "segmentation fault (stack overflow or invalid pointer)";
    case SIGBUS:
      return "bus error";
    case SIGFPE:
      return "arithmetic exception (integer division by zero?)";
    default:
      return "signal";
  }
}

void on_crash(int signal) {
  if (g_launch && g_launch->current >= 0) {
    abort_launch(std::string(signal_name(signal)) + " in " + describe_thread(g_launch->current));
  }
  ::signal(signal, SIG_DFL);
  raise(signal);
}

struct CrashGuard {
  static constexpr int kSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};
  struct sigaction previous[3];
  stack_t previous_stack;
  std::vector<char> alternate_stack = std::vector<char>(1 << 16);

  CrashGuard() {
    stack_t stack{};
    stack.ss_sp = alternate_stack.data();
    stack.ss_size = alternate_stack.size();
    sigaltstack(&stack, &previous_stack);
    for (int i = 0; i < 3; ++i) {
      struct sigaction action {};
      action.sa_handler = on_crash;
      action.sa_flags = SA_ONSTACK | SA_NODEFER;
      sigemptyset(&action.sa_mask);
      sigaction(kSignals[i], &action, &previous[i]);
    }
  }
  ~CrashGuard() {
    for (int i = 0; i < 3; ++i) {
      sigaction(kSignals[i], &previous[i], nullptr);
    }
    sigaltstack(&previous_stack, nullptr);
  }
};

std::vector<int> make_order(int count, int order, std::mt19937_64& random) {
  std::vector<int> indices(count);
  std::iota(indices.begin(), indices.end(), 0);
  if (order == order_reverse) {
    std::reverse(indices.begin(), indices.end());
  } else if (order == order_shuffled) {
    std::shuffle(indices.begin(), indices.end(), random);
  }
  return indices;
}

// Complete the SIMD-group calls whose lanes have all arrived. Returns 1 when
// some lane became ready, 0 when none did, and -1 (with the error set) when
// the lanes of a simdgroup wait at different calls.
int release_simdgroups() {
  Launch& launch = *g_launch;
  bool released = false;
  for (int first = 0; first < launch.thread_count; first += kSimdWidth) {
    int last = std::min(first + kSimdWidth, launch.thread_count);
    int waiting = 0;
    int running = 0;
    int reference = -1;
    for (int i = first; i < last; ++i) {
      State state = launch.threads[i].state;
      if (state == State::at_simd) {
        waiting++;
        reference = reference < 0 ? i : reference;
      } else if (state != State::done) {
        running++;
      }
    }
    if (waiting == 0 || running > 0) {
      continue;
    }
    const Thread& first_lane = launch.threads[reference];
    unsigned active = 0;
    for (int i = first; i < last; ++i) {
      const Thread& lane = launch.threads[i];
      if (lane.state != State::at_simd) {
        continue;
      }
      if (lane.line != first_lane.line || lane.op != first_lane.op || lane.scope != first_lane.scope) {
        char text[200];
        std::snprintf(text, sizeof(text),
                      "lanes of one simdgroup reached different SIMD-group calls (line %d and line %d): ",
                      first_lane.line, lane.line);
        launch.error = text + describe_thread(reference) + " and " + describe_thread(i);
        return -1;
      }
      active |= 1u << (i - first);
    }
    for (int i = first; i < last; ++i) {
      Thread& lane = launch.threads[i];
      if (lane.state != State::at_simd) {
        continue;
      }
      if (lane.lanes_target) {
        std::memset(lane.lanes_target, 0, size_t(kSimdWidth) * size_t(lane.deposit_size));
        for (int j = first; j < last; ++j) {
          if ((active >> (j - first)) & 1u) {
            std::memcpy(lane.lanes_target + (j - first) * lane.deposit_size, launch.threads[j].deposit,
                        size_t(lane.deposit_size));
          }
        }
      }
      lane.active_mask = active;
      lane.state = State::ready;
      released = true;
    }
  }
  return released ? 1 : 0;
}

// Release the threadgroup barrier when every thread waits at it. Returns
// false (with the error set) when the threads can never all meet.
bool release_barrier(bool& finished) {
  Launch& launch = *g_launch;
  int done = 0;
  int at_simd = -1;
  int at_barrier = -1;
  for (int i = 0; i < launch.thread_count; ++i) {
    State state = launch.threads[i].state;
    if (state == State::done) {
      done++;
    } else if (state == State::at_simd) {
      at_simd = i;
    } else if (state == State::at_barrier) {
      if (at_barrier >= 0 && launch.threads[at_barrier].line != launch.threads[i].line) {
        char text[160];
        std::snprintf(text, sizeof(text), "threads reached different threadgroup barriers (line %d and line %d): ",
                      launch.threads[at_barrier].line, launch.threads[i].line);
        launch.error = text + describe_thread(at_barrier) + " and " + describe_thread(i);
        return false;
      }
      at_barrier = at_barrier < 0 ? i : at_barrier;
    }
  }
  if (done == launch.thread_count) {
    finished = true;
    return true;
  }
  if (at_simd >= 0) {
    char text[200];
    std::snprintf(text, sizeof(text),
                  "deadlock: a SIMD-group call at line %d waits for lanes that wait at a threadgroup barrier: ",
                  launch.threads[at_simd].line);
    launch.error = text + describe_thread(at_simd);
    return false;
  }
  if (done > 0) {
    char text[200];
    std::snprintf(text, sizeof(text),
                  "%d threads of %s returned while %d others wait at the threadgroup barrier at line %d", done,
                  describe_group().c_str(), launch.thread_count - done, launch.threads[at_barrier].line);
    launch.error = text;
    return false;
  }
  for (int i = 0; i < launch.thread_count; ++i) {
    launch.threads[i].state = State::ready;
  }
  return true;
}

unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

void set_attributes(mtl::thread_attributes& a, const unsigned grid[3], const unsigned group[3],
                    const unsigned position[3], const unsigned actual[3], unsigned x, unsigned y, unsigned z) {
  unsigned linear = x + y * actual[0] + z * actual[0] * actual[1];
  unsigned actual_count = actual[0] * actual[1] * actual[2];
  unsigned dispatch_count = group[0] * group[1] * group[2];
  a.thread_position_in_threadgroup = {x, y, z};
  a.threadgroup_position_in_grid = {position[0], position[1], position[2]};
  a.thread_position_in_grid = {position[0] * group[0] + x, position[1] * group[1] + y, position[2] * group[2] + z};
  a.threads_per_threadgroup = {actual[0], actual[1], actual[2]};
  a.dispatch_threads_per_threadgroup = {group[0], group[1], group[2]};
  a.threadgroups_per_grid = {ceil_div(grid[0], group[0]), ceil_div(grid[1], group[1]), ceil_div(grid[2], group[2])};
  a.threads_per_grid = {grid[0], grid[1], grid[2]};
  a.grid_size = {grid[0], grid[1], grid[2]};
  a.grid_origin = {0, 0, 0};
  a.thread_index_in_threadgroup = linear;
  a.thread_index_in_simdgroup = linear % kSimdWidth;
  a.simdgroup_index_in_threadgroup = linear / kSimdWidth;
  a.simdgroups_per_threadgroup = ceil_div(actual_count, kSimdWidth);
  a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatch_count, kSimdWidth);
  a.threads_per_simdgroup = kSimdWidth;
  a.thread_execution_width = kSimdWidth;
  a.thread_index_in_quadgroup = linear % 4;
  a.quadgroup_index_in_threadgroup = linear / 4;
  a.quadgroups_per_threadgroup = ceil_div(actual_count, 4);
  a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatch_count, 4);
}

bool run_threadgroup(const unsigned grid[3], const unsigned group[3], const unsigned position[3], int order,
                     std::mt19937_64& random) {
  Launch& launch = *g_launch;
  unsigned actual[3];
  for (int d = 0; d < 3; ++d) {
    actual[d] = std::min(group[d], grid[d] - position[d] * group[d]);
  }
  launch.group_position = {position[0], position[1], position[2]};
  launch.thread_count = int(actual[0] * actual[1] * actual[2]);

  if (__start_mtl_tgmem && __stop_mtl_tgmem) {
    std::memset(__start_mtl_tgmem, 0xFF, size_t(__stop_mtl_tgmem - __start_mtl_tgmem));
  }

  for (unsigned z = 0, index = 0; z < actual[2]; ++z) {
    for (unsigned y = 0; y < actual[1]; ++y) {
      for (unsigned x = 0; x < actual[0]; ++x, ++index) {
        Thread& thread = launch.threads[index];
        thread = Thread();
        set_attributes(thread.attributes, grid, group, position, actual, x, y, z);
        thread.stack = launch.stacks.stack(int(index));
        getcontext(&thread.start);
        thread.start.uc_stack.ss_sp = thread.stack;
        thread.start.uc_stack.ss_size = kStackSize;
        thread.start.uc_link = nullptr;
        makecontext(&thread.start, thread_main, 0);
      }
    }
  }

  while (true) {
    for (int index : make_order(launch.thread_count, order, random)) {
      if (launch.threads[index].state == State::ready && !resume(index)) {
        return false;
      }
    }
    int simd = release_simdgroups();
    if (simd < 0) {
      return false;
    }
    if (simd > 0) {
      continue;
    }
    bool finished = false;
    if (!release_barrier(finished)) {
      return false;
    }
    if (finished) {
      return true;
    }
  }
}

}  // namespace

namespace mtl {

void fail(const char* message) {
  abort_launch(std::string(message) + " in " + describe_thread(g_launch ? g_launch->current : -1));
}

void fail_out_of_bounds(const char* name, long long index, long long size) {
  char text[256];
  std::snprintf(text, sizeof(text), "out-of-bounds access to buffer '%s': index %lld of %lld elements in ", name,
                index, size);
  abort_launch(text + describe_thread(g_launch->current));
}

void barrier(int scope, int flags, int line) {
  Thread& thread = current_thread();
  thread.line = line;
  thread.scope = scope;
  thread.op = -1;
  thread.lanes_target = nullptr;
  thread.deposit_size = 0;
  (void)flags;
  suspend(scope == 0 ? State::at_barrier : State::at_simd);
}

unsigned simd_exchange(int op, int line, const void* value, int size, void* lanes) {
  Thread& thread = current_thread();
  if (size > kMaxExchangeBytes) {
    fail("SIMD-group value too large for the emulator");
  }
  thread.line = line;
  thread.scope = 1;
  thread.op = op;
  std::memcpy(thread.deposit, value, size_t(size));
  thread.deposit_size = size;
  thread.lanes_target = static_cast<unsigned char*>(lanes);
  suspend(State::at_simd);
  return current_thread().active_mask;
}

unsigned current_lane() { return current_thread().attributes.thread_index_in_simdgroup; }

}  // namespace mtl

// Run a whole launch. `grid` is in threads and `group` is the threadgroup
// size, as MLX passes them to dispatchThreads. Returns 0 on success, or 1
// with a message in `error`.
extern "C" __attribute__((visibility("default"))) int mtl_launch(
    const long long* grid_in, const long long* group_in, int order, unsigned long long seed,
    void* const* buffers, const long long* sizes, char* error, int error_size) {
  unsigned grid[3];
  unsigned group[3];
  long long group_threads = 1;
  for (int d = 0; d < 3; ++d) {
    grid[d] = unsigned(grid_in[d]);
    group[d] = unsigned(group_in[d]);
    group_threads *= group_in[d];
  }
  auto report = [&](const std::string& message) {
    std::snprintf(error, size_t(error_size), "%s", message.c_str());
    return 1;
  };
  if (group_threads <= 0 || group_threads > kMaxThreadsPerThreadgroup) {
    return report("threadgroup size must be between 1 and 1024 threads");
  }
  long memory = (__start_mtl_tgmem && __stop_mtl_tgmem) ? long(__stop_mtl_tgmem - __start_mtl_tgmem) : 0;
  if (memory > kMaxThreadgroupMemory) {
    return report("kernel declares " + std::to_string(memory) +
                  " bytes of threadgroup memory, more than the 32768 bytes Metal allows");
  }
  Launch launch;
  if (!launch.stacks.allocate(int(group_threads))) {
    return report("cannot allocate coroutine stacks");
  }
  launch.buffers = buffers;
  launch.sizes = sizes;
  launch.threads.resize(size_t(group_threads));
  g_launch = &launch;
  CrashGuard guard;

  std::mt19937_64 random(seed);
  unsigned counts[3];
  for (int d = 0; d < 3; ++d) {
    counts[d] = ceil_div(grid[d], group[d]);
  }
  std::vector<int> groups = make_order(int(counts[0] * counts[1] * counts[2]), order, random);
  bool ok = true;
  for (int linear : groups) {
    unsigned position[3] = {unsigned(linear) % counts[0], (unsigned(linear) / counts[0]) % counts[1],
                            unsigned(linear) / (counts[0] * counts[1])};
    if (!run_threadgroup(grid, group, position, order, random)) {
      ok = false;
      break;
    }
  }
  g_launch = nullptr;
  if (!ok) {
    return report(launch.error);
  }
  return 0;
}

// The C ABI between kubetune-collective (Rust) and Gloo (C++).
//
// Gloo has no C API: these few functions create a full-mesh TCP context through a
// rendezvous store whose set/get are Rust callbacks, and run Gloo's allreduce (sum),
// all-gather, reduce-scatter (sum), broadcast and barrier on it. No C++ exception crosses the boundary: every entry
// point catches everything and reports it as a message in the caller's buffer.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <memory>
#include <string>
#include <vector>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

extern "C" {

// Receives a value the Rust store fetched; returns 0, or non-zero when it could not
// keep it (out of memory).
typedef int (*kt_sink_fn)(void* sink, const char* data, size_t len);

// The rendezvous store, implemented in Rust. Each returns 0 on success; otherwise it
// writes a NUL-terminated message of at most err_cap bytes into err.
struct kt_store_callbacks {
  void* ctx;
  int (*set)(void* ctx, const char* key, size_t key_len, const char* value,
             size_t value_len, char* err, size_t err_cap);
  // Waits up to timeout_ms for key, then hands its value to sink_fn(sink, ...).
  int (*get)(void* ctx, const char* key, size_t key_len, uint64_t timeout_ms,
             void* sink, kt_sink_fn sink_fn, char* err, size_t err_cap);
};

struct kt_comm;

}  // extern "C"

struct kt_comm {
  std::shared_ptr<gloo::rendezvous::Context> context;
  std::chrono::milliseconds timeout;
};

namespace {

constexpr size_t kErrBytes = 1024;

void write_error(char* err, size_t cap, const std::string& message) {
  if (err == nullptr || cap == 0) {
    return;
  }
  size_t n = std::min(message.size(), cap - 1);
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

extern "C" int append_to_vector(void* sink, const char* data, size_t len) {
  try {
    auto* out = static_cast<std::vector<char>*>(sink);
    out->assign(data, data + len);
    return 0;
  } catch (...) {
    return 1;
  }
}

// Gloo's rendezvous::Store over the Rust callbacks. Gloo's connectFullMesh calls get
// without a timeout and expects it to block until the key exists, so get waits up to
// the rendezvous timeout.
class CallbackStore : public gloo::rendezvous::Store {
 public:
  CallbackStore(const kt_store_callbacks& callbacks, std::chrono::milliseconds timeout)
      : callbacks_(callbacks), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    char err[kErrBytes] = {0};
    if (callbacks_.set(callbacks_.ctx, key.data(), key.size(), data.data(), data.size(),
                       err, sizeof(err)) != 0) {
      throw gloo::IoException(std::string("rendezvous store: ") + err);
    }
  }

  std::vector<char> get(const std::string& key) override {
    return fetch(key, timeout_);
  }

  void wait(const std::vector<std::string>& keys) override {
    wait(keys, timeout_);
  }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    auto limit = timeout == gloo::kNoTimeout ? timeout_ : timeout;
    auto deadline = std::chrono::steady_clock::now() + limit;
    for (const auto& key : keys) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      fetch(key, std::max(left, std::chrono::milliseconds(1)));
    }
  }

 private:
  std::vector<char> fetch(const std::string& key, std::chrono::milliseconds timeout) {
    std::vector<char> value;
    char err[kErrBytes] = {0};
    if (callbacks_.get(callbacks_.ctx, key.data(), key.size(),
                       static_cast<uint64_t>(timeout.count()), &value, append_to_vector,
                       err, sizeof(err)) != 0) {
      throw gloo::IoException(std::string("rendezvous store: ") + err);
    }
    return value;
  }

  kt_store_callbacks callbacks_;
  std::chrono::milliseconds timeout_;
};

// Runs f, turning any exception into a message and -1.
template <typename F>
int guarded(char* err, size_t cap, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, cap, e.what());
  } catch (...) {
    write_error(err, cap, "unknown C++ exception");
  }
  return -1;
}

template <typename T>
int allreduce_sum(kt_comm* comm, T* data, size_t n, char* err, size_t cap) {
  return guarded(err, cap, [&] {
    gloo::AllreduceOptions opts(comm->context);
    opts.setOutput(data, n);
    opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
    opts.setReduceFunction(
        static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
    opts.setTimeout(comm->timeout);
    gloo::allreduce(opts);
  });
}

}  // namespace

extern "C" {

// Connects rank `rank` of `size` to every other rank: binds a TCP device on
// `hostname` (this machine's hostname when empty), exchanges addresses through the
// store and connects the full mesh, all within rendezvous_timeout_ms. Collectives
// then time out after timeout_ms. Returns NULL with a message in err on failure.
kt_comm* kt_comm_connect(int rank, int size, const char* hostname,
                         uint64_t rendezvous_timeout_ms, uint64_t timeout_ms,
                         const kt_store_callbacks* callbacks, char* err, size_t cap) {
  kt_comm* result = nullptr;
  guarded(err, cap, [&] {
    gloo::transport::tcp::attr attr;
    if (hostname != nullptr && hostname[0] != '\0') {
      attr.hostname = hostname;
    }
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    auto rendezvous = std::chrono::milliseconds(rendezvous_timeout_ms);
    context->setTimeout(rendezvous);
    CallbackStore store(*callbacks, rendezvous);
    context->connectFullMesh(store, device);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    context->setTimeout(timeout);
    result = new kt_comm{std::move(context), timeout};
  });
  return result;
}

void kt_comm_free(kt_comm* comm) {
  try {
    delete comm;
  } catch (...) {
    // A destructor that throws has nowhere to report; the process is ending anyway.
  }
}

int kt_comm_allreduce_sum_f32(kt_comm* comm, float* data, size_t n, char* err, size_t cap) {
  return allreduce_sum<float>(comm, data, n, err, cap);
}

int kt_comm_allreduce_sum_f64(kt_comm* comm, double* data, size_t n, char* err,
                              size_t cap) {
  return allreduce_sum<double>(comm, data, n, err, cap);
}

// Every rank's `n` elements of `in`, in rank order, into `out` (n × size elements) on
// every rank: Gloo's ring all-gather.
int kt_comm_allgather_f32(kt_comm* comm, const float* in, size_t n, float* out, char* err,
                          size_t cap) {
  return guarded(err, cap, [&] {
    gloo::AllgatherOptions opts(comm->context);
    // Gloo copies the input into its slot of the output before the ring starts and
    // never writes the input.
    opts.setInput(const_cast<float*>(in), n);
    opts.setOutput(out, n * static_cast<size_t>(comm->context->size));
    opts.setTimeout(comm->timeout);
    gloo::allgather(opts);
  });
}

// Sums `data` (n × size elements) element-wise across ranks, leaving on each rank r
// only its segment [r·n, (r+1)·n) summed: a ring on Gloo's transport (size − 1 steps;
// at each, a rank sends one segment to the next rank and adds the one the previous
// rank sent), so each rank sends (size − 1)·n elements, the bound for a
// reduce-scatter. Gloo 0.0~2022 has no reduce-scatter in its options API, and its
// halving-doubling algorithm places segments in another order for sizes that are not
// powers of two. The rest of `data` holds partial sums afterwards.
int kt_comm_reduce_scatter_sum_f32(kt_comm* comm, float* data, size_t n, char* err,
                                   size_t cap) {
  return guarded(err, cap, [&] {
    const auto& context = comm->context;
    const int size = context->size;
    const int rank = context->rank;
    const size_t bytes = n * sizeof(float);
    auto out = context->createUnboundBuffer(data, bytes * static_cast<size_t>(size));
    std::vector<float> incoming(n);
    auto in = context->createUnboundBuffer(incoming.data(), bytes);
    const int next = (rank + 1) % size;
    const int prev = (rank + size - 1) % size;
    const uint64_t slot = static_cast<uint64_t>(context->nextSlot(size));
    for (int step = 0; step + 1 < size; ++step) {
      const size_t send = static_cast<size_t>((rank - step - 1 + 2 * size) % size);
      const size_t recv = static_cast<size_t>((rank - step - 2 + 2 * size) % size);
      out->send(next, slot + static_cast<uint64_t>(step), send * bytes, bytes);
      in->recv(prev, slot + static_cast<uint64_t>(step), 0, bytes);
      in->waitRecv(comm->timeout);
      out->waitSend(comm->timeout);
      float* target = data + recv * n;
      for (size_t i = 0; i < n; ++i) {
        target[i] += incoming[i];
      }
    }
  });
}

int kt_comm_broadcast(kt_comm* comm, void* data, size_t bytes, int root, char* err,
                      size_t cap) {
  return guarded(err, cap, [&] {
    gloo::BroadcastOptions opts(comm->context);
    opts.setOutput(static_cast<uint8_t*>(data), bytes);
    opts.setRoot(root);
    opts.setTimeout(comm->timeout);
    gloo::broadcast(opts);
  });
}

int kt_comm_barrier(kt_comm* comm, char* err, size_t cap) {
  return guarded(err, cap, [&] {
    gloo::BarrierOptions opts(comm->context);
    opts.setTimeout(comm->timeout);
    gloo::barrier(opts);
  });
}

}  // extern "C"

// The data-parallel ranks' process group: libtorch's own c10d (ProcessGroupGloo; with RLT_NCCL,
// ProcessGroupNCCL), met through its TCPStore the way torchrun's ranks meet, behind a
// small C interface for `src/c10d.rs`. Tensors cross as tch's handles (`at::Tensor*`).
//
// Only c10d's declarations are compiled here: every Gloo and NCCL object is made and used
// inside libtorch, so the Gloo headers this includes (ProcessGroupGloo.hpp needs them, and the
// PyPI wheel leaves them out) only have to declare what that header names.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef RLT_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

struct rlt_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace {

// Runs `body`; an exception becomes a message the caller frees with rlt_c10d_free_error.
template <typename F>
int guarded(char** err, F body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    // The message a user acts on; libtorch's own backtrace would bury it in the log.
    *err = strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = strdup(e.what());
  } catch (...) {
    *err = strdup("unknown C++ exception");
  }
  return 1;
}

void finish(const c10::intrusive_ptr<c10d::Work>& work) {
  // Throws the collective's error (a peer gone, a timeout) instead of returning false.
  work->wait();
}

}  // namespace

extern "C" {

// Joins the group `prefix` (the stage attempt: a rank of another attempt never meets this
// one) of `world` ranks through the TCPStore at master:port, which rank 0 serves, waiting up to
// `timeout_ms` for them; each collective then waits up to `op_timeout_ms` for its peers.
// `device_host` is the address Gloo binds to and announces (null: this machine's hostname,
// as torchrun).
rlt_pg* rlt_c10d_new(const char* master, uint16_t port, int rank, int world,
                     int64_t timeout_ms, int64_t op_timeout_ms, int nccl, const char* prefix,
                     const char* device_host, char** err) {
  rlt_pg* pg = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto op_timeout = std::chrono::milliseconds(op_timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = rank == 0;
    o.numWorkers = world;
    o.waitWorkers = true;
    o.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(master, o);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (nccl) {
#ifdef RLT_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = op_timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error(
          "this rlt-trainer was built without NCCL (ProcessGroupNCCL is in libtorch_cuda.so, "
          "which the CPU image's binary must not need)");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create();
      opts->timeout = op_timeout;
      opts->devices.push_back(
          device_host ? c10d::ProcessGroupGloo::createDeviceForHostname(device_host)
                      : c10d::ProcessGroupGloo::createDefaultDevice());
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    }
    pg = new rlt_pg{store, backend};
  });
  return pg;
}

void rlt_c10d_free(rlt_pg* pg) { delete pg; }

void rlt_c10d_free_error(char* err) { free(err); }

int rlt_c10d_has_nccl() {
#ifdef RLT_NCCL
  return 1;
#else
  return 0;
#endif
}

// Sums `t` over the ranks, in place.
int rlt_c10d_all_reduce(rlt_pg* pg, at::Tensor* t, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    finish(pg->backend->allreduce(ts, c10d::AllreduceOptions{}));
  });
}

// `out` (1/world of `in`) gets rank's shard of the sum of every rank's `in`.
int rlt_c10d_reduce_scatter(rlt_pg* pg, at::Tensor* out, at::Tensor* in, char** err) {
  return guarded(err, [&] {
    finish(pg->backend->_reduce_scatter_base(*out, *in, c10d::ReduceScatterOptions{}));
  });
}

// `out` (world times `in`) gets every rank's `in`, in rank order.
int rlt_c10d_all_gather(rlt_pg* pg, at::Tensor* out, at::Tensor* in, char** err) {
  return guarded(err, [&] {
    finish(pg->backend->_allgather_base(*out, *in, c10d::AllgatherOptions{}));
  });
}

// Every rank's `t` becomes `root`'s.
int rlt_c10d_broadcast(rlt_pg* pg, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    finish(pg->backend->broadcast(ts, o));
  });
}

// Waits for every rank, up to `timeout_ms` (0: the group's collective timeout).
int rlt_c10d_barrier(rlt_pg* pg, int64_t timeout_ms, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions o;
    if (timeout_ms > 0) o.timeout = std::chrono::milliseconds(timeout_ms);
    finish(pg->backend->barrier(o));
  });
}

}  // extern "C"

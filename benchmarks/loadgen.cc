// A gRPC load generator in C++, so that the benchmark's client costs the two shared cores
// about as little as pgbench does on its side (a Python client costs ~0.3 ms of CPU a call).
//
// It knows nothing of our protos: it sends pre-serialized requests, read from a file, with
// gRPC's generic stub. benchmarks/run.py writes the file, starts this, and reads its last
// line. One thread drives `--concurrency` calls in flight over `--channels` connections.
//
//   loadgen --target HOST:PORT --method /pkg.Service/Method --requests FILE
//           [--concurrency 16] [--channels 4] [--warmup 2] [--seconds 10] [--cycle]
//
// FILE holds requests as <4-byte little-endian length><bytes>. Without --cycle each request
// is sent once (requests with unique request ids) and running out is an error. Prints
//   ops=<calls/s> p50_ms=<x> p99_ms=<x> calls=<n> errors=<n> first_error=<code:message>
// where calls, ops and latencies count the calls that started and ended inside the timed
// window, and errors every failed call that started in it.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string target, method, requests;
  int concurrency = 16, channels = 4;
  double warmup = 2, seconds = 10;
  bool cycle = false;
};

struct Call {
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point started;
};

std::vector<grpc::Slice> ReadRequests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::vector<grpc::Slice> requests;
  uint8_t header[4];
  while (in.read(reinterpret_cast<char*>(header), 4)) {
    uint32_t length = header[0] | header[1] << 8 | header[2] << 16 | uint32_t(header[3]) << 24;
    std::string body(length, '\0');
    if (!in.read(body.data(), length)) throw std::runtime_error("truncated " + path);
    requests.emplace_back(body);
  }
  return requests;
}

Options Parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--target") options.target = value();
    else if (flag == "--method") options.method = value();
    else if (flag == "--requests") options.requests = value();
    else if (flag == "--concurrency") options.concurrency = std::stoi(value());
    else if (flag == "--channels") options.channels = std::stoi(value());
    else if (flag == "--warmup") options.warmup = std::stod(value());
    else if (flag == "--seconds") options.seconds = std::stod(value());
    else if (flag == "--cycle") options.cycle = true;
    else throw std::runtime_error("unknown flag " + flag);
  }
  if (options.target.empty() || options.method.empty() || options.requests.empty())
    throw std::runtime_error("--target, --method and --requests are required");
  if (options.concurrency < 1 || options.channels < 1 || options.seconds <= 0)
    throw std::runtime_error("--concurrency, --channels and --seconds must be positive");
  return options;
}

int Run(const Options& options) {
  const std::vector<grpc::Slice> requests = ReadRequests(options.requests);
  if (requests.empty()) throw std::runtime_error("no requests in " + options.requests);

  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < options.channels; ++i) {
    grpc::ChannelArguments arguments;
    // A connection of its own per channel, as separate clients would have.
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    arguments.SetInt("loadgen.channel", i);
    stubs.push_back(std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
        options.target, grpc::InsecureChannelCredentials(), arguments)));
  }

  grpc::CompletionQueue queue;
  const auto begin = Clock::now();
  const auto measure_from = begin + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(options.warmup));
  const auto stop = measure_from + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(options.seconds));
  size_t next = 0;
  int in_flight = 0;
  uint64_t errors = 0;
  std::string first_error;
  std::vector<double> latencies_ms;
  latencies_ms.reserve(1 << 20);

  auto start = [&](int slot) -> bool {
    if (next >= requests.size()) {
      if (!options.cycle) return false;
      next = 0;
    }
    grpc::ByteBuffer request(&requests[next++], 1);
    auto* call = new Call;
    call->started = Clock::now();
    // A call that never ends must fail the run, not hang it.
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    call->reader = stubs[slot % stubs.size()]->PrepareUnaryCall(
        &call->context, options.method, request, &queue);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
    ++in_flight;
    return true;
  };

  bool ran_out = false;
  for (int slot = 0; slot < options.concurrency; ++slot) ran_out |= !start(slot);
  int slot = 0;
  void* tag;
  bool ok;
  while (in_flight > 0 && queue.Next(&tag, &ok)) {
    auto* call = static_cast<Call*>(tag);
    --in_flight;
    const auto done = Clock::now();
    if (call->started >= measure_from) {
      // A failed call counts whenever it ends (a deadline ends it after the window);
      // a call that succeeds counts if it ended inside the window.
      if (!call->status.ok()) {
        if (errors++ == 0)
          first_error = std::to_string(call->status.error_code()) + ":" + call->status.error_message();
      } else if (done <= stop) {
        latencies_ms.push_back(std::chrono::duration<double, std::milli>(done - call->started).count());
      }
    }
    delete call;
    if (done < stop && !ran_out) ran_out = !start(slot++);
  }
  queue.Shutdown();
  while (queue.Next(&tag, &ok)) {
  }
  if (ran_out) {
    std::cerr << "ran out of requests before the window ended; write more\n";
    return 2;
  }

  std::sort(latencies_ms.begin(), latencies_ms.end());
  auto percentile = [&](double fraction) {
    if (latencies_ms.empty()) return 0.0;
    size_t index = std::min(latencies_ms.size() - 1, size_t(latencies_ms.size() * fraction));
    return latencies_ms[index];
  };
  std::printf("ops=%.1f p50_ms=%.2f p99_ms=%.2f calls=%zu errors=%llu first_error=%s\n",
              latencies_ms.size() / options.seconds, percentile(0.5), percentile(0.99),
              latencies_ms.size(), static_cast<unsigned long long>(errors),
              first_error.empty() ? "none" : first_error.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(Parse(argc, argv));
  } catch (const std::exception& error) {
    std::cerr << "loadgen: " << error.what() << "\n";
    return 2;
  }
}

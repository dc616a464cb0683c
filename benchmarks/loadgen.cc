// A gRPC load generator in C++, so that the benchmark's client costs the two shared cores
// about as little as pgbench does on its side (a Python client costs ~0.3 ms of CPU a call).
//
// It knows nothing of our protos: it sends pre-serialized requests, read from a file, with
// gRPC's generic stub. benchmarks/run.py writes the file, starts this, and reads its last
// line. One thread drives `--concurrency` calls in flight over `--channels` connections.
//
//   loadgen --target HOST:PORT --method /pkg.Service/Method --requests FILE
//           [--concurrency 16] [--channels 4] [--warmup 2] [--seconds 10] [--cycle]
//           [--subscribers N --subscribe-method /pkg.Service/SubscribeMethod]
//
// FILE holds requests as <4-byte little-endian length><bytes>. Without --cycle each request
// is sent once (requests with unique request ids) and running out is an error. Prints
//   ops=<calls/s> p50_ms=<x> p99_ms=<x> calls=<n> errors=<n> first_error=<code:message>
// where calls, ops and latencies count the calls that started and ended inside the timed
// window, and errors every failed call that started in it.
//
// With --subscribers, N server-streaming calls of the subscribe method (an empty request:
// every event from now on; a SubscribeTransactionEventsResponse-shaped reply) stay open on
// --channels connections of their own, read on a thread of their own. Once each has had its
// first response (so that every subscriber is attached before the warm-up), it prints
// `subscribed=<N>`, and at the end, before first_error (which is free text, so stays last):
//   delivered=<n> delivery_p50_ms=<x> delivery_p99_ms=<x> stream_errors=<n>
// where delivered counts the events all subscribers received inside the timed window, and
// delivery latency is the receipt time less the event's create_time (the server's clock;
// this runs on the same host). A stream error is a stream that ended before the end of the
// run, or that the run's cancellation ended with another status than CANCELLED.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string target, method, requests, subscribe_method;
  int concurrency = 16, channels = 4, subscribers = 0;
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
    else if (flag == "--subscribers") options.subscribers = std::stoi(value());
    else if (flag == "--subscribe-method") options.subscribe_method = value();
    else throw std::runtime_error("unknown flag " + flag);
  }
  if (options.target.empty() || options.method.empty() || options.requests.empty())
    throw std::runtime_error("--target, --method and --requests are required");
  if (options.concurrency < 1 || options.channels < 1 || options.seconds <= 0)
    throw std::runtime_error("--concurrency, --channels and --seconds must be positive");
  if (options.subscribers < 0 || (options.subscribers > 0 && options.subscribe_method.empty()))
    throw std::runtime_error("--subscribers needs --subscribe-method, and must not be negative");
  return options;
}

std::vector<std::unique_ptr<grpc::GenericStub>> MakeStubs(const Options& options,
                                                          const std::string& role) {
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < options.channels; ++i) {
    grpc::ChannelArguments arguments;
    // A connection of its own per channel, as separate clients would have.
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    arguments.SetString("loadgen.role", role);
    arguments.SetInt("loadgen.channel", i);
    stubs.push_back(std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
        options.target, grpc::InsecureChannelCredentials(), arguments)));
  }
  return stubs;
}

double Percentile(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return 0.0;
  return sorted[std::min(sorted.size() - 1, size_t(sorted.size() * fraction))];
}

// ---------------------------------------------------------------------------------------
// Just enough of the protobuf wire format to find each event's create_time, so that this
// stays free of generated code. Malformed input throws.

class WireReader {
 public:
  WireReader(const uint8_t* begin, const uint8_t* end) : at_(begin), end_(end) {}

  // The next field's number and wire type; false at the end.
  bool Next(uint32_t* field, uint32_t* wire_type) {
    if (at_ == end_) return false;
    const uint64_t key = Varint();
    *field = uint32_t(key >> 3);
    *wire_type = uint32_t(key & 7);
    return true;
  }

  uint64_t Varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (at_ == end_) throw std::runtime_error("truncated varint");
      const uint8_t byte = *at_++;
      value |= uint64_t(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return value;
    }
    throw std::runtime_error("varint too long");
  }

  // A length-delimited field's bytes (a message, a string), as a reader of their own.
  WireReader Bytes() {
    const uint64_t length = Varint();
    if (length > uint64_t(end_ - at_)) throw std::runtime_error("truncated field");
    WireReader inner(at_, at_ + length);
    at_ += length;
    return inner;
  }

  void Skip(uint32_t wire_type) {
    switch (wire_type) {
      case 0: Varint(); return;
      case 1: Advance(8); return;
      case 2: Bytes(); return;
      case 5: Advance(4); return;
      default: throw std::runtime_error("unsupported wire type " + std::to_string(wire_type));
    }
  }

 private:
  void Advance(size_t count) {
    if (count > size_t(end_ - at_)) throw std::runtime_error("truncated field");
    at_ += count;
  }

  const uint8_t* at_;
  const uint8_t* end_;
};

using WallClock = std::chrono::system_clock;

// A google.protobuf.Timestamp: 1 seconds, 2 nanos.
WallClock::time_point ReadTimestamp(WireReader message) {
  int64_t seconds = 0, nanos = 0;
  uint32_t field, wire_type;
  while (message.Next(&field, &wire_type)) {
    if (field == 1 && wire_type == 0) seconds = int64_t(message.Varint());
    else if (field == 2 && wire_type == 0) nanos = int64_t(message.Varint());
    else message.Skip(wire_type);
  }
  return WallClock::time_point(std::chrono::duration_cast<WallClock::duration>(
      std::chrono::seconds(seconds) + std::chrono::nanoseconds(nanos)));
}

// The create_time (field 3) of each event (field 1) in a subscribe response; none in a
// heartbeat.
std::vector<WallClock::time_point> EventTimes(const grpc::ByteBuffer& response) {
  grpc::Slice slice;
  if (!response.DumpToSingleSlice(&slice).ok()) throw std::runtime_error("unreadable response");
  WireReader reader(slice.begin(), slice.end());
  std::vector<WallClock::time_point> times;
  uint32_t field, wire_type;
  while (reader.Next(&field, &wire_type)) {
    if (field != 1 || wire_type != 2) {
      reader.Skip(wire_type);
      continue;
    }
    WireReader event = reader.Bytes();
    bool found = false;
    while (event.Next(&field, &wire_type)) {
      if (field == 3 && wire_type == 2) {
        times.push_back(ReadTimestamp(event.Bytes()));
        found = true;
      } else {
        event.Skip(wire_type);
      }
    }
    if (!found) throw std::runtime_error("an event without create_time");
  }
  return times;
}

// ---------------------------------------------------------------------------------------
// Subscribers: streams read on a thread of their own, so that the unary driver never waits
// on them (its calls are the throughput measured).

struct Delivery {
  Clock::time_point received;
  double latency_ms;
};

struct Stream {
  // The one operation in flight: each stream does one thing at a time, so its tag is itself.
  enum class Step { kStart, kWrite, kRead, kFinish };
  Step step = Step::kStart;
  bool attached = false;
  grpc::ClientContext context;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call;
  grpc::ByteBuffer response;
  grpc::Status status;
};

class Subscribers {
 public:
  explicit Subscribers(const Options& options) : stubs_(MakeStubs(options, "subscriber")) {
    deliveries_.reserve(1 << 20);
    // The empty request: every event from now on.
    grpc::Slice empty("");
    request_ = grpc::ByteBuffer(&empty, 1);
    for (int i = 0; i < options.subscribers; ++i) {
      auto stream = std::make_unique<Stream>();
      stream->call = stubs_[i % stubs_.size()]->PrepareCall(
          &stream->context, options.subscribe_method, &queue_);
      stream->call->StartCall(stream.get());
      streams_.push_back(std::move(stream));
    }
    thread_ = std::thread([this] { Pump(); });
  }

  ~Subscribers() { Stop(); }

  // True once every stream has had its first response; false as soon as one ended first, or
  // after the timeout.
  bool WaitAttached(Clock::duration timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_for(lock, timeout,
                      [&] { return attached_ == int(streams_.size()) || ended_ > 0; });
    return attached_ == int(streams_.size());
  }

  // Cancels every stream and waits for each to finish. Deliveries are final from then on.
  void Stop() {
    if (!thread_.joinable()) return;
    stopping_ = true;
    for (auto& stream : streams_) stream->context.TryCancel();
    thread_.join();
  }

  const std::vector<Delivery>& deliveries() const { return deliveries_; }
  int errors() const { return errors_; }
  const std::string& first_error() const { return first_error_; }

 private:
  void Pump() {
    void* tag;
    bool ok;
    while (queue_.Next(&tag, &ok)) {
      if (Advance(static_cast<Stream*>(tag), ok)) queue_.Shutdown();
    }
  }

  // Starts the stream's next operation, given how its last one went; true once the last
  // stream has finished.
  bool Advance(Stream* stream, bool ok) {
    switch (stream->step) {
      case Stream::Step::kStart:
        if (!ok) break;
        stream->step = Stream::Step::kWrite;
        // The request and the half-close in one: the server streams from then on.
        stream->call->WriteLast(request_, grpc::WriteOptions(), stream);
        return false;
      case Stream::Step::kWrite:
      case Stream::Step::kRead:
        if (!ok) break;
        if (stream->step == Stream::Step::kRead) Receive(stream);
        stream->step = Stream::Step::kRead;
        stream->call->Read(&stream->response, stream);
        return false;
      case Stream::Step::kFinish:
        return Finished(stream);
    }
    // The stream ended (or was cancelled): its status says why.
    stream->step = Stream::Step::kFinish;
    stream->call->Finish(&stream->status, stream);
    return false;
  }

  void Receive(Stream* stream) {
    const auto received = Clock::now();
    const auto wall = WallClock::now();
    if (!stream->attached) {
      // The first response carries the start position: from then on, nothing is missed.
      stream->attached = true;
      std::lock_guard<std::mutex> lock(mutex_);
      ++attached_;
      changed_.notify_all();
      return;
    }
    try {
      for (const auto created : EventTimes(stream->response))
        deliveries_.push_back(
            {received, std::chrono::duration<double, std::milli>(wall - created).count()});
    } catch (const std::exception& error) {
      // Counted when the stream finishes: cancelled now, and not by the end of the run.
      Fail("unparsable response: " + std::string(error.what()));
      stream->context.TryCancel();
    }
  }

  bool Finished(Stream* stream) {
    const auto code = stream->status.error_code();
    if (!stopping_ || (code != grpc::StatusCode::CANCELLED && code != grpc::StatusCode::OK))
      Fail(std::to_string(code) + ":" + stream->status.error_message());
    std::lock_guard<std::mutex> lock(mutex_);
    ++ended_;
    changed_.notify_all();
    return ended_ == int(streams_.size());
  }

  void Fail(const std::string& error) {
    if (errors_++ == 0) {
      first_error_ = error;
      std::cerr << "loadgen: subscriber stream failed: " << error << "\n";
    }
  }

  // Declared in this order so that the streams go before the queue, and it before the
  // channels.
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  grpc::CompletionQueue queue_;
  std::vector<std::unique_ptr<Stream>> streams_;
  grpc::ByteBuffer request_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::condition_variable changed_;
  int attached_ = 0, ended_ = 0;
  // Written by the pump thread only; read after Stop.
  std::vector<Delivery> deliveries_;
  int errors_ = 0;
  std::string first_error_;
  std::thread thread_;
};

// Attaches the subscribers before any load; announces it, for run.py to start its clock.
std::unique_ptr<Subscribers> Subscribe(const Options& options) {
  if (options.subscribers == 0) return nullptr;
  auto subscribers = std::make_unique<Subscribers>(options);
  if (!subscribers->WaitAttached(std::chrono::seconds(60))) {
    subscribers->Stop();
    throw std::runtime_error("the subscribers did not all attach: " +
                             (subscribers->first_error().empty() ? std::string("timed out")
                                                                 : subscribers->first_error()));
  }
  std::printf("subscribed=%d\n", options.subscribers);
  std::fflush(stdout);
  return subscribers;
}

// The delivery keys of the result line, over the deliveries received inside the window.
std::string DeliveryReport(const Subscribers& subscribers, Clock::time_point from,
                           Clock::time_point to) {
  std::vector<double> latencies_ms;
  for (const auto& delivery : subscribers.deliveries())
    if (delivery.received >= from && delivery.received <= to)
      latencies_ms.push_back(delivery.latency_ms);
  std::sort(latencies_ms.begin(), latencies_ms.end());
  char line[200];
  std::snprintf(line, sizeof line,
                "delivered=%zu delivery_p50_ms=%.2f delivery_p99_ms=%.2f stream_errors=%d ",
                latencies_ms.size(), Percentile(latencies_ms, 0.5),
                Percentile(latencies_ms, 0.99), subscribers.errors());
  return line;
}

int Run(const Options& options) {
  const std::vector<grpc::Slice> requests = ReadRequests(options.requests);
  if (requests.empty()) throw std::runtime_error("no requests in " + options.requests);

  const auto stubs = MakeStubs(options, "unary");
  const std::unique_ptr<Subscribers> subscribers = Subscribe(options);

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
  if (subscribers) subscribers->Stop();
  if (ran_out) {
    std::cerr << "ran out of requests before the window ended; write more\n";
    return 2;
  }

  std::sort(latencies_ms.begin(), latencies_ms.end());
  const std::string delivery =
      subscribers ? DeliveryReport(*subscribers, measure_from, stop) : std::string();
  std::printf("ops=%.1f p50_ms=%.2f p99_ms=%.2f calls=%zu errors=%llu %sfirst_error=%s\n",
              latencies_ms.size() / options.seconds, Percentile(latencies_ms, 0.5),
              Percentile(latencies_ms, 0.99), latencies_ms.size(),
              static_cast<unsigned long long>(errors), delivery.c_str(),
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

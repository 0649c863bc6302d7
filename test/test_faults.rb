# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("fault injection tests")

require "fluent/plugin/out_kinesis_streams_aggregated"
require "fluent/plugin/buffer/memory_chunk"
require_relative "support/local_kinesis"
require_relative "support/fault_proxy"

# The plugin through fluentd's test driver, with the project's fault-injecting proxy between it
# and a real local Kinesis: whatever the faults, every record arrives exactly once, including
# when fluentd retries a chunk that was partly delivered before.
class KinesisFaultsTest < Test::Unit::TestCase
  include Fluent::Test::Helpers

  PLUGIN = Fluent::Plugin::KinesisStreamsAggregatedRsOutput

  setup do
    Fluent::Test.setup
    @kinesis = LocalKinesis.shared
    @proxy = FaultProxy.new(@kinesis.endpoint)
  end

  teardown do
    @proxy&.stop
  end

  def config(stream, extra = "")
    <<~CONF
      stream_name #{stream}
      region us-east-1
      endpoint #{@proxy.endpoint}
      aws_key_id AKIDTEST
      aws_sec_key secretsecret
      #{extra}
    CONF
  end

  def driver(conf)
    Fluent::Test::Driver::Output.new(PLUGIN).configure(conf)
  end

  # Unique, recognisable records of about 150 bytes.
  def records(n)
    Array.new(n) { |i| { "seq" => i, "host" => "10.0.#{i % 7}.#{i % 250}", "path" => "/item/#{i}", "pad" => "x" * (i % 90) } }
  end

  def expected_data(records)
    records.map { |r| Oj.dump(r, mode: :compat) + "\n" }.sort
  end

  # The user records in the stream, as a KCL consumer sees them.
  def read_back(stream)
    got = @kinesis.read(stream)
    assert_equal 0, got["kcl_dropped_aggregates"]
    got["records"].map { |r| r["data"].force_encoding("UTF-8") }.sort
  end

  def undelivered_count(error)
    m = /\A(\d+) of (\d+) records of chunk \h+ not delivered/.match(error.message)
    assert_not_nil m, "DeliveryError message does not count undelivered records: #{error.message}"
    m[1].to_i
  end

  test "throttling, 500, 503 and a reset within one write: every record arrives exactly once" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    # Several PutRecords calls per chunk, and enough retries for the most faults one call can meet.
    d = driver(config(stream, "aggregation_max_size 2k\nbatch_request_max_count 10\nretries_on_batch_request 6"))
    @proxy.push(1, "partial_throttle 0.5")
    @proxy.push(1, "status 500")
    @proxy.push(1, "partial_internal_failure 0.5")
    @proxy.push(1, "status 503")
    @proxy.push(1, "reset")
    sent = records(1000)
    d.run(default_tag: "app.log") { sent.each { |r| d.feed(event_time, r) } }

    assert_equal expected_data(sent), read_back(stream)
    proxy = @proxy.stats
    assert_equal 0, proxy["pending"], "not every queued fault was met"
    assert_equal 5, proxy["faults_injected"]
    stats = d.instance.kinesis_statistics
    assert_equal 1000, stats["kinesis_delivered"]
    assert_equal 0, stats["kinesis_failed"]
    assert_equal 3, stats["kinesis_request_errors"], "500, 503 and the reset fail whole calls"
    assert_operator stats["kinesis_throttled_entries"], :>=, proxy["entries_throttled"]
    assert_operator proxy["entries_throttled"], :>, 0
    assert_operator stats["kinesis_retried_entries"], :>=, proxy["entries_throttled"] + proxy["entries_internal_failure"]
    assert_equal proxy["requests"]["PutRecords"], stats["kinesis_requests"]
    assert_empty d.error_events
    # A write that raised, even one fluentd would log and drop (unrecoverable), shows up here.
    assert_equal [], d.logs.grep(/error_class=|unrecoverable/)
    assert_equal 1, d.instance.write_count
    assert_equal 0, d.instance.num_errors
  end

  # Both ways of skipping what an earlier attempt handled: the extension's formatter, and the
  # plugin's loop over the chunk when fluentd's formatter is needed.
  data("fast path (json)", [false, "", ->(r) { Oj.dump(r, mode: :compat) + "\n" }])
  data("fluentd's formatter (ltsv)", [true, "<format>\n@type ltsv\n</format>", ->(r) { r.map { |k, v| "#{k}:#{v}" }.join("\t") + "\n" }])
  test "a chunk written again after a partial failure sends only what was not delivered" do |(slow_path, format, formatted)|
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    d = driver(config(stream, "partition_key host\naggregation_max_size 1k\nretries_on_batch_request 0\n#{format}"))
    d.instance_start
    assert_equal slow_path, d.logs.any? { |l| l.include?("formatted by fluentd") }
    sent = records(500)
    sent.each_with_index { |r, i| r.delete("host") if (i % 50) == 49 }
    keyless, keyed = sent.partition { |r| !r.key?("host") }
    chunk = chunk_of(sent.map { |r| [event_time, r] })
    @proxy.always("partial_throttle 0.5")

    error = assert_raise(PLUGIN::DeliveryError) { d.instance.write(chunk) }
    assert_not_kind_of(Fluent::UnrecoverableError, error)
    assert_match(/ProvisionedThroughputExceededException/, error.message)
    missing = undelivered_count(error)
    assert_operator missing, :>, 0
    assert_operator missing, :<, keyed.size
    first = d.instance.kinesis_statistics
    assert_operator first["kinesis_kinesis_records"], :>, 50, "too few Kinesis records for partial throttling to bite"
    assert_equal keyed.size - missing, read_back(stream).size, "the error miscounts what arrived"
    assert_equal keyless, d.error_events.map { |_tag, _time, record, _error| record }
    assert_equal keyless.size, first["kinesis_refused"]

    @proxy.clear
    d.instance.write(chunk)
    assert_equal keyed.map(&formatted).sort, read_back(stream), "records lost or sent twice"
    second = d.instance.kinesis_statistics
    assert_equal missing, second["kinesis_user_records"] - first["kinesis_user_records"],
                 "the retry sent records the first attempt had delivered"
    assert_equal keyed.size, second["kinesis_delivered"]
    assert_equal keyless.size, d.error_events.size, "the retry sent refused records to the error stream again"
    assert_equal keyless.size, second["kinesis_refused"]
  ensure
    d&.instance_shutdown
  end

  test "fluentd's own retry of a partly delivered chunk resends nothing" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    conf = config(stream, <<~EXTRA)
      aggregation_max_size 1k
      retries_on_batch_request 0
      <buffer tag>
        flush_thread_interval 0.1
        retry_wait 0.2
        retry_randomize false
      </buffer>
    EXTRA
    d = driver(conf)
    @proxy.push(1, "partial_throttle 0.5")
    sent = records(500)
    # force_flush_retry: under the test driver a failed flush raises unless told to retry.
    d.run(default_tag: "app.log", force_flush_retry: true) { sent.each { |r| d.feed(event_time, r) } }

    assert_equal expected_data(sent), read_back(stream)
    stats = d.instance.kinesis_statistics
    throttled = @proxy.stats["entries_throttled"]
    assert_operator throttled, :>, 0
    assert_equal 500, stats["kinesis_delivered"]
    assert_operator stats["kinesis_user_records"], :>, 500, "fluentd did not retry the chunk"
    assert_operator stats["kinesis_user_records"], :<, 1000, "the retry resent delivered records"
    assert_equal 2, stats["kinesis_requests"]
    assert_equal 2, d.instance.write_count
    assert_equal 1, d.instance.num_errors
    assert(d.logs.any? { |l| l.include?("failed to flush the buffer") && l.include?("DeliveryError") })
  end

  test "a persistent 500 fails the write at the delivery deadline with a retryable InternalFailure" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream, "delivery_timeout 1.5"))
    d.instance_start
    @proxy.always("status 500")
    chunk = chunk_of([[event_time, { "a" => 1 }], [event_time, { "a" => 2 }]])
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    error = assert_raise(PLUGIN::DeliveryError) { d.instance.write(chunk) }
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    assert_match(/\A2 of 2 records/, error.message)
    assert_match(/InternalFailure/, error.message)
    assert_match(/deadline/, error.message)
    assert_not_kind_of(Fluent::UnrecoverableError, error)
    assert_operator elapsed, :<, 5
    assert_operator d.instance.kinesis_statistics["kinesis_request_errors"], :>=, 2
    assert_empty read_back(stream)
  ensure
    d&.instance_shutdown
  end

  # Starts writing chunk in a thread and returns once its first PutRecords call reached the proxy.
  def write_in_thread(d, chunk)
    writer = Thread.new { d.instance.write(chunk) }
    writer.report_on_exception = false
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 10
    sleep 0.05 until @proxy.stats["requests"]["PutRecords"] || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    sleep 0.2
    assert_equal "sleep", writer.status, "the write should be waiting on the network"
    writer
  end

  test "Thread#kill ends the wait at once; the request in flight still completes and is not sent again" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream))
    d.instance_start
    @proxy.push(1, "delay_ms 3000")
    chunk = chunk_of([[event_time, { "a" => 1 }]])
    writer = write_in_thread(d, chunk)
    killed_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    writer.kill
    assert_not_nil writer.join(5), "the killed thread is still blocked in the extension"
    assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - killed_at, :<, 2

    # fluentd retries the chunk: the write first collects the interrupted delivery, whose
    # request landed, and sends nothing again.
    d.instance.write(chunk)
    assert_equal 1, @proxy.stats["requests"]["PutRecords"]
    assert_equal ["{\"a\":1}\n"], read_back(stream)
    assert_equal 1, d.instance.kinesis_statistics["kinesis_delivered"]
  ensure
    d&.instance_shutdown
  end

  test "Thread#raise propagates; a retry of the chunk resends only what the interrupted delivery did not deliver" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    # Two requests, one after the other: the first is in flight when the thread is interrupted,
    # the second is never started.
    d = driver(config(stream, "max_concurrent_requests 1
batch_request_max_count 1
aggregation_max_size 4k"))
    d.instance_start
    @proxy.push(1, "delay_ms 2000")
    events = records(60).map { |r| [event_time, r] }
    chunk = chunk_of(events)
    writer = write_in_thread(d, chunk)
    writer.raise(RuntimeError, "interrupted by the test")
    error = assert_raise(RuntimeError) { writer.join(5) }
    assert_equal "interrupted by the test", error.message
    # fluentd retries the same chunk: the write first collects the interrupted delivery.
    d.instance.write(chunk)
    assert_equal expected_data(events.map(&:last)), read_back(stream)
    assert_equal 60, d.instance.kinesis_statistics["kinesis_delivered"]
  ensure
    d&.instance_shutdown
  end

  test "Thread#wakeup and #run (fluentd's stop sequence) do not interrupt a write" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream))
    d.instance_start
    @proxy.push(1, "delay_ms 1500")
    chunk = chunk_of([[event_time, { "a" => 1 }]])
    writer = write_in_thread(d, chunk)
    5.times do
      writer.wakeup
      writer.run
      sleep 0.05
    end
    assert_not_nil writer.join(10)
    assert_nil writer.value
    assert_equal 1, @proxy.stats["requests"]["PutRecords"]
    assert_equal ["{\"a\":1}\n"], read_back(stream)
  ensure
    d&.instance_shutdown
  end

  test "the test driver ending while chunks are in flight delivers every record" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    d = driver(config(stream, "<buffer>\nflush_interval 1s\nchunk_limit_records 2000\n</buffer>"))
    @proxy.always("delay_ms 1500")
    events = records(14_000).map { |r| [event_time, r] }
    d.run(default_tag: "t", timeout: 120, wait_flush_completion: false) do
      d.feed(events)
      sleep 1.5 # a flush is in flight when the run ends
    end
    assert_equal expected_data(events.map(&:last)), read_back(stream)
    assert_empty d.logs.grep(/unexpected error|Cancelled/), d.logs.join
  ensure
    @proxy&.clear
  end

  test "delayed commit: consecutive chunks share full PutRecords calls, and each chunk is acknowledged once delivered" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    conf = config(stream, <<~EXTRA)
      aggregation_max_size 1k
      batch_request_max_count 50
      record_max_buffered_time 3
      <buffer tag>
        chunk_limit_records 200
        flush_thread_burst_interval 0.05
      </buffer>
    EXTRA
    d = driver(conf)
    sent = records(2_000)
    started = Fluent::Clock.now
    # The stop at the end of the run waits for the chunks being delivered (the driver's own wait
    # gives up after 10 s).
    d.run(default_tag: "app.log", timeout: 60, wait_flush_completion: false) { sent.each { |r| d.feed(event_time, r) } }

    assert_true d.instance.delayed_commit
    assert_equal expected_data(sent), read_back(stream)
    stats = d.instance.kinesis_statistics
    aggregates = stats["kinesis_kinesis_records"]
    # Each chunk makes about 30 aggregates of 1 KiB: alone, every chunk would end with a partial call.
    assert_operator aggregates, :>, 250
    assert_operator d.instance.write_count, :>=, 10
    assert_equal (aggregates / 50.0).ceil, stats["kinesis_requests"], "calls were not filled across chunks"
    assert_equal stats["kinesis_requests"], @proxy.stats["requests"]["PutRecords"]
    assert_operator Fluent::Clock.now - started, :<, 20
    assert_equal 0, d.instance.rollback_count
    assert_equal 2_000, stats["kinesis_delivered"]
  end

  test "delayed commit: a chunk not delivered goes back to fluentd, whose retry sends only the rest" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    conf = config(stream, <<~EXTRA)
      aggregation_max_size 1k
      retries_on_batch_request 0
      record_max_buffered_time 0.5
      <buffer tag>
        chunk_limit_records 250
        flush_thread_interval 0.1
        flush_thread_burst_interval 0.05
        retry_wait 0.2
        retry_randomize false
      </buffer>
    EXTRA
    d = driver(conf)
    @proxy.push(2, "partial_throttle 0.5")
    sent = records(1_000)
    d.run(default_tag: "app.log", timeout: 60, force_flush_retry: true) { sent.each { |r| d.feed(event_time, r) } }

    assert_equal expected_data(sent), read_back(stream)
    stats = d.instance.kinesis_statistics
    assert_operator @proxy.stats["entries_throttled"], :>, 0
    assert_equal 1_000, stats["kinesis_delivered"]
    assert_operator stats["kinesis_user_records"], :>, 1_000, "fluentd did not retry a chunk"
    assert_operator d.instance.rollback_count, :>, 0
    assert(d.logs.any? { |l| l.include?("failed to flush the buffer") && l.include?("DeliveryError") }, d.logs.join)
  end

  test "delayed commit: at most max_chunks_in_flight chunks are delivered at once" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    conf = config(stream, <<~EXTRA)
      max_chunks_in_flight 2
      <buffer tag>
        chunk_limit_records 100
        flush_thread_burst_interval 0.01
      </buffer>
    EXTRA
    d = driver(conf)
    @proxy.always("delay_ms 300")
    most = 0
    watcher = Thread.new { loop { most = [most, d.instance.send(:flights)].max; sleep 0.01 } }
    sent = records(1_000)
    d.run(default_tag: "app.log", timeout: 60) { sent.each { |r| d.feed(event_time, r) } }
    watcher.kill

    assert_equal expected_data(sent), read_back(stream)
    assert_equal 2, most
  ensure
    @proxy&.clear
  end

  private

  def chunk_of(events, tag: "t")
    chunk = Fluent::Plugin::Buffer::MemoryChunk.new(Fluent::Plugin::Buffer::Metadata.new(nil, tag, nil))
    chunk.append(events.map { |t, r| Fluent::MessagePackFactory.msgpack_packer.write([t, r]).to_s })
    chunk.commit
    # As fluentd's flush does, so the plugin can read the chunk's events.
    chunk.extend(Fluent::ChunkMessagePackEventStreamer)
    chunk
  end
end

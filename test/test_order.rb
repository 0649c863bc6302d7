# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("keep_order tests")

require "set"
require "fluent/plugin/out_kinesis_streams_aggregated"
require_relative "support/local_kinesis"
require_relative "support/fault_proxy"

# Per-key order, read the way a KCL consumer reads: every shard in sequence order, parents
# before their children, aggregates its shard-range check would drop left out. With keep_order,
# no record of a host may arrive after a later record of the same host, whatever the faults
# (entry failures, throttling, 5xx, fluentd retrying a chunk, a shard split); without it, the
# same check finds records out of order, which shows it can.
class KeepOrderTest < Test::Unit::TestCase
  include Fluent::Test::Helpers

  PLUGIN = Fluent::Plugin::KinesisStreamsAggregatedRsOutput
  HOSTS = 20

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
      partition_key host
      aggregation_max_size 4k
      batch_request_max_count 20
      #{extra}
    CONF
  end

  def driver(conf)
    Fluent::Test::Driver::Output.new(PLUGIN).configure(conf)
  end

  def events(count)
    Array.new(count) { |i| { "host" => "host-#{i % HOSTS}", "seq" => i, "pad" => "x" * (i % 60) } }
  end

  # {"delivered" => distinct events read, "duplicates" =>, "out_of_order" => events that arrived
  # after a later event of their host}.
  def order_report(stream)
    got = @kinesis.read(stream)
    last = {}
    seen = Set.new
    report = Hash.new(0)
    got["records"].select { |r| r["kcl_ok"] }.each do |r|
      event = JSON.parse(r["data"])
      seq = event["seq"]
      if seen.include?(seq)
        report["duplicates"] += 1
        next
      end
      seen << seq
      host = event["host"]
      if last[host] && seq < last[host]
        report["out_of_order"] += 1
      else
        last[host] = seq
      end
    end
    report["delivered"] = seen.size
    report
  end

  def faults
    @proxy.sometimes(0.05, "status 500")
    @proxy.sometimes(0.2, "partial_throttle 0.3")
    @proxy.sometimes(0.2, "partial_internal_failure 0.3")
  end

  def buffer(extra = "")
    "<buffer tag>\n  chunk_limit_records 2000\n  flush_thread_interval 0.1\n  retry_wait 0.2\n  retry_randomize false\n#{extra}</buffer>"
  end

  test "entry failures, throttling and 5xx: 0 out of order with keep_order; the same faults reorder without it" do
    sent = events(20_000)
    reports = [true, false].to_h do |keep|
      stream = @kinesis.create_stream(@kinesis.unique_stream("order"), 4)
      d = driver(config(stream, "keep_order #{keep}\nretries_on_batch_request 30\n#{buffer}"))
      @proxy.clear
      faults
      d.run(default_tag: "app.log", timeout: 300) { sent.each { |e| d.feed(event_time, e) } }
      stats = d.instance.kinesis_statistics
      assert_equal sent.size, stats["kinesis_delivered"]
      assert_operator stats["kinesis_retried_entries"], :>, 0, "the faults made no retry"
      [keep, order_report(stream)]
    end
    assert_equal sent.size, reports[true]["delivered"]
    assert_equal sent.size, reports[false]["delivered"]
    assert_equal 0, reports[true]["out_of_order"], reports.inspect
    assert_operator reports[false]["out_of_order"], :>, 0, "the check finds disorder when order is not kept: #{reports}"
  end

  test "a failed record holds its shard back: fluentd's retry of the chunk sends it first, then the rest" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("order"), 2)
    d = driver(config(stream, "keep_order true\nretries_on_batch_request 0\n#{buffer}"))
    # Without retries inside the write, a throttled record fails the chunk at once.
    @proxy.push(3, "partial_throttle 0.5")
    sent = events(4000)
    d.run(default_tag: "app.log", force_flush_retry: true, timeout: 120) { sent.each { |e| d.feed(event_time, e) } }

    report = order_report(stream)
    assert_equal sent.size, report["delivered"]
    assert_equal 0, report["out_of_order"], report.inspect
    assert_equal 0, report["duplicates"], report.inspect
    assert_operator d.instance.num_errors, :>=, 1, "fluentd did not retry a chunk"
    assert(d.logs.any? { |l| l.include?("HeldForOrder") }, "later records of a failed shard were held back")
    assert_equal sent.size, d.instance.kinesis_statistics["kinesis_delivered"]
  end

  test "a shard split during delivery: 0 out of order for a KCL consumer, every record delivered" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("order"), 2)
    d = driver(config(stream, "keep_order true\nretries_on_batch_request 30\n#{buffer("  flush_interval 0.2\n")}"))
    @proxy.sometimes(0.2, "partial_throttle 0.3")
    sent = events(12_000)
    d.run(default_tag: "app.log", timeout: 300) do
      sent.each_slice(2000).with_index do |slice, i|
        slice.each { |e| d.feed(event_time, e) }
        sleep 0.5
        @kinesis.split_shard(stream) if i == 2
      end
    end
    report = order_report(stream)
    assert_equal sent.size, report["delivered"]
    assert_equal 0, report["out_of_order"], report.inspect
    assert_operator d.instance.kinesis_statistics["kinesis_shard_map_refreshes"], :>=, 1, "the split was not noticed"
  end

  test "keep_order refuses what cannot keep order" do
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "keep_order true").sub("partition_key host", "")) }
    assert_match(/needs partition_key/, e.message)
    e = assert_raise(Fluent::ConfigError) do
      driver(config("s", "keep_order true\n<buffer tag>\n  flush_thread_count 2\n</buffer>"))
    end
    assert_match(/flush_thread_count 1/, e.message)
    assert_nothing_raised { driver(config("s", "keep_order true").sub("partition_key host", "fixed_partition_key k")) }
  end
end

# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("real fluentd end-to-end tests")

require "tmpdir"
require_relative "support/local_kinesis"
require_relative "support/fluentd_process"
require_relative "support/apache_log"

# A real fluentd process, as in production: in_tail of an Apache access log (format apache2)
# -> this plugin -> local Kinesis with several shards -> read back and deaggregated with the
# Python consumer library (aws_kinesis_agg, as in a Lambda consumer), every line once, and the
# KCL's shard-range check holding for every aggregate.
class FluentdEndToEndTest < Test::Unit::TestCase
  LINES = 5000
  # Many client addresses (so `partition_key host` reaches every shard), a path per line.
  LINE_FIELDS = { host: ApacheLog::SPREAD_HOST, path: ->(i) { "/shop/item/#{i}?ref=e2e" } }.freeze

  setup do
    @kinesis = LocalKinesis.shared
    @dir = Dir.mktmpdir("fluentd-e2e")
  end

  teardown do
    @fluentd&.stop(timeout: 30)
    FileUtils.rm_rf(@dir)
  end

  def start_fluentd(stream, extra)
    log = File.join(@dir, "access.log")
    File.write(log, "")
    config = FluentdProcess.pipeline_config(dir: @dir, log: log, stream: stream, endpoint: @kinesis.endpoint,
                                            plugin: extra, buffer: { flush_interval: "1s", flush_thread_count: 2 },
                                            monitor_port: FluentdProcess.free_port)
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false).start
    ApacheLog.append(log, LINES, flush_every: 500, **LINE_FIELDS)
  end

  # The plugin's counters as fluentd's monitor_agent serves them.
  def monitor_output
    @fluentd.monitor_plugin("kinesis_streams_aggregated")
  end

  def wait_for_records(stream, count)
    @kinesis.wait_for_records(stream, count) { "fluentd log:\n#{@fluentd.diagnostics}" }
  end

  def assert_every_line_once(got)
    paths = got["records"].map { |r| JSON.parse(r["data"])["path"] }
    assert_equal LINES, paths.size
    assert_equal Array.new(LINES) { |i| "/shop/item/#{i}?ref=e2e" }.sort, paths.sort
    assert_equal 0, got["kcl_dropped_aggregates"]
    assert got["records"].all? { |r| r["kcl_ok"] }
  end

  test "in_tail apache2 -> kinesis_streams_aggregated -> Kinesis, random keys" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("e2e"), 2)
    start_fluentd(stream, "")
    got = wait_for_records(stream, LINES)
    assert_every_line_once(got)
    assert got["records"].all? { |r| r["aggregated"] }
    assert_operator got["kinesis_records"], :<, LINES / 10
    stats = monitor_output
    assert_equal LINES, stats["kinesis_delivered"]
    assert_equal 0, stats["kinesis_failed"]
    assert_operator stats["kinesis_requests"], :>=, 1
    assert_operator stats["kinesis_aggregates"], :>=, 1
    log = @fluentd.log_text
    assert_match(/kinesis_streams_aggregated is fluent-plugin-kinesis-rs/, log)
    assert_match(/is reachable with 2 open shard/, log)
  end

  test "in_tail apache2 -> kinesis_streams_aggregated with partition_key host, 4 shards" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("e2e-pk"), 4)
    start_fluentd(stream, "partition_key host\naggregation_max_size 64k")
    got = wait_for_records(stream, LINES)
    assert_every_line_once(got)
    got["records"].each { |r| assert_equal JSON.parse(r["data"])["host"], r["partition_key"] }
    assert_equal 4, got["records"].map { |r| r["shard"] }.uniq.size
  end
end

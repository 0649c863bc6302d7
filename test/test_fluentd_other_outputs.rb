# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("real fluentd kinesis_streams and kinesis_firehose tests")

require "tmpdir"
require_relative "support/local_kinesis"
require_relative "support/local_firehose"
require_relative "support/fault_proxy"
require_relative "support/fluentd_process"
require_relative "support/apache_log"

# The other two outputs in real fluentd processes tailing an Apache access log:
# - kinesis_streams -> kinesalite, read back with the consumer library: one record per line,
#   each with its client address as partition key;
# - kinesis_firehose -> moto's Firehose -> S3 (one object per PutRecordBatch call), with the
#   fault proxy throttling entries in between: the S3 objects hold the log's lines, byte for
#   byte, one Firehose record each and packed; and a SIGTERM with everything still buffered
#   delivers it all before fluentd exits.
class FluentdOtherOutputsTest < Test::Unit::TestCase
  LINES = 5000
  LINE_FIELDS = { host: ApacheLog::SPREAD_HOST, path: ->(i) { "/shop/item/#{i}?ref=e2e" } }.freeze

  setup do
    @dir = Dir.mktmpdir("fluentd-outputs")
    @log = File.join(@dir, "access.log")
    File.write(@log, "")
  end

  teardown do
    @fluentd&.stop(timeout: 30)
    @proxy&.stop
    FileUtils.rm_rf(@dir)
  end

  def start_fluentd(**config)
    config = FluentdProcess.pipeline_config(dir: @dir, log: @log, monitor_port: FluentdProcess.free_port, **config)
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false).start
  end

  def written_lines
    File.binread(@log).lines
  end

  test "in_tail apache2 -> kinesis_streams with partition_key host, 4 shards: one record per line, its key kept" do
    kinesis = LocalKinesis.shared
    stream = kinesis.create_stream(kinesis.unique_stream("e2e-streams"), 4)
    start_fluentd(output: "kinesis_streams", stream: stream, endpoint: kinesis.endpoint, plugin: "partition_key host",
                  buffer: { flush_interval: "1s", flush_thread_count: 2 })
    ApacheLog.append(@log, LINES, flush_every: 500, **LINE_FIELDS)
    got = kinesis.wait_for_records(stream, LINES) { "fluentd log:\n#{@fluentd.diagnostics}" }
    assert_equal LINES, got["kinesis_records"]
    assert got["records"].none? { |r| r["aggregated"] }
    paths = got["records"].map { |r| JSON.parse(r["data"])["path"] }
    assert_equal Array.new(LINES) { |i| "/shop/item/#{i}?ref=e2e" }.sort, paths.sort
    got["records"].each { |r| assert_equal JSON.parse(r["data"])["host"], r["partition_key"] }
    assert_equal 4, got["records"].map { |r| r["shard"] }.uniq.size
    stats = @fluentd.monitor_plugin("kinesis_streams")
    assert_equal LINES, stats["kinesis_delivered"]
    assert_equal LINES, stats["kinesis_kinesis_records"]
    assert_match(/kinesis_streams is fluent-plugin-kinesis-rs/, @fluentd.log_text)
    assert_match(/stream "#{stream}" is reachable with 4 open shard/, @fluentd.log_text)
  end

  def start_firehose(pack:, flush_interval: "1s")
    firehose = LocalFirehose.new(MotoServer.shared)
    name = firehose.create(firehose.unique_name("e2e"))
    @proxy = FaultProxy.new(firehose.endpoint, operation: "PutRecordBatch")
    @proxy.push(2, "partial_throttle 1.0")
    @proxy.always("partial_throttle 0.3")
    @proxy.sometimes(0.1, "status 500")
    start_fluentd(output: "kinesis_firehose", stream: name, endpoint: @proxy.endpoint, parse: "none",
                  region: "us-east-1", plugin: ["data_key message", "pack_records #{pack}", "retries_on_batch_request 30"],
                  buffer: { flush_interval: flush_interval, flush_thread_count: 2 })
    [firehose, name]
  rescue MotoServer::NotInstalled => e
    omit e.message
  end

  data(unpacked: false, packed: true)
  test "in_tail (raw lines) -> kinesis_firehose -> S3, entries throttled: every line once, byte for byte" do |pack|
    firehose, name = start_firehose(pack: pack)
    ApacheLog.append(@log, LINES, flush_every: 500, **LINE_FIELDS)
    got = firehose.wait_for_lines(name, LINES, timeout: 90)
    assert_equal written_lines.sort, got.sort
    stats = @fluentd.monitor_plugin("kinesis_firehose")
    assert_equal LINES, stats["firehose_delivered"]
    assert_operator stats["firehose_throttled_entries"], :>, 0
    if pack
      assert_operator stats["firehose_records"], :<, LINES / 100
      assert_operator stats["firehose_billed_units"], :<, LINES / 20
    else
      assert_equal LINES, stats["firehose_records"]
      assert_equal LINES, stats["firehose_billed_units"]
    end
    assert_match(/delivery stream "#{name}" is ACTIVE \(DirectPut\)/, @fluentd.log_text)
  end

  test "SIGTERM with every line still buffered and entries throttled: the stop delivers them all to S3" do
    firehose, name = start_firehose(pack: false, flush_interval: "300s")
    ApacheLog.append(@log, LINES, flush_every: 500, **LINE_FIELDS)
    @fluentd.wait_until(60, "every line buffered") do
      @fluentd.monitor_plugin("kinesis_firehose")["emit_records"].to_i >= LINES
    rescue SystemCallError
      false # monitor_agent not listening yet
    end
    assert_empty firehose.objects(name), "nothing was flushed before the stop"
    stop = @fluentd.stop(timeout: 120)
    assert stop.success?, "fluentd exited with #{stop.inspect}"
    assert_equal written_lines.sort, firehose.lines(name).sort
    assert_match(/stopping: delivering the records of/, @fluentd.log_text)
  end
end

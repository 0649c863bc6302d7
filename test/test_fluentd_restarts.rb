# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("real fluentd restart and crash tests")

require_relative "support/restart_scenario"

# What an operator does most: `systemctl restart td-agent` (SIGTERM to the supervisor), Ctrl-C
# (SIGINT), and what the OOM killer does (SIGKILL), each while records are being delivered,
# on shards that throttle, with entry failures and 5xx. A real fluentd 1.18 (supervisor and
# worker) tails an Apache log with `partition_key host`; after the stop it is started again to
# read the rest of the log, and every line is counted in the stream as a Python Lambda
# consumer (aws_kinesis_agg) reads it.
class FluentdRestartTest < Test::Unit::TestCase
  LINES = Integer(ENV.fetch("RESTART_TEST_LINES", "12000"))
  # PutRecords calls that take 1.5 s (a slow network, or a throttled stream's retries): the stops
  # land while a chunk's delivery is under way.
  SLOW_CALLS = "always delay_ms 1500"

  teardown do
    @scenario&.cleanup
  end

  def scenario(**options)
    @scenario = RestartScenario.new(kinesis: LocalKinesis.shared, lines: LINES, **options)
  end

  def assert_complete(result, duplicates: 0)
    log = @scenario.log_text
    assert_equal 0, result.lost, "#{result.lost} of #{result.written} lines lost; stops #{result.stops}\n#{log[-6000..]}"
    assert_equal duplicates, result.duplicates, "duplicates; stops #{result.stops}" if duplicates
    assert_equal 0, result.kcl_dropped
    assert_not_match(/Cancelled|unexpected error/, log)
  end

  test "SIGTERM mid-stream, memory buffer: the stop delivers everything buffered" do
    s = scenario(name: "term-memory", faults: [SLOW_CALLS]).start
    s.signal_mid_stream(:TERM)
    result = s.finish
    assert_complete(result)
    assert_equal [false], result.stops.first(1).map { |st| st[:escalated] }
  end

  test "SIGTERM mid-stream, file buffer, then restart: nothing lost, nothing sent twice" do
    s = scenario(name: "term-file", buffer: { type: "file" }, faults: [SLOW_CALLS]).start
    s.signal_mid_stream(:TERM)
    assert_complete(s.finish)
    assert_empty s.progress_files, "progress files are removed with their chunks"
  end

  test "SIGTERM mid-stream, memory buffer, shards throttled to 256 KiB/s: the stop waits for the deliveries" do
    s = scenario(name: "term-throttled", faults: ["shard_limit 262144 1000"]).start
    s.signal_mid_stream(:TERM)
    result = s.finish
    assert_complete(result)
    assert_match(/stopping: delivering the records of the \d+ chunks being written and the \d+ buffered/, s.log_text)
  end

  test "SIGINT after the last line was read, throttled shards, 5 % entry failures, 2 % HTTP 500" do
    # Shards at a quarter of Kinesis's 1 MiB/s so that this smaller log still takes seconds to
    # deliver after the last line was read.
    s = scenario(name: "int-faults", faults: ["shard_limit 262144 1000", "sometimes 0.02 status 500",
                                              "always partial_internal_failure 0.05"]).start
    s.signal_after_last_read(:INT)
    assert_complete(s.finish)
  end

  test "3 x SIGKILL while requests are in flight, file buffer: a restart resends at most what was in flight" do
    # 64 KiB aggregates: many entries per call, a few of them throttled each time.
    s = scenario(name: "kill-file", buffer: { type: "file" }, plugin: ["partition_key host", "aggregation_max_size 64k"],
                 faults: ["shard_limit 262144 1000", SLOW_CALLS]).start
    s.kill_during_delivery(times: 3)
    result = s.finish
    assert_complete(result, duplicates: nil)
    in_flight = result.kills.sum { |k| k[:in_flight_user_records].to_i }
    # A response being read when the kill lands is not in flight at the proxy any more but not
    # yet on disk: a few records of slack per kill.
    assert_operator result.duplicates, :<=, in_flight + 50 * result.kills.size,
                    "duplicates #{result.duplicates} vs in flight at the kills #{result.kills}"
    assert_match(/records were delivered before the restart; sending the rest/, s.log_text)
    assert_empty s.progress_files, "progress files are removed with their chunks"
  end

  test "kinesis_streams, 2 x SIGKILL while requests are in flight, file buffer: a restart resends at most what was in flight" do
    s = scenario(name: "kill-streams", output: "kinesis_streams", buffer: { type: "file" },
                 faults: ["shard_limit 262144 1000", SLOW_CALLS]).start
    s.kill_during_delivery(times: 2)
    result = s.finish
    assert_complete(result, duplicates: nil)
    assert_equal result.received + result.duplicates, result.kinesis_records, "one Kinesis record per line"
    in_flight = result.kills.sum { |k| k[:in_flight_user_records].to_i }
    assert_operator result.duplicates, :<=, in_flight + 50 * result.kills.size,
                    "duplicates #{result.duplicates} vs in flight at the kills #{result.kills}"
    assert_empty s.progress_files, "progress files are removed with their chunks"
  end
end

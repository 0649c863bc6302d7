# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("real fluentd multi-worker tests")

require_relative "support/multi_worker_scenario"

# `workers 4` fed by a real forwarder (a second fluentd with out_forward), one file buffer per
# worker, `partition_key host`, and a SIGTERM of the whole aggregator mid-stream.
class FluentdWorkersTest < Test::Unit::TestCase
  LINES = Integer(ENV.fetch("WORKERS_TEST_LINES", "40000"))

  teardown do
    @scenario&.cleanup
  end

  test "4 workers behind in_forward: every event once, KCL-safe, through a SIGTERM mid-stream" do
    # PutRecords calls take 1.5 s (a slow network): the SIGTERM lands while deliveries are under way.
    @scenario = MultiWorkerScenario.new(kinesis: LocalKinesis.shared, lines: LINES, workers: 4, faults: ["always delay_ms 1500"])
    result = @scenario.run(sigterm_at: 0.5)
    log = @scenario.log_text
    assert_equal 0, result.lost, "lost; stops #{result.stops}\n#{log[-6000..]}"
    assert_equal 0, result.duplicates
    assert_equal 0, result.kcl_dropped
    assert_equal [false, false], result.stops.map { |s| s[:escalated] }
    (0...4).each { |w| assert_match(/fluentd worker is now running worker=#{w}/, log) }
    assert_not_match(/Cancelled|unexpected error/, log)
  end
end

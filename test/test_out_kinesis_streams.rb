# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("kinesis_streams tests")

require "fluent/plugin/out_kinesis_streams"
require_relative "support/local_kinesis"
require_relative "support/fault_proxy"

# `@type kinesis_streams` through fluentd's test driver against kinesalite (behind the project's
# fault proxy), read back with the consumer library: one Kinesis record per event, not
# aggregated, with the event's partition key (or a random one), byte for byte; whatever the
# faults, every event once.
class KinesisStreamsOutputTest < Test::Unit::TestCase
  include Fluent::Test::Helpers

  PLUGIN = Fluent::Plugin::KinesisStreamsRsOutput

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
      retries_on_batch_request 30
      #{extra}
    CONF
  end

  def driver(conf)
    Fluent::Test::Driver::Output.new(PLUGIN).configure(conf)
  end

  def events(count)
    Array.new(count) { |i| { "seq" => i, "host" => "10.1.#{i % 13}.#{i % 200}", "path" => "/p/#{i}", "pad" => "ü" * (i % 70) } }
  end

  def run_driver(d, events)
    d.run(default_tag: "app.log", timeout: 120) { events.each { |e| d.feed(event_time, e) } }
  end

  test "partition_key: one Kinesis record per event with the event's key, byte for byte, through faults" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("streams"), 4)
    @proxy.always("partial_throttle 0.2")
    @proxy.sometimes(0.1, "status 500")
    @proxy.sometimes(0.1, "partial_internal_failure 0.3")
    sent = events(3000)
    d = driver(config(stream, "partition_key host"))
    run_driver(d, sent)
    got = @kinesis.read(stream)
    assert_equal 3000, got["kinesis_records"]
    assert got["records"].none? { |r| r["aggregated"] }
    by_seq = got["records"].to_h { |r| [JSON.parse(r["data"])["seq"], r] }
    assert_equal 3000, by_seq.size, "every event once"
    sent.each do |e|
      r = by_seq.fetch(e["seq"])
      assert_equal "#{Oj.dump(e, mode: :compat)}\n".b, r["data"].b
      assert_equal e["host"], r["partition_key"]
    end
    assert_equal 4, got["records"].map { |r| r["shard"] }.uniq.size
    stats = d.instance.kinesis_statistics
    assert_equal 3000, stats["kinesis_delivered"]
    assert_equal 3000, stats["kinesis_kinesis_records"]
    assert_operator stats["kinesis_throttled_entries"], :>, 0
    assert_operator stats["kinesis_requests"], :>=, 6
    refute stats.key?("kinesis_aggregates"), "kinesis_streams shows no aggregate counters"
  end

  test "without partition_key: a random 32-hex-digit key per record, spread over the shards" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("streams"), 4)
    d = driver(config(stream))
    run_driver(d, events(800))
    got = @kinesis.read(stream)
    keys = got["records"].map { |r| r["partition_key"] }
    assert_equal 800, keys.uniq.size
    assert keys.all? { |k| k.match?(/\A\h{32}\z/) }
    assert_equal 4, got["records"].map { |r| r["shard"] }.uniq.size
  end

  test "explicit_hash_key decides the shard; events without their key field go to the error stream" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("streams"), 2)
    d = driver(config(stream, "partition_key host\nexplicit_hash_key ehk"))
    top = (2**128 - 1).to_s
    ok = Array.new(20) { |i| { "seq" => i, "host" => "h#{i}", "ehk" => top } }
    bad = [{ "seq" => 100, "ehk" => top }, { "seq" => 101, "host" => "h", "ehk" => "not a number" }]
    run_driver(d, ok + bad)
    got = @kinesis.read(stream)
    assert_equal 20, got["records"].size
    assert_equal ["shardId-000000000001"], got["records"].map { |r| r["shard"] }.uniq
    reasons = d.error_events.map { |e| [e[2]["seq"], e[3].message] }.sort
    assert_equal [100, 101], reasons.map(&:first)
    assert_match(/partition_key field 'host'/, reasons[0][1])
    assert_match(/explicit_hash_key/, reasons[1][1])
  end
end

# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("out_kinesis_streams_aggregated driver tests")

require "zlib"
require "fluent/plugin/out_kinesis_streams_aggregated"
require "fluent/plugin/buffer/memory_chunk"
require_relative "support/local_kinesis"

# The plugin through fluentd's own test driver, against a real local Kinesis; what arrived is
# read back and deaggregated with the Python consumer library.
class KinesisStreamsAggregatedOutputTest < Test::Unit::TestCase
  include Fluent::Test::Helpers

  PLUGIN = Fluent::Plugin::KinesisStreamsAggregatedRsOutput

  setup do
    Fluent::Test.setup
    @kinesis = LocalKinesis.shared
  end

  def config(stream, extra = "")
    <<~CONF
      stream_name #{stream}
      region us-east-1
      endpoint #{@kinesis.endpoint}
      aws_key_id AKIDTEST
      aws_sec_key secretsecret
      #{extra}
    CONF
  end

  def driver(conf)
    Fluent::Test::Driver::Output.new(PLUGIN).configure(conf)
  end

  def access_log(i)
    { "host" => "10.0.#{i % 7}.#{i % 250}", "method" => "GET", "path" => "/item/#{i}", "code" => 200,
      "size" => 1000 + i, "agent" => "Mozilla/5.0 \"quoted\" ünïcode" }
  end

  def run_driver(d, records, tag: "apache.access", time: event_time("2026-11-25 10:00:00.123456789 UTC"))
    d.run(default_tag: tag) { records.each { |r| d.feed(time, r) } }
  end

  test "json records arrive once, byte-for-byte as fluentd formats them, spread over shards" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 2)
    d = driver(config(stream))
    records = Array.new(2000) { |i| access_log(i) }
    run_driver(d, records)
    got = @kinesis.read(stream)
    expected = records.map { |r| Oj.dump(r, mode: :compat) + "\n" }
    assert_equal expected.sort, got["records"].map { |r| r["data"].force_encoding("UTF-8") }.sort
    assert_equal 0, got["kcl_dropped_aggregates"]
    assert_operator got["kinesis_records"], :<, 10, "records were not aggregated"
    stats = d.instance.kinesis_statistics
    assert_equal 2000, stats["kinesis_delivered"]
    assert_operator stats["kinesis_requests"], :>=, 1
    assert_equal 0, stats["kinesis_failed"]
    assert_empty d.error_events
  end

  test "partition_key keeps each record's key and aggregates per shard (KCL range check holds)" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 4)
    d = driver(config(stream, "partition_key host\naggregation_max_size 8k"))
    records = Array.new(3000) { |i| access_log(i) }
    records << { "no_host" => true }
    run_driver(d, records)
    got = @kinesis.read(stream)
    assert_equal 3000, got["records"].size
    assert_equal 0, got["kcl_dropped_aggregates"]
    got["records"].each do |r|
      record = JSON.parse(r["data"])
      assert_equal record["host"], r["partition_key"]
    end
    assert_operator got["records"].map { |r| r["shard"] }.uniq.size, :>, 1
    assert_equal 1, d.error_events.size
    tag, _time, record, error = d.error_events.first
    assert_equal ["apache.access", { "no_host" => true }], [tag, record]
    assert_match(/partition_key field 'host' is missing/, error.message)
  end

  test "data_key, chomp, compression and inject behave like fluent-plugin-kinesis" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream, "data_key log\ncompression zlib"))
    run_driver(d, [{ "log" => "line one\n" }, { "log" => "line two" }, { "other" => 1 }])
    got = @kinesis.read(stream)["records"].map { |r| Zlib::Inflate.inflate(r["data"]) }
    assert_equal ["line one\n", "line two"], got.sort
    assert_match(/Key 'log' doesn't exist/, d.error_events.first[3].message)

    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    conf = config(stream, <<~EXTRA)
      chomp_record true
      <inject>
        tag_key tag
        time_key time
        timezone +09:00
      </inject>
    EXTRA
    d = driver(conf)
    run_driver(d, [{ "message" => "hello" }], tag: "app.log")
    data = @kinesis.read(stream)["records"].first["data"]
    assert_equal({ "message" => "hello", "tag" => "app.log", "time" => "2026-11-25T19:00:00.123456789+0900" }, JSON.parse(data))
    assert_not_match(/\n\z/, data)
  end

  test "formats the fast path does not know are formatted by fluentd" do
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream, "<format>\n@type ltsv\n</format>"))
    run_driver(d, [{ "a" => "1", "b" => "x y" }])
    assert_equal "a:1\tb:x y\n", @kinesis.read(stream)["records"].first["data"]

    # A value the fast path cannot render exactly (a float as to_s) falls back per chunk.
    stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
    d = driver(config(stream, "data_key v"))
    run_driver(d, [{ "v" => 1.5 }, { "v" => "s" }])
    assert_equal ["1.5", "s"], @kinesis.read(stream)["records"].map { |r| r["data"] }.sort
  end

  test "a missing stream fails the write with a retryable error that says what to check" do
    d = driver(config("no-such-stream-#{Process.pid}", "retries_on_batch_request 1"))
    d.instance_start
    chunk = chunk_of([[event_time, { "a" => 1 }]])
    error = assert_raise(PLUGIN::DeliveryError) { d.instance.write(chunk) }
    assert_match(/ResourceNotFoundException/, error.message)
    assert_match(/stream_name/, error.message)
    assert_not_kind_of(Fluent::UnrecoverableError, error)
  ensure
    d&.instance_shutdown
  end

  test "configuration errors say what to change" do
    assert_raise(Fluent::ConfigError) { driver(config("s", "compression bzip2")) }
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "fixed_partition_key a\npartition_key host")) }
    assert_match(/exclude each other/, e.message)
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "ssl_verify_peer false")) }
    assert_match(/ssl_ca_file/, e.message)
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "metrics_level summary\nmetrics_namespace AWS/Kinesis")) }
    assert_match(%r{AWS/ are reserved}, e.message)
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "metrics_namespace caf\u00e9")) }
    assert_match(/printable ASCII/, e.message)
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "metrics_upload_interval 0.5")) }
    assert_match(/at least 1 second/, e.message)
    assert_raise(Fluent::ConfigError) { driver(config("s", "metrics_level verbose")) }
    d = driver(config("s", "batch_request_max_count 100000\nbatch_request_max_size 1m"))
    assert_equal 500, d.instance.batch_request_max_count
    e = assert_raise(Fluent::ConfigError) { driver(config("s", "record_max_buffered_time soon")) }
    assert_match(/auto or a time/, e.message)
  end

  test "record_max_buffered_time: auto follows the chunks' interval, a time is fixed, 0 writes synchronously" do
    options = ->(extra) { driver(config("s", extra)).instance.instance_variable_get(:@producer_options).values_at("linger", "linger_max") }
    assert_equal [1.0, 10.0], options.("")
    assert_equal [1.0, 10.0], options.("record_max_buffered_time auto")
    assert_equal [2.5, 0.0], options.("record_max_buffered_time 2.5")
    assert_equal [60.0, 0.0], options.("record_max_buffered_time 1m")
    assert_equal [0.0, 0.0], options.("record_max_buffered_time 0")
    assert_false driver(config("s", "record_max_buffered_time 0")).instance.prefer_delayed_commit
  end

  test "delayed commit defaults: three chunks in flight per flush thread, no 1 s pause between queued chunks" do
    plugin = driver(config("s", "")).instance
    assert_equal 3, plugin.instance_variable_get(:@max_chunks_in_flight)
    assert_equal 0.05, plugin.buffer_config.flush_thread_burst_interval
    plugin = driver(config("s", "<buffer>\n flush_thread_count 4\n flush_thread_burst_interval 2\n</buffer>")).instance
    assert_equal 6, plugin.instance_variable_get(:@max_chunks_in_flight)
    assert_equal 2.0, plugin.buffer_config.flush_thread_burst_interval, "a setting of the user's wins"
    plugin = driver(config("s", "max_chunks_in_flight 1")).instance
    assert_equal 1, plugin.instance_variable_get(:@max_chunks_in_flight)
  end

  private

  def chunk_of(events, tag: "t")
    chunk = Fluent::Plugin::Buffer::MemoryChunk.new(Fluent::Plugin::Buffer::Metadata.new(nil, tag, nil))
    chunk.append(events.map { |t, r| Fluent::MessagePackFactory.msgpack_packer.write([t, r]).to_s })
    chunk.commit
    chunk
  end

  sub_test_case "invalid UTF-8 (in_tail passes such bytes through)" do
    # A line from in_tail with a Latin-1 byte and a truncated UTF-8 sequence.
    def bad_records
      [{ "message" => "caf\xE9 ok".b.force_encoding("UTF-8"), "host" => "h1" },
       { "message" => "fine ü", "host" => "h2" },
       { "message" => "cut \xF0\x9F\x98".b.force_encoding("UTF-8"), "host" => "h3" }]
    end

    def scrubbed_json(record)
      Oj.dump(FluentPluginKinesisRs::Scrub.record(record).first, mode: :compat) + "\n"
    end

    data("Rust formatter" => "", "fluentd's formatter (CRLF newlines)" => "<format>\n@type json\nnewline crlf\n</format>")
    test "valid JSON is sent, invalid sequences replaced by U+FFFD, counted" do |format|
      stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
      d = driver(config(stream, "partition_key host\n#{format}"))
      run_driver(d, bad_records)
      got = @kinesis.read(stream)["records"].map { |r| r["data"] }
      parsed = TestHelper.python_json(<<~PY, got.map { |g| g.unpack1("H*") })
        import json, sys
        print(json.dumps([json.loads(bytes.fromhex(h).decode("utf-8")) for h in json.load(sys.stdin)]))
      PY
      assert_equal ["caf\uFFFD ok", "cut \uFFFD", "fine ü"], parsed.map { |r| r["message"] }.sort
      expected = bad_records.map { |r| scrubbed_json(r) }
      expected = expected.map { |e| e.sub(/\n\z/, "\r\n") } unless format.empty?
      assert_equal expected.sort, got.map { |g| g.force_encoding("UTF-8") }.sort
      assert_equal 2, d.instance.kinesis_statistics["kinesis_scrubbed"]
      assert_equal 3, d.instance.kinesis_statistics["kinesis_delivered"]
    end

    data("Rust formatter" => "", "fluentd's formatter (CRLF newlines)" => "<format>\n@type json\nnewline crlf\n</format>")
    test "invalid_utf8 error: such records go to the error stream with the reason, the others are sent" do |format|
      stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
      d = driver(config(stream, "invalid_utf8 error\n#{format}"))
      run_driver(d, bad_records)
      assert_equal 1, @kinesis.read(stream)["records"].size
      errors = d.error_events
      assert_equal 2, errors.size
      errors.each { |_tag, _time, _record, error| assert_match(/invalid UTF-8 in field "message"/, error.message) }
    end

    test "a partition key that is not UTF-8 refuses its record, not the chunk (fluentd's formatter)" do
      stream = @kinesis.create_stream(@kinesis.unique_stream, 1)
      d = driver(config(stream, "partition_key host\n<format>\n@type json\nnewline crlf\n</format>"))
      records = [{ "host" => "\xFF".b.force_encoding("UTF-8"), "m" => 1 }, { "host" => "ok", "m" => 2 }]
      run_driver(d, records)
      assert_equal 1, @kinesis.read(stream)["records"].size
      assert_equal 1, d.error_events.size
    end
  end
end

# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("kinesis_firehose tests")

require "zlib"
require "fluent/plugin/out_kinesis_firehose"
require_relative "support/local_firehose"
require_relative "support/fault_proxy"

# `@type kinesis_firehose` through fluentd's test driver against moto's Firehose, which writes
# each PutRecordBatch call's records, concatenated, to S3 as one object: the objects are read back
# and compared with the lines sent, byte for byte, packed and unpacked. Partial failures,
# throttling and 5xx come from the project's fault proxy in front of moto; whatever the faults,
# every line reaches S3 exactly once (only the failed entries of a call are resent).
class KinesisFirehoseOutputTest < Test::Unit::TestCase
  include Fluent::Test::Helpers

  PLUGIN = Fluent::Plugin::KinesisFirehoseRsOutput

  setup do
    Fluent::Test.setup
    begin
      @firehose = LocalFirehose.new(MotoServer.shared)
    rescue MotoServer::NotInstalled => e
      omit e.message
    end
    @proxy = FaultProxy.new(@firehose.endpoint, operation: "PutRecordBatch")
  end

  teardown do
    @proxy&.stop
  end

  def config(name, extra = "")
    <<~CONF
      delivery_stream_name #{name}
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

  # Recognisable events of about 100 to 300 bytes as JSON, with characters JSON escapes.
  def events(count)
    Array.new(count) do |i|
      { "seq" => i, "host" => "10.0.#{i % 7}.#{i % 250}", "path" => "/item/#{i}?q=\"#{i}\"", "pad" => "é" * (i % 90) }
    end
  end

  def lines_of(events)
    events.map { |e| "#{Oj.dump(e, mode: :compat)}\n".b }
  end

  def run_driver(d, events, tag: "app.log", **opts)
    d.run(default_tag: tag, timeout: 120, **opts) { events.each { |e| d.feed(event_time, e) } }
  end

  test "one Firehose record per event: every line in S3 once, byte for byte; calls within 500 records and 4 MiB" do
    name = @firehose.create(@firehose.unique_name)
    sent = events(2600)
    d = driver(config(name))
    run_driver(d, sent)
    objects = @firehose.objects(name)
    assert_equal lines_of(sent).sort, objects.flat_map(&:lines).sort
    stats = d.instance.kinesis_statistics
    assert_equal 2600, stats["firehose_delivered"]
    assert_equal 2600, stats["firehose_records"]
    assert_equal 0, stats["firehose_packed_records"]
    assert_equal objects.size, stats["firehose_requests"]
    assert objects.all? { |o| o.lines.size <= 500 && o.bytesize <= 4 * 1024 * 1024 }
    assert_equal 2600, stats["firehose_billed_units"], "each record under 5 KB is billed as one unit"
    assert_equal lines_of(sent).sum(&:bytesize), stats["firehose_bytes_delivered"]
  end

  test "pack_records: lines share records of at most 1,024,000 bytes, every line once, far fewer billed units" do
    name = @firehose.create(@firehose.unique_name)
    sent = events(20_000)
    d = driver(config(name, "pack_records true\n<buffer tag>\n  chunk_limit_size 16m\n</buffer>"))
    run_driver(d, sent)
    objects = @firehose.objects(name)
    expected = lines_of(sent)
    assert_equal expected.sort, objects.flat_map(&:lines).sort
    assert objects.all? { |o| o.end_with?("\n") }
    stats = d.instance.kinesis_statistics
    bytes = expected.sum(&:bytesize)
    assert_equal 20_000, stats["firehose_delivered"]
    assert_operator stats["firehose_records"], :>=, (bytes / 1_024_000.0).ceil
    assert_operator stats["firehose_records"], :<=, (bytes / 1_024_000.0).ceil + d.instance.num_errors + 3
    assert_equal stats["firehose_records"], stats["firehose_packed_records"]
    assert_operator stats["firehose_billed_units"], :<=, (bytes / 5120.0).ceil + stats["firehose_records"]
    assert_operator stats["firehose_billed_units"] * 20, :<, 20_000, "packing bills far fewer 5 KB units"
  end

  test "partial failures, throttling, 5xx and resets: only the failed entries are resent, every line once" do
    [false, true].each do |pack|
      name = @firehose.create(@firehose.unique_name)
      @proxy.clear
      # Packed, the lines make few (full) calls: one certain whole-call failure besides the random ones.
      @proxy.push(1, "status 500")
      @proxy.sometimes(0.1, "status 500")
      @proxy.sometimes(0.05, "throttle_request")
      @proxy.sometimes(0.05, "reset")
      @proxy.always("partial_throttle 0.3")
      sent = events(pack ? 12_000 : 3000)
      extra = "pack_records #{pack}\nbatch_request_max_count 100\nmax_record_size 64k\nbatch_request_max_size 256k"
      d = driver(config(name, "#{extra}\n<buffer tag>\n  chunk_limit_records 1000\n</buffer>"))
      run_driver(d, sent)
      assert_equal lines_of(sent).sort, @firehose.objects(name).flat_map(&:lines).sort, "pack_records #{pack}"
      stats = d.instance.kinesis_statistics
      assert_operator stats["firehose_throttled_entries"], :>, 0
      assert_operator stats["firehose_retried_entries"], :>, 0
      assert_operator stats["firehose_request_errors"], :>, 0
      assert_equal sent.size, stats["firehose_delivered"]
      proxy = @proxy.stats
      assert_operator proxy["entries_throttled"], :>, 0
    end
  end

  test "a chunk retried by fluentd resends only what was not delivered" do
    name = @firehose.create(@firehose.unique_name)
    d = driver(config(name, "retries_on_batch_request 0\nbatch_request_max_count 50\n<buffer tag>\n  retry_wait 0.1\n</buffer>"))
    @proxy.push(2, "partial_throttle 0.5")
    sent = events(400)
    run_driver(d, sent, force_flush_retry: true)
    assert_operator d.instance.num_errors, :>=, 1, "fluentd did not retry the chunk"
    assert_equal lines_of(sent).sort, @firehose.objects(name).flat_map(&:lines).sort
  end

  test "records over 1,024,000 bytes go to the error stream; the others are delivered" do
    name = @firehose.create(@firehose.unique_name)
    d = driver(config(name))
    sent = events(10)
    big = { "seq" => 99, "pad" => "x" * 1_024_000 }
    run_driver(d, sent[0, 5] + [big] + sent[5, 5])
    assert_equal lines_of(sent).sort, @firehose.objects(name).flat_map(&:lines).sort
    errors = d.error_events
    assert_equal 1, errors.size
    assert_equal 99, errors[0][2]["seq"]
    assert_match(/formatted record is 1024020 bytes; max_record_size is 1024000 bytes/, errors[0][3].message)
  end

  test "append_new_line: one newline per record, data_key values too; off: records as formatted" do
    name = @firehose.create(@firehose.unique_name)
    d = driver(config(name, "data_key message"))
    run_driver(d, [{ "message" => "plain" }, { "message" => "crlf\r\n" }, { "message" => "two\n\n" }])
    assert_equal "plain\ncrlf\ntwo\n\n", @firehose.objects(name).join
    name = @firehose.create(@firehose.unique_name)
    d = driver(config(name, "data_key message\nappend_new_line false"))
    run_driver(d, [{ "message" => "a" }, { "message" => "b\n" }])
    assert_equal "ab\n", @firehose.objects(name).join
  end

  test "compression gzip: each record decompresses to one line" do
    name = @firehose.create(@firehose.unique_name)
    d = driver(config(name, "compression gzip"))
    sent = events(50)
    run_driver(d, sent)
    # Concatenated gzip members are one gzip stream.
    text = @firehose.objects(name).map { |o| Zlib::GzipReader.zcat(StringIO.new(o)) }.join.b
    assert_equal lines_of(sent).sort, text.lines.sort
  end

  test "settings that cannot work are refused at configure" do
    e = assert_raise(Fluent::ConfigError) { driver(config("x", "pack_records true\ncompression gzip")) }
    assert_match(/pack_records and compression/, e.message)
    e = assert_raise(Fluent::ConfigError) { driver(config("x", "max_record_size 2m")) }
    assert_match(/max_record_size/, e.message)
    d = driver(config("x", "batch_request_max_size 5m"))
    assert_equal 4 * 1024 * 1024, d.instance.batch_request_max_size
    assert_equal 1_024_000, driver(config("x")).instance.max_record_size
  end

  test "a missing delivery stream: logged at start with what to check; the write fails, nothing is dropped silently" do
    d = driver(config("no-such-stream", "retries_on_batch_request 1\ndelivery_timeout 2\nshutdown_timeout 3"))
    begin
      d.run(default_tag: "t", timeout: 60) { d.feed(event_time, { "a" => 1 }) }
    rescue StandardError
      nil # the test driver re-raises the failed flush
    end
    logs = d.logs.join
    assert_match(/kinesis_firehose cannot use its delivery stream yet/, logs)
    assert_match(/ResourceNotFoundException.*Check delivery_stream_name/, logs)
    assert_match(/not delivered to delivery stream \\?"no-such-stream/, logs)
    stats = d.instance.kinesis_statistics
    assert_operator stats["firehose_failed"], :>=, 1
    assert_equal 0, stats["firehose_delivered"]
  end
end

# frozen_string_literal: true

require_relative "helper"
require "msgpack"
require "tmpdir"
require_relative "support/local_kinesis"

# Native::Delivery and the progress files, without fluentd: a chunk's delivery runs on the
# extension's runtime, its result is collected once, and its progress is kept on disk as
# responses arrive.
class TestDelivery < Test::Unit::TestCase
  Native = FluentPluginKinesisRs::Native
  CHUNK_ID = "0123456789abcdef".b

  setup do
    @kinesis = LocalKinesis.shared
    @producer = Native::Producer.new(
      "region" => "us-east-1", "endpoint" => @kinesis.endpoint,
      "credentials" => { "type" => "static", "access_key_id" => "AKIDTEST", "secret_access_key" => "secretsecret" }
    )
    @formatter = Native::Formatter.new("format" => "json", "max_record_size" => 1024 * 1024)
    @dir = Dir.mktmpdir("kinesis-delivery")
  end

  teardown do
    @producer&.close
    FileUtils.rm_rf(@dir)
  end

  def chunk(n)
    Array.new(n) { |i| [1_700_000_000, { "seq" => i }].to_msgpack }.join.b
  end

  def bits(n, set)
    out = "\0".b * ((n + 7) / 8)
    set.each { |i| out.setbyte(i / 8, out.getbyte(i / 8) | (1 << (i % 8))) }
    out
  end

  def read_seqs(stream)
    @kinesis.read(stream)["records"].map { |r| JSON.parse(r["data"])["seq"] }.sort
  end

  test "a delivery runs to the end, keeps its progress on disk, and gives its result once" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("delivery"), 2)
    path = File.join(@dir, "buffer.p0123.log.kinesis-progress")
    delivery = @producer.start_chunk(stream, @formatter, chunk(100), "t", nil, path, CHUNK_ID, Time.now.to_f)
    result = delivery.wait
    assert_true delivery.finished?
    assert_equal [], result["failures"]
    assert_equal 100, result["delivered_count"]
    assert_equal bits(100, 0...100), delivery.progress
    assert_equal bits(100, 0...100), Native.read_progress(path, CHUNK_ID)
    assert_nil result["progress_file_error"]
    assert_raise(FluentPluginKinesisRs::InternalError) { delivery.wait }
    assert_equal (0...100).to_a, read_seqs(stream)
  end

  test "events delivered by an earlier attempt are skipped and stay recorded as delivered" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("delivery"), 1)
    path = File.join(@dir, "buffer.p0456.log.kinesis-progress")
    earlier = bits(40, 0...25)
    result = @producer.start_chunk(stream, @formatter, chunk(40), "t", earlier, path, CHUNK_ID, Time.now.to_f).wait
    assert_equal 40, result["delivered_count"]
    assert_equal (25...40).to_a, read_seqs(stream)
    assert_equal bits(40, 0...40), Native.read_progress(path, CHUNK_ID)
  end

  test "progress files: missing is nil, damaged or another chunk's is an error, removal is idempotent" do
    path = File.join(@dir, "buffer.p0789.log.kinesis-progress")
    assert_nil Native.read_progress(path, CHUNK_ID)
    Native.write_progress(path, CHUNK_ID, bits(16, [3, 9]))
    assert_equal bits(16, [3, 9]), Native.read_progress(path, CHUNK_ID)
    error = assert_raise(FluentPluginKinesisRs::ProgressError) { Native.read_progress(path, "fedcba9876543210".b) }
    assert_match(/belongs to another chunk/, error.message)
    data = File.binread(path)
    data.setbyte(12, data.getbyte(12) ^ 1)
    File.binwrite(path, data)
    error = assert_raise(FluentPluginKinesisRs::ProgressError) { Native.read_progress(path, CHUNK_ID) }
    assert_match(/damaged/, error.message)
    Native.remove_progress(path)
    Native.remove_progress(path)
    assert_false File.exist?(path)
  end

  test "an unwritable progress file is reported, and the delivery still completes" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("delivery"), 1)
    path = File.join(@dir, "no-such-dir", "buffer.p0abc.log.kinesis-progress")
    result = @producer.start_chunk(stream, @formatter, chunk(10), "t", nil, path, CHUNK_ID, Time.now.to_f).wait
    assert_equal 10, result["delivered_count"]
    assert_match(/no-such-dir/, result["progress_file_error"])
  end
end

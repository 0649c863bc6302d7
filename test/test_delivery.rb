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

  test "a chunk is formatted where Ruby keeps it: unchanged, writable again after, and errors raise at start" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("delivery"), 1)
    data = chunk(30)
    before = data.dup
    delivery = @producer.start_chunk(stream, @formatter, data, "t", nil, nil, CHUNK_ID, Time.now.to_f)
    assert_equal before, data
    data << "more" # raises if the extension left the string locked
    assert_equal 30, delivery.wait["delivered_count"]
    assert_equal (0...30).to_a, read_seqs(stream)

    frozen = chunk(3).freeze
    assert_equal 3, @producer.start_chunk(stream, @formatter, frozen, "t", nil, nil, CHUNK_ID, Time.now.to_f).wait["delivered_count"]

    cut = chunk(5)[0...-2]
    assert_raise(FluentPluginKinesisRs::CorruptChunkError) do
      @producer.start_chunk(stream, @formatter, cut, "t", nil, nil, CHUNK_ID, Time.now.to_f)
    end
    cut << "x"
    nan = chunk(2) + [1_700_000_000, { "seq" => Float::NAN }].to_msgpack
    assert_raise(FluentPluginKinesisRs::NeedsRubyFormattingError) do
      @producer.start_chunk(stream, @formatter, nan, "t", nil, nil, CHUNK_ID, Time.now.to_f)
    end
    nan << "x"
    assert_equal ((0...30).to_a + (0...3).to_a).sort, read_seqs(stream), "nothing of the failed chunks was sent"
  end

  test "a chunk's string cannot be modified while it is formatted, and modifying it after is harmless" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("delivery"), 4)
    data = chunk(200_000)
    locked = 0
    writer = Thread.new do
      200.times do
        data << ""
        data.setbyte(data.bytesize - 1, data.getbyte(data.bytesize - 1))
      rescue RuntimeError => e
        raise unless e.message.include?("locked")
        locked += 1
      end
    end
    delivery = @producer.start_chunk(stream, @formatter, data, "t", nil, nil, CHUNK_ID, Time.now.to_f)
    data.replace("gone") # the delivery holds its own formatted records
    writer.join
    assert_equal 200_000, delivery.wait["delivered_count"]
    seqs = read_seqs(stream)
    assert_equal 200_000, seqs.size
    assert_equal (0...200_000).to_a, seqs
    puts "\n(writer attempts refused while the chunk was formatted: #{locked} of 200)"
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

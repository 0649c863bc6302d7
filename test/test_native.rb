# frozen_string_literal: true

require_relative "helper"
require "base64"
require "tmpdir"
require "fileutils"

# FluentPluginKinesisRs::Native: KPL aggregation in Rust, checked by reading the aggregates back
# with our own decoder and with Python's aws_kinesis_agg (what Lambda consumers use).
class TestNative < Test::Unit::TestCase
  Native = FluentPluginKinesisRs::Native
  MiB = 1024 * 1024

  # The KPL magic number every aggregate starts with.
  MAGIC = "\xF3\x89\x9A\xC2".b

  RECORDS = [
    ["plain text".b, "pk-1", nil],
    [(0..255).map(&:chr).join.b, "pk-2", nil],                 # every byte value
    ["".b, "pk-1", nil],                                         # empty data, repeated key
    ["{\"msg\":\"h\u00e9llo \u2603\"}".b, "cl\u00e9-\u65e5\u672c-\u{1F600}", nil], # multibyte key
    ["with ehk".b, "pk-3", "0"],
    ["with big ehk".b, "pk-4", ((1 << 128) - 1).to_s],
    ["\x00\xF3\x89\x9A\xC2\xFF".b, "pk-1", "12345678901234567890"], # magic inside user data
  ].freeze

  def assert_binary(string)
    assert_equal(Encoding::BINARY, string.encoding, "expected a binary String")
  end

  def deaggregate_all(aggregates)
    aggregates.flat_map do |aggregate|
      records = Native.deaggregate(aggregate)
      assert_not_nil(records, "not read as an aggregate: #{aggregate.bytes.first(8).inspect}")
      records
    end
  end

  test "a platform gem without this Ruby's extension says how to get the source gem compiled" do
    Dir.mktmpdir("kinesis-loader") do |dir|
      error = LoadError.new("cannot load such file")
      message = FluentPluginKinesisRs.extension_missing_message("3.0", error, dir)
      assert_match(/not built/, message)
      assert_match(/--platform ruby/, message)

      %w[3.4 2.7 3.1].each do |minor|
        FileUtils.mkdir_p(File.join(dir, minor))
        File.write(File.join(dir, minor, "kinesis_rs.so"), "")
      end
      assert_equal %w[2.7 3.1 3.4], FluentPluginKinesisRs.precompiled_minors(dir)
      message = FluentPluginKinesisRs.extension_missing_message("3.0", error, dir)
      assert_match(/has extensions for Ruby 2\.7, 3\.1, 3\.4, not for Ruby #{Regexp.escape(RUBY_VERSION)} \(3\.0\)/, message)
      assert_match(/`gem install fluent-plugin-kinesis-rs --platform ruby`/, message)
      assert_match(/Rust 1\.85 or newer with cargo on PATH, libclang/, message)
    end
  end

  test "VERSION matches the gem version" do
    assert_equal(FluentPluginKinesisRs::VERSION, Native::VERSION)
    assert_equal(FluentPluginKinesisRs::VERSION, Native.core_version)
  end

  test "aggregate then deaggregate gives back every record, byte for byte, in order" do
    aggregates = Native.aggregate(RECORDS, MiB)
    assert_equal(1, aggregates.size)
    aggregates.each do |aggregate|
      assert_binary(aggregate)
      assert_equal(MAGIC, aggregate.byteslice(0, 4))
    end

    back = deaggregate_all(aggregates)
    assert_equal(RECORDS.size, back.size)
    RECORDS.zip(back).each do |(data, key, ehk), (got_key, got_ehk, got_data)|
      assert_equal([key, ehk], [got_key, got_ehk])
      assert_equal(Encoding::UTF_8, got_key.encoding)
      assert_binary(got_data)
      assert_equal(data.bytes, got_data.bytes)
    end
  end

  test "starts a new aggregate when the next record does not fit, each within max_bytes" do
    records = Array.new(50) { |i| [("x" * 1000 + i.to_s).b, "key-#{i % 7}", nil] }
    max_bytes = 8 * 1024
    aggregates = Native.aggregate(records, max_bytes)
    assert_operator(aggregates.size, :>, 5)
    aggregates.each do |aggregate|
      # Kinesis counts data plus the outer partition key "a".
      assert_operator(aggregate.bytesize + 1, :<=, max_bytes)
    end
    assert_equal(records.map { |d, k, _| [k, nil, d] }, deaggregate_all(aggregates))
  end

  test "greedy packing: the next record would have overflowed every finished aggregate" do
    records = Array.new(20) { |i| ["y" * (100 + 37 * i), "k", nil] }
    aggregates = Native.aggregate(records, 2000)
    sizes = aggregates.map { |a| Native.deaggregate(a).size }
    assert_equal(records.size, sizes.sum)
    offset = 0
    aggregates[0...-1].zip(sizes).each do |_aggregate, count|
      offset += count
      with_next = Native.aggregate(records[(offset - count)..offset], 10 * MiB).first
      assert_operator(with_next.bytesize + 1, :>, 2000, "aggregate ending at record #{offset} could have taken one more")
    end
  end

  test "no records, no aggregates" do
    assert_equal([], Native.aggregate([], MiB))
  end

  test "a record that fits no aggregate raises RecordTooLargeError, a StandardError" do
    records = [["small".b, "k", nil], ["z" * 5000, "k", nil]]
    error = assert_raise(FluentPluginKinesisRs::RecordTooLargeError) { Native.aggregate(records, 4096) }
    assert_match(/record 1 needs \d+ bytes .* max_bytes 4096/, error.message)
    assert_kind_of(FluentPluginKinesisRs::Error, error)
    assert_kind_of(StandardError, error)
    assert_not_kind_of(ArgumentError, error)
    assert_not_kind_of(TypeError, error)
  end

  test "invalid keys raise InvalidKeyError" do
    assert_raise(FluentPluginKinesisRs::InvalidKeyError) { Native.aggregate([["d", "", nil]], MiB) }
    assert_raise(FluentPluginKinesisRs::InvalidKeyError) { Native.aggregate([["d", "k" * 257, nil]], MiB) }
    %w[-1 01 12a].push((1 << 128).to_s).each do |ehk|
      error = assert_raise(FluentPluginKinesisRs::InvalidKeyError) { Native.aggregate([["d", "ok", nil], ["d", "k", ehk]], MiB) }
      assert_match(/\Arecord 1: explicit hash key/, error.message)
    end
  end

  test "malformed arguments are TypeErrors" do
    assert_raise(TypeError) { Native.aggregate([["d", "k"]], MiB) }
    assert_raise(TypeError) { Native.aggregate([[1, "k", nil]], MiB) }
    assert_raise(TypeError) { Native.aggregate("nope", MiB) }
  end

  test "deaggregate of bytes that are not an aggregate is nil" do
    assert_nil(Native.deaggregate("".b))
    assert_nil(Native.deaggregate("just a log line".b))
    assert_nil(Native.deaggregate(MAGIC + ("\x00" * 16).b))
    aggregate = Native.aggregate([["d", "k", nil]], MiB).first
    corrupted = aggregate.dup
    corrupted.setbyte(corrupted.bytesize - 1, corrupted.getbyte(corrupted.bytesize - 1) ^ 1)
    assert_nil(Native.deaggregate(corrupted), "a bad MD5 trailer means pass-through, as in the KCL")
    assert_not_nil(Native.deaggregate(aggregate))
  end

  PYTHON_DEAGGREGATE = <<~PY
    import base64, json, sys
    from aws_kinesis_agg.deaggregator import deaggregate_records
    out = []
    for i, data in enumerate(json.load(sys.stdin)):
        lambda_record = {"kinesis": {"kinesisSchemaVersion": "1.0", "sequenceNumber": str(i),
                                     "approximateArrivalTimestamp": 0, "partitionKey": "a",
                                     "data": data}}
        for r in deaggregate_records([lambda_record]):
            k = r["kinesis"]
            d = k["data"]
            out.append([i, k.get("aggregated", False), k["partitionKey"], k.get("explicitHashKey"),
                        d.decode("ascii") if isinstance(d, bytes) else d])
    json.dump(out, sys.stdout)
  PY

  test "Python aws_kinesis_agg reads our aggregates" do
    records = RECORDS + Array.new(30) { |i| [("log line #{i} " * 40).b, "py-#{i % 3}", nil] }
    aggregates = Native.aggregate(records, 4096)
    assert_operator(aggregates.size, :>, 1)
    decoded = TestHelper.python_json(PYTHON_DEAGGREGATE, aggregates.map { |a| Base64.strict_encode64(a) })

    assert_equal(records.size, decoded.size)
    decoded.zip(records).each do |(_, aggregated, key, ehk, data64), (data, want_key, want_ehk)|
      assert_true(aggregated)
      assert_equal(want_key, key)
      # aws_kinesis_agg 1.2.3 ignores whether a record has an explicit hash key index (proto2
      # default 0), so a record without one reads as having the table's first key.
      assert_equal(want_ehk, ehk) if want_ehk
      assert_equal(data.bytes, Base64.strict_decode64(data64).bytes)
    end
    # And it passes through a record that is not an aggregate.
    plain = TestHelper.python_json(PYTHON_DEAGGREGATE, [Base64.strict_encode64("not aggregated")])
    assert_equal([[0, false, "a", nil, Base64.strict_encode64("not aggregated")]], plain)
  end
end

# frozen_string_literal: true

require_relative "helper"
require "json"
require "msgpack"
require "fluent_plugin_kinesis_rs/scrub"
begin
  require "oj" # fluentd's JSON formatter (the slow path) uses Oj when it is installed
rescue LoadError
  nil
end

# Strings that are not valid UTF-8 (in_tail passes such lines through) must never reach a
# consumer inside "JSON": both formatting paths replace each invalid sequence with U+FFFD as
# Ruby's String#scrub does (or, with invalid_utf8 error, refuse the record).
module InvalidUtf8Cases
  # Truncated and cut-off sequences, overlongs, UTF-8-encoded surrogates, F5..FF, lone
  # continuation bytes, and valid sequences right next to invalid ones (hex).
  TRICKY = [
    "ff", "fe", "f5", "f8 88 80 80 80", "fc 84 80 80 80 80",
    "c0 af", "c0 80", "c1 bf", "e0 80 af", "e0 9f bf", "f0 80 80 af", "f0 8f bf bf",
    "ed a0 80", "ed bf bf", "ed a0 80 ed b0 80", "f4 90 80 80",
    "80", "bf", "41 80 42", "80 80 80",
    "c3", "e3 81", "f0 9f 98", "f0 9f 98 41", "e3 81 41", "f0 9f 41", "e3 41", "c3 41",
    "61 f0 9f 98", "e1 80 e2 f0 91 92 f1 bf 41", "f4 90", "f4 8f", "e0 a0", "e0 80",
    "f1 80 80 c3 a9", "fe fe ff ff", "c2 c2 c2", "61 ed a0 62", "61 ed 9f 62", "f0 8f 61",
    "f4 80 80 41", "ed a0",
    "61 f0 9f 98 80", "e2 82 ac", "ed 9f bf", "f4 8f bf bf", # valid: left alone
  ].freeze

  def self.bytes(hex)
    [hex.delete(" ")].pack("H*")
  end

  def self.utf8(hex)
    bytes(hex).force_encoding(Encoding::UTF_8)
  end
end

class TestScrub < Test::Unit::TestCase
  Scrub = FluentPluginKinesisRs::Scrub
  FFFD = "\u{FFFD}"

  def hex(str)
    str.unpack1("H*").scan(/../).join(" ")
  end

  def deep_freeze(obj)
    case obj
    when Hash then obj.each_pair { |k, v| deep_freeze(k); deep_freeze(v) }
    when Array then obj.each { |e| deep_freeze(e) }
    end
    obj.freeze
  end

  # Ruby's own answers, which the Rust formatter reproduces byte for byte (chunk.rs tests
  # RUBY_SCRUB, and the native tests below through the extension).
  test "String#scrub: one U+FFFD per maximal subpart of a valid sequence, else per byte" do
    {
      "f0 9f 98" => "ef bf bd", # a 4-byte sequence cut at the end: one
      "f0 9f 98 41" => "ef bf bd 41", # ... or cut in the middle: one
      "ed a0 80" => "ef bf bd ef bf bd ef bf bd", # a surrogate: ED A0 is no valid prefix
      "c0 af" => "ef bf bd ef bf bd", # overlong: C0 starts nothing
      "e0 80 af" => "ef bf bd ef bf bd ef bf bd",
      "f4 90 80 80" => "ef bf bd ef bf bd ef bf bd ef bf bd", # above U+10FFFF
      "f8 88 80 80 80" => (["ef bf bd"] * 5).join(" "), # F5..FF: each byte
      "41 80 42" => "41 ef bf bd 42", # a lone continuation byte
      "e1 80 e2 f0 91 92 f1 bf 41" => "ef bf bd ef bf bd ef bf bd ef bf bd 41",
    }.each do |input, want|
      assert_equal(want, hex(InvalidUtf8Cases.utf8(input).scrub), input)
    end
  end

  test "a record without invalid UTF-8 comes back as the same object" do
    record = { "message" => "caf\u00e9 \u{1F600}", "n" => 1, "f" => 1.5, "nil" => nil, "t" => true,
               "sym" => :x, "bin" => "caf\u00e9".b, "list" => ["a", { "b" => ["c"] }], 7 => "int key" }
    out, changed = Scrub.record(record)
    assert_same(record, out)
    assert_false(changed)
    [1, nil, "plain", [], {}].each do |v|
      out, changed = Scrub.record(v)
      assert_same(v, out)
      assert_false(changed)
    end
  end

  test "every tricky input scrubs exactly as String#scrub, as a value and as a key" do
    InvalidUtf8Cases::TRICKY.each do |input|
      s = InvalidUtf8Cases.utf8(input).freeze
      record = { "message" => s, s => "v" }.freeze
      out, changed = Scrub.record(record)
      assert_equal(!s.valid_encoding?, changed, input)
      assert_equal({ "message" => s.scrub, s.scrub => "v" }, out, input)
      assert_equal([hex(s.scrub)] * 2, [hex(out["message"]), hex(out.keys.last)], input)
      assert_true(out.keys.all?(&:valid_encoding?) && out.values.all?(&:valid_encoding?), input)
    end
  end

  test "nested keys, values and arrays are scrubbed; untouched parts are shared; input unchanged" do
    bad = InvalidUtf8Cases.utf8("61 ff 62")
    clean_list = ["x", { "y" => "z" }]
    record = deep_freeze({
                           "before" => "ok", "clean" => clean_list,
                           "nested" => { "k" => ["fine", bad, 3], "k#{bad}" => { "deep" => [[bad]] } },
                           "after" => "ok",
                         })
    snapshot = Marshal.dump(record)
    out, changed = Scrub.record(record)
    assert_true(changed)
    want = {
      "before" => "ok", "clean" => ["x", { "y" => "z" }],
      "nested" => { "k" => ["fine", "a#{FFFD}b", 3], "ka#{FFFD}b" => { "deep" => [["a#{FFFD}b"]] } },
      "after" => "ok",
    }
    assert_equal(want, out)
    assert_equal(want.keys, out.keys)
    assert_equal(want["nested"].keys, out["nested"].keys)
    assert_same(record["clean"], out["clean"])
    assert_same(record["before"], out["before"])
    assert_same(record["nested"]["k"][0], out["nested"]["k"][0])
    assert_equal(snapshot, Marshal.dump(record), "the input was modified")
    assert_equal(JSON.generate(want), JSON.generate(out))
  end

  test "unfrozen input is not modified either" do
    bad = InvalidUtf8Cases.utf8("e3 81 41")
    record = { "m" => bad, "list" => [bad] }
    out, changed = Scrub.record(record)
    assert_true(changed)
    assert_equal({ "m" => "#{FFFD}A", "list" => ["#{FFFD}A"] }, out)
    assert_same(bad, record["m"])
    assert_false(record["m"].valid_encoding?)
    assert_equal("e3 81 41", hex(record["list"][0]))
  end

  test "binary strings are read as UTF-8 bytes, as the Rust formatter reads them" do
    valid = "caf\u00e9".b.freeze
    invalid = "caf\xE9!".b.freeze
    out, changed = Scrub.record({ "a" => valid, "b" => invalid })
    assert_true(changed)
    assert_same(valid, out["a"])
    assert_equal("caf#{FFFD}!", out["b"])
    assert_equal(Encoding::UTF_8, out["b"].encoding)
    assert_equal(Encoding::BINARY, invalid.encoding)
  end

  test "refusal: the first invalid String of a record, and where it is" do
    bad = InvalidUtf8Cases.utf8("61 62 ff")
    tail = "; sent to the error stream because invalid_utf8 is error"
    assert_nil(Scrub.refusal({ "a" => "b", "c" => [1, { "d" => "e" }] }))
    assert_nil(Scrub.refusal("not a hash #{bad}"))
    assert_equal("record has invalid UTF-8 in field \"m\" (byte 0xff at offset 2)#{tail}",
                 Scrub.refusal({ "ok" => 1, "m" => bad, bad => bad }))
    assert_equal("record has invalid UTF-8 in a field name (\"ab\u{FFFD}\": byte 0xff at offset 2)#{tail}",
                 Scrub.refusal({ bad => "x" }))
    assert_equal("record has invalid UTF-8 in field \"n\" (a string nested in it: byte 0xff at offset 2)#{tail}",
                 Scrub.refusal({ "n" => [{ "k" => bad }] }))
  end

  test "keys that become equal once scrubbed keep one entry, at the first one's position" do
    record = { InvalidUtf8Cases.utf8("61 ff") => 1, "b" => 2, InvalidUtf8Cases.utf8("61 fe") => 3 }
    out, = Scrub.record(record)
    assert_equal([["a#{FFFD}", 3], ["b", 2]], out.to_a)
  end
end

# The Rust formatter through the extension, against a local Kinesis (kinesalite), read back
# with the Python consumer library: what a Lambda consumer gets.
class TestInvalidUtf8Native < Test::Unit::TestCase
  Native = FluentPluginKinesisRs::Native
  Scrub = FluentPluginKinesisRs::Scrub

  setup do
    require_relative "support/local_kinesis"
    @kinesis = LocalKinesis.shared
    @producer = Native::Producer.new(
      "region" => "us-east-1", "endpoint" => @kinesis.endpoint,
      "credentials" => { "type" => "static", "access_key_id" => "AKIDTEST", "secret_access_key" => "secretsecret" }
    )
  end

  teardown do
    @producer&.close
  end

  # Formats and delivers `records` as one fluentd chunk; [outcome, data of each record read back].
  def deliver(options, records)
    formatter = Native::Formatter.new(options)
    stream = @kinesis.create_stream(@kinesis.unique_stream("utf8"), 1)
    chunk = records.map { |r| [1_700_000_000, r].to_msgpack }.join.b
    result = @producer.start_chunk(stream, formatter, chunk, "test.utf8", nil, nil, "0123456789abcdef".b, Time.now.to_f).wait
    assert_equal([], result["failures"])
    [result, @kinesis.read(stream)["records"].map { |r| r["data"].b }]
  end

  def python_loads(data)
    script = "import base64, json, sys\n" \
             "print(json.dumps([json.loads(base64.b64decode(d)) for d in json.load(sys.stdin)]))"
    TestHelper.python_json(script, data.map { |d| [d].pack("m0") })
  end

  def tricky_records
    InvalidUtf8Cases::TRICKY.map do |input|
      s = InvalidUtf8Cases.utf8(input)
      { "message" => "line #{input}: #{s}".force_encoding(Encoding::UTF_8), "k#{s}" => s, "n" => 1 }
    end
  end

  test "JSON: the Rust output is JSON.generate of the scrubbed record, byte for byte, and parses" do
    records = tricky_records + [
      { "nested" => { InvalidUtf8Cases.utf8("c0 80") => [InvalidUtf8Cases.utf8("ed a0 80"), 2, nil] } },
      { "bin" => InvalidUtf8Cases.bytes("61 ff").b, "also" => "caf\u00e9" },
      { "message" => "no invalid byte here \u00e9 \u{1F600} \"quoted\"\n" },
    ]
    result, data = deliver({ "format" => "json" }, records)
    assert_equal([], result["refused"])
    expected = records.map { |r| "#{JSON.generate(Scrub.record(r)[0])}\n".b }
    assert_equal(expected.size, data.size)
    expected.zip(data, records).each do |want, got, record|
      assert_equal(want, got, "record #{record.inspect}")
      assert_equal("#{Oj.dump(Scrub.record(record)[0], mode: :compat)}\n".b, got) if defined?(Oj)
      assert_equal(Scrub.record(record)[0], JSON.parse(got.dup.force_encoding(Encoding::UTF_8)))
    end
    assert_equal(data.map { |d| JSON.parse(d.dup.force_encoding(Encoding::UTF_8)) }, python_loads(data))
    scrubbed = result["counters"]["scrubbed"]
    assert_equal(records.count { |r| Scrub.record(r)[1] }, scrubbed) if scrubbed
  end

  test "JSON with invalid_utf8 error: records with invalid UTF-8 are refused, the others sent" do
    records = [
      { "message" => InvalidUtf8Cases.utf8("61 62 ff") },
      { "message" => "fine" },
      { InvalidUtf8Cases.utf8("6b e3 81") => "v" },
    ]
    result, data = deliver({ "format" => "json", "invalid_utf8" => "error" }, records)
    assert_equal(["{\"message\":\"fine\"}\n"], data)
    tail = "; sent to the error stream because invalid_utf8 is error"
    assert_equal([[0, "record has invalid UTF-8 in field \"message\" (byte 0xff at offset 2)#{tail}"],
                  [2, "record has invalid UTF-8 in a field name (\"k\u{FFFD}\": byte 0xe3 at offset 1)#{tail}"]],
                 result["refused"])
  end

  test "Scrub.refusal words a refusal as the Rust formatter does" do
    long = "#{"\u00e9" * 60}\xff".dup.force_encoding(Encoding::UTF_8)
    records = tricky_records + [
      { "ok" => "fine", "nested" => { "k" => [1, InvalidUtf8Cases.utf8("61 ed a0 80")] } },
      { "ok" => "fine", "nested" => { InvalidUtf8Cases.utf8("c0 80") => "v" } },
      { "a" => InvalidUtf8Cases.bytes("61 62 63 ff").b },
      { long => 1 }, { "x" => long }, { long => long },
    ]
    result, = deliver({ "format" => "json", "invalid_utf8" => "error" }, records)
    want = records.each_with_index.filter_map { |r, i| (reason = Scrub.refusal(r)) && [i, reason] }
    assert_equal(records.count { |r| Scrub.record(r)[1] }, want.size)
    assert_equal(want, result["refused"])
  end

  test "single_value, data_key and msgpack keep the bytes as they are" do
    bad = InvalidUtf8Cases.utf8("6c 69 6e 65 20 ff fe 20 e3 81")
    records = [{ "message" => bad, "log" => bad }]
    [[{ "format" => "single_value", "add_newline" => false }, bad.b],
     [{ "format" => "json", "data_key" => "log" }, bad.b],
     [{ "format" => "msgpack" }, records[0].to_msgpack.b]].each do |options, want|
      result, data = deliver(options.merge("invalid_utf8" => "error"), records)
      assert_equal([], result["refused"], options.inspect)
      assert_equal([want], data, options.inspect)
    end
  end

  test "invalid_utf8 takes replace or error" do
    assert_nothing_raised { Native::Formatter.new("invalid_utf8" => "replace") }
    assert_nothing_raised { Native::Formatter.new("invalid_utf8" => nil) }
    e = assert_raise(FluentPluginKinesisRs::ConfigurationError) { Native::Formatter.new("invalid_utf8" => "drop") }
    assert_match(/invalid_utf8 "drop": use replace or error/, e.message)
  end
end

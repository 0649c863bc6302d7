# frozen_string_literal: true

# What record packing saves on Amazon Data Firehose: for the same Apache access log (apache2
# records, JSON lines), PutRecordBatch calls, Firehose records and billed 5 KB units of
#   (a) fluent-plugin-kinesis's kinesis_firehose (one record per event, batches of 500 records /
#       4 MiB per chunk, as its split_to_batches cuts them),
#   (b) this plugin's kinesis_firehose, one record per event,
#   (c) this plugin's kinesis_firehose with pack_records,
# the last two delivered through fluentd's test driver to moto's Firehose (S3 behind it, one
# object per call) and counted by the plugin; every line is read back from S3 and compared.
#
#   ruby bench/firehose.rb
#   LINES=200000 CHUNK_LIMIT=8m ruby bench/firehose.rb
#
# (a) cannot run here (the AWS SDK for Ruby is not installable offline), so its figures are
# computed by its own rules from the same events and the same chunks (b) was given: each event
# formatted by fluentd's json formatter, chomped and given "\n" (its append_new_line), one
# Firehose record each, a chunk's records cut into calls when the next would pass 500 records or
# 4 MiB (its split_to_batches), and Firehose's billing (each record rounded up to 5 KB). The
# bench checks that what (b) wrote to S3 is those records, byte for byte. Needs fluentd on the load path and moto[server]
# (script/setup).

require_relative "../test/helper"
abort "bench/firehose.rb needs fluentd (see README)" unless TestHelper::FLUENTD_AVAILABLE

require "fluent/test"
require "fluent/test/driver/output"
require "fluent/plugin/parser_apache2"
require "fluent/plugin/out_kinesis_firehose"
require_relative "../test/support/local_firehose"
require_relative "../test/support/apache_log"

Test::Unit::AutoRunner.need_auto_run = false
Fluent::Test.setup
$log = Fluent::Log.new(ServerEngine::DaemonLogger.new($stderr, log_level: ServerEngine::DaemonLogger::WARN))

LINES = Integer(ENV.fetch("LINES", "200000"))
CHUNK_LIMIT = ENV.fetch("CHUNK_LIMIT", "8m")
UNIT = 5 * 1024
MAX_CALL_RECORDS = 500
MAX_CALL_BYTES = 4 * 1024 * 1024

parser = Fluent::Plugin.new_parser("apache2")
parser.configure(Fluent::Config::Element.new("parse", "", {}, []))
events = []
LINES.times do |i|
  parser.parse(ApacheLog.line(i, host: ApacheLog::SPREAD_HOST)) { |time, record| events << [time, record] }
end

firehose = LocalFirehose.new(MotoServer.shared)

# Feeds every event, then flushes; returns the plugin's counters, the chunks' record counts, the
# S3 objects and the CPU seconds of the flush.
def deliver(firehose, events, extra)
  name = firehose.create(firehose.unique_name("bench"))
  d = Fluent::Test::Driver::Output.new(Fluent::Plugin::KinesisFirehoseRsOutput).configure(<<~CONF)
    delivery_stream_name #{name}
    region us-east-1
    endpoint #{firehose.endpoint}
    aws_key_id AKIDBENCH
    aws_sec_key bench-secret
    #{extra}
    <buffer tag>
      chunk_limit_size #{CHUNK_LIMIT}
      flush_mode interval
      flush_interval 3600s
    </buffer>
  CONF
  chunks = []
  d.instance.singleton_class.prepend(Module.new do
    define_method(:write) do |chunk|
      chunks << chunk.size
      super(chunk)
    end
  end)
  cpu = nil
  d.run(default_tag: "apache.access", timeout: 600) do
    events.each_slice(1000) do |slice|
      es = Fluent::MultiEventStream.new
      slice.each { |t, r| es.add(t, r) }
      d.feed("apache.access", es)
    end
    started = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    d.instance.force_flush
    sleep 0.05 until d.instance.buffer.queue.empty? && d.instance.dequeued_chunks.empty?
    cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - started
  end
  [d.instance.kinesis_statistics, chunks, firehose.objects(name), cpu]
end

# fluent-plugin-kinesis's split_to_batches over each chunk's records, and Firehose's billing.
def anchor_figures(records, chunk_sizes)
  calls = 0
  offset = 0
  chunk_sizes.each do |n|
    count = 0
    bytes = 0
    records[offset, n].each do |r|
      if count + 1 > MAX_CALL_RECORDS || bytes + r.bytesize > MAX_CALL_BYTES
        calls += 1
        count = 0
        bytes = 0
      end
      count += 1
      bytes += r.bytesize
    end
    calls += 1 if count.positive?
    offset += n
  end
  { calls: calls, records: records.size, units: records.sum { |r| (r.bytesize + UNIT - 1) / UNIT },
    bytes: records.sum(&:bytesize) }
end

ours, chunks, objects, cpu_single = deliver(firehose, events, "")
formatter = Fluent::Plugin.new_formatter("json")
formatter.configure(Fluent::Config::Element.new("format", "", {}, []))
anchor_records = events.map { |time, record| "#{formatter.format("apache.access", time, record).chomp}\n".b }
lines = objects.flat_map(&:lines)
abort "S3 does not hold the anchor's records byte for byte" unless lines.sort == anchor_records.sort
# One flush thread writes the chunks in the order they were filled.
anchor = anchor_figures(anchor_records, chunks)
packed, _, packed_objects, cpu_packed = deliver(firehose, events, "pack_records true")
abort "pack_records lost or duplicated lines" unless packed_objects.flat_map(&:lines).sort == lines.sort

rows = [
  ["fluent-plugin-kinesis 3.6.1 (its rules)", anchor[:calls], anchor[:records], anchor[:units], anchor[:bytes], nil],
  ["this plugin, one record per event", ours["firehose_requests"], ours["firehose_records"],
   ours["firehose_billed_units"], ours["firehose_bytes_delivered"], cpu_single],
  ["this plugin, pack_records", packed["firehose_requests"], packed["firehose_records"],
   packed["firehose_billed_units"], packed["firehose_bytes_delivered"], cpu_packed]
]
puts "#{LINES} Apache lines (apache2 -> JSON, #{anchor[:bytes] / LINES} bytes each on average), chunks of #{CHUNK_LIMIT} " \
     "(#{chunks.size} chunks)"
puts format("%-42s %10s %10s %12s %14s %12s", "", "calls", "records", "5 KB units", "bytes", "CPU µs/line")
rows.each do |label, calls, records, units, bytes, cpu|
  puts format("%-42s %10d %10d %12d %14d %12s", label, calls, records, units, bytes, cpu ? format("%.2f", cpu * 1e6 / LINES) : "-")
end
puts format("packing: %.1fx fewer billed units, %.1fx fewer calls than one record per event",
            ours["firehose_billed_units"].to_f / packed["firehose_billed_units"],
            ours["firehose_requests"].to_f / packed["firehose_requests"])
unless ours["firehose_requests"] == anchor[:calls] && ours["firehose_billed_units"] == anchor[:units]
  puts "NOTE: one record per event differs from fluent-plugin-kinesis's rules (calls #{ours["firehose_requests"]} vs #{anchor[:calls]})"
end

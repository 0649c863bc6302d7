# frozen_string_literal: true

# What keep_order costs: throughput per shard and CPU per record with the option on and off,
# through fluentd's test driver, against kinesalite behind the fault proxy limiting every shard to
# Kinesis's own 1 MiB/s and 1,000 records/s (entries over it are throttled, as Kinesis does).
#
#   ruby bench/order.rb                     (2 and 8 shards, 8 MiB of Apache lines per shard)
#   SHARDS=2,8,32 MIB_PER_SHARD=8 ROUNDS=3 ruby bench/order.rb
#
# Each run: the events (apache2 records, `partition_key host` over 2,000 client addresses) are
# fed with #write held back, then the buffer is flushed and timed: wall time until every chunk is
# written, process CPU (every thread) over the same span. Throughput per shard = bytes delivered
# (data plus partition keys) / wall / shards. The plugin's rate limit is 100 % of the shard limit
# in both modes, so neither spends its time being throttled. Every stream is read back and each
# host's records checked for order, as a KCL consumer reads them. Medians of ROUNDS alternating
# rounds. Needs fluentd on the load path (FLUENTD_LIB or /opt) and what script/setup installs.

require_relative "../test/helper"
abort "bench/order.rb needs fluentd (see README)" unless TestHelper::FLUENTD_AVAILABLE

require "set"
require "fluent/test"
require "fluent/test/driver/output"
require "fluent/plugin/parser_apache2"
require "fluent/plugin/out_kinesis_streams_aggregated"
require_relative "../test/support/local_kinesis"
require_relative "../test/support/fault_proxy"
require_relative "../test/support/apache_log"

Test::Unit::AutoRunner.need_auto_run = false
Fluent::Test.setup
$log = Fluent::Log.new(ServerEngine::DaemonLogger.new($stderr, log_level: ServerEngine::DaemonLogger::WARN))

SHARD_COUNTS = ENV.fetch("SHARDS", "2,8").split(",").map { |s| Integer(s) }
MIB_PER_SHARD = Float(ENV.fetch("MIB_PER_SHARD", "8"))
ROUNDS = Integer(ENV.fetch("ROUNDS", "3"))
# The plugin's rate_limit (percent of the shard limit), and the proxy's limit per shard in MiB/s
# (0: none), for looking at what else bounds the throughput.
RATE_LIMIT = Integer(ENV.fetch("RATE_LIMIT", "100"))
SHARD_LIMIT_MIB = Float(ENV.fetch("SHARD_LIMIT_MIB", "1"))
PART2 = ENV.fetch("PART2", "1") == "1"
# fluentd's chunk_limit_size (8m: the memory buffer's default).
CHUNK_LIMIT = ENV.fetch("CHUNK_LIMIT", "8m")
MIB = 1024 * 1024

def cpu
  Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
end

def wall
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

# 2,000 client addresses, spread over every shard.
HOST = ->(i) { "10.#{i % 8}.#{i / 8 % 250}.#{i % 2000 / 8}" }
PARSER = Fluent::Plugin.new_parser("apache2").tap { |p| p.configure(Fluent::Config::Element.new("parse", "", {}, [])) }

def events(bytes)
  out = []
  size = 0
  i = 0
  while size < bytes
    PARSER.parse(ApacheLog.line(i, host: HOST)) do |_, record|
      out << record
      size += record.sum { |k, v| k.bytesize + v.to_s.bytesize } + 40
    end
    i += 1
  end
  out
end

# Reads every shard (parents first, each in sequence order) and counts the records of a host that
# arrived after a later record of that host.
def out_of_order(kinesis, stream)
  last = {}
  seen = Set.new
  bad = 0
  kinesis.read(stream)["records"].select { |r| r["kcl_ok"] }.each do |r|
    e = JSON.parse(r["data"])
    n = Integer(e["path"][/#(\d+)\z/, 1])
    next unless seen.add?(n)

    if last[e["host"]] && n < last[e["host"]]
      bad += 1
    else
      last[e["host"]] = n
    end
  end
  [bad, seen.size]
end

# A driver of the plugin writing to `stream` through the proxy, `partition_key host`.
def bench_driver(proxy, stream, keep_order, extra)
  Fluent::Test::Driver::Output.new(Fluent::Plugin::KinesisStreamsAggregatedRsOutput).configure(<<~CONF)
    stream_name #{stream}
    region us-east-1
    endpoint #{proxy.endpoint}
    aws_key_id AKIDBENCH
    aws_sec_key bench-secret
    partition_key host
    keep_order #{keep_order}
    retries_on_batch_request 30
    #{extra}
  CONF
end

def run(kinesis, proxy, shards, keep_order, feed)
  stream = kinesis.create_stream(kinesis.unique_stream("order-bench"), shards)
  driver = bench_driver(proxy, stream, keep_order, <<~EXTRA)
    rate_limit #{RATE_LIMIT}
    <buffer tag>
      chunk_limit_size #{CHUNK_LIMIT}
      flush_thread_interval 0.05
    </buffer>
  EXTRA
  plugin = driver.instance
  gate = Queue.new
  plugin.singleton_class.prepend(Module.new do
    define_method(:write) do |chunk|
      gate.pop unless gate.closed?
      super(chunk)
    end
  end)
  result = {}
  driver.run(default_tag: "apache.access", flush: false, shutdown: false, timeout: 3600) do
    es = Fluent::MultiEventStream.new
    now = Fluent::EventTime.now
    feed.each { |r| es.add(now, r) }
    driver.feed(es)
    c0 = cpu
    w0 = wall
    gate.close
    plugin.force_flush
    # Until no chunk is staged, queued or being written (buffer.dequeued holds those).
    sleep 0.01 until plugin.buffer.queue.empty? && plugin.buffer.stage.empty? &&
                     plugin.buffer.dequeued.empty?
    result["wall"] = wall - w0
    result["cpu"] = cpu - c0
  end
  stats = plugin.kinesis_statistics
  raise "the timed flush missed records (#{stats["kinesis_delivered"]} of #{feed.size})" unless stats["kinesis_delivered"] == feed.size

  result["rate_limited_s"] = stats["kinesis_rate_limited_ms"] / 1000.0
  result["chunks"] = plugin.write_count
  driver.instance_shutdown
  bad, read = out_of_order(kinesis, stream)
  result.merge("bytes" => stats["kinesis_bytes_delivered"], "records" => stats["kinesis_delivered"],
               "throttled" => stats["kinesis_throttled_entries"], "requests" => stats["kinesis_requests"],
               "out_of_order" => bad, "read" => read)
end

def median(values)
  values.sort[values.size / 2]
end

kinesis = LocalKinesis.shared
proxy = FaultProxy.new(kinesis.endpoint)
proxy.shard_limit((SHARD_LIMIT_MIB * MIB).to_i, (1000 * SHARD_LIMIT_MIB).to_i) if SHARD_LIMIT_MIB.positive?
rows = []
SHARD_COUNTS.each do |shards|
  feed = events((MIB_PER_SHARD * shards * MIB).to_i)
  results = Hash.new { |h, k| h[k] = [] }
  ROUNDS.times do
    [false, true].each { |keep| results[keep] << run(kinesis, proxy, shards, keep, feed) }
  end
  results.each do |keep, runs|
    mibps = runs.map { |r| r["bytes"] / r["wall"] / shards / MIB }
    rows << [shards, keep ? "on" : "off", feed.size, median(mibps), median(runs.map { |r| r["cpu"] * 1e6 / r["records"] }),
             median(runs.map { |r| r["requests"] }), median(runs.map { |r| r["throttled"] }),
             median(runs.map { |r| r["chunks"] }), median(runs.map { |r| r["wall"] }),
             median(runs.map { |r| r["rate_limited_s"] / shards }),
             runs.map { |r| r["out_of_order"] }.max, runs.map { |r| "#{r["read"]}/#{feed.size}" }.uniq.join(" ")]
  end
end
# Part 2, the disorder keep_order prevents: 20,000 events over 20 hosts (`partition_key host`,
# 4 KiB aggregates), 20 % of PutRecords entries failing at the proxy (no shard limit), delivered
# with fluentd's test driver, each shard read in sequence order.
proxy.clear
proxy.always("partial_internal_failure 0.2")
disorder = (PART2 ? [false, true] : []).to_h do |keep|
  stream = kinesis.create_stream(kinesis.unique_stream("order-faults"), 4)
  driver = bench_driver(proxy, stream, keep, "aggregation_max_size 4k")
  t0 = wall
  driver.run(default_tag: "app.log", timeout: 600) do
    20_000.times do |i|
      driver.feed(Fluent::EventTime.now, { "host" => "host-#{i % 20}", "path" => "/item##{i}" })
    end
  end
  seconds = wall - t0
  bad, read = out_of_order(kinesis, stream)
  [keep, [bad, read, seconds]]
end
proxy.stop

puts "keep_order cost: fault proxy at #{SHARD_LIMIT_MIB} MiB/s and #{(1000 * SHARD_LIMIT_MIB).to_i} records/s per shard, rate_limit #{RATE_LIMIT}, " \
     "#{MIB_PER_SHARD} MiB of Apache lines per shard, chunk_limit_size #{CHUNK_LIMIT}, medians of #{ROUNDS} alternating rounds"
header = ["shards", "keep_order", "records", "MiB/s per shard", "CPU µs/record", "PutRecords calls",
          "throttled entries", "chunks", "wall s", "rate-limited s per shard", "out of order (max)", "read back"]
table = [header, *rows.map { |r| r.map { |v| v.is_a?(Float) ? format("%.2f", v) : v.to_s } }]
widths = header.each_index.map { |i| table.map { |row| row[i].size }.max }
table.each { |row| puts row.each_with_index.map { |v, i| v.ljust(widths[i]) }.join("  ") }
puts
puts "20,000 events over 20 hosts, 20 % of entries failing: out of order / read back, seconds" if PART2
disorder.each do |keep, (bad, read, seconds)|
  puts "  keep_order #{keep ? "on " : "off"}: #{bad} / #{read}, #{format("%.1f", seconds)} s"
end

# frozen_string_literal: true

# The original setup, locally: an Apache access log tailed by fluentd (in_tail, apache2) and
# shipped by `@type kinesis_streams_aggregated` (this gem) to a Kinesis stream, then read back
# and deaggregated by a consumer as an AWS Lambda using aws_kinesis_agg would.
#
# The Kinesis server is kinesalite on 127.0.0.1, started and stopped here. Run through
# `script/demo` (which installs what it needs and builds the extension).
#
#   LINES=20000 SHARDS=4 PARTITION_KEY=host ruby demo/apache_to_kinesis.rb

require "json"
require "fileutils"
require "tmpdir"
require_relative "../test/support/local_kinesis"
require_relative "../test/support/fluentd_process"
require_relative "../test/support/apache_log"

LINES = Integer(ENV.fetch("LINES", "20000"))
SHARDS = Integer(ENV.fetch("SHARDS", "4"))
PARTITION_KEY = ENV["PARTITION_KEY"].to_s

begin
  FluentdProcess.locate
rescue FluentdProcess::NotFound => e
  abort e.message
end
dir = Dir.mktmpdir("kinesis-demo")
kinesis = LocalKinesis.new
stream = kinesis.create_stream("apache-access", SHARDS)
puts "local Kinesis: #{kinesis.endpoint} (pid #{kinesis.pid}), stream #{stream} with #{SHARDS} shards"

log = File.join(dir, "access_log")
File.write(log, "")
config = FluentdProcess.pipeline_config(
  dir: dir, log: log, read_from_head: false, stream: stream, endpoint: kinesis.endpoint,
  aws_key_id: "DEMOACCESSKEY", aws_sec_key: "demo-secret",
  plugin: PARTITION_KEY.empty? ? nil : "partition_key #{PARTITION_KEY}",
  buffer: { flush_interval: "1s" }
)
fluentd = FluentdProcess.new(dir: dir, config: config, config_name: "td-agent.conf", name: "fluentd (demo)")
puts "fluentd config: #{fluentd.config_path}"
fluentd_log = fluentd.log

begin
  fluentd.start.wait_until_running(120)
  t0 = Time.now
  ApacheLog.append(log, LINES, flush_every: 1000, time: ->(i) { t0 + i / 100.0 })
  puts "wrote #{LINES} Apache access log lines to #{log}"

  got = nil
  deadline = Time.now + 120
  loop do
    got = kinesis.read(stream)
    n = got["records"].size
    print "\rreceived #{n}/#{LINES} user records in #{got["kinesis_records"]} Kinesis records (#{(Time.now - t0).round(1)} s)   "
    break if n >= LINES || Time.now > deadline

    sleep 1
  end
  puts

  records = got["records"]
  per_shard = records.group_by { |r| r["shard"] }.transform_values(&:size).sort
  received = records.map { |r| ApacheLog.number(r["data"]) }
  missing = (0...LINES).to_a - received
  duplicates = received.size - received.uniq.size
  puts "\n== summary"
  puts "lines written          #{LINES}"
  puts "user records received  #{records.size} (missing #{missing.size}, duplicated #{duplicates})"
  puts "Kinesis records        #{got["kinesis_records"]} (#{(records.size.to_f / [got["kinesis_records"], 1].max).round(1)} log lines per record)"
  puts "KCL would drop         #{got["kcl_dropped_aggregates"]} aggregates"
  puts "records per shard      #{per_shard.map { |s, n| "#{s}: #{n}" }.join(", ")}"
  puts "sample (deaggregated with aws_kinesis_agg):"
  records.first(3).each { |r| puts "  [#{r["shard"]} key=#{r["partition_key"]}] #{r["data"].strip}" }
  ok = missing.empty? && duplicates.zero? && got["kcl_dropped_aggregates"].zero?
  puts ok ? "OK: every line arrived once" : "PROBLEM: see #{fluentd_log}"
  exit(ok ? 0 : 1)
ensure
  fluentd.stop(timeout: 60)
  kinesis.stop
  FileUtils.rm_rf(dir) if ENV["KEEP"].nil?
end

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
require "rbconfig"
require "tmpdir"
require_relative "../test/support/local_kinesis"

ROOT = File.expand_path("..", __dir__)
LINES = Integer(ENV.fetch("LINES", "20000"))
SHARDS = Integer(ENV.fetch("SHARDS", "4"))
PARTITION_KEY = ENV["PARTITION_KEY"].to_s

def find_fluentd
  dirs = if ENV["FLUENTD_LIB"] then ENV["FLUENTD_LIB"].split(File::PATH_SEPARATOR)
         elsif %w[/opt/serverengine/lib /opt/fluentd/lib].all? { |d| File.directory?(d) } then %w[/opt/serverengine/lib /opt/fluentd/lib]
         else []
         end
  lib = dirs.find { |d| File.exist?(File.join(d, "fluent", "engine.rb")) }
  return [[RbConfig.ruby, File.expand_path("../bin/fluentd", lib)], dirs] if lib && File.exist?(File.expand_path("../bin/fluentd", lib))

  begin
    return [[RbConfig.ruby, Gem.bin_path("fluentd", "fluentd")], []]
  rescue Gem::Exception
    nil
  end
  abort <<~MSG
    fluentd is not available. This demo runs a real fluentd (>= 1.8, < 2) with this plugin.
    Either install it as a gem (`gem install fluentd`, or use td-agent / fluent-package's
    ruby), or point FLUENTD_LIB at a fluentd source tree and serverengine >= 2.3:
      FLUENTD_LIB=/path/to/serverengine/lib:/path/to/fluentd/lib script/demo
  MSG
end

def apache_line(i, t)
  hosts = %w[203.0.113.7 198.51.100.23 192.0.2.45 203.0.113.99 198.51.100.4 192.0.2.200]
  paths = ["/", "/index.html", "/products/42", "/cart", "/api/v1/items?page=#{i % 17}", "/static/app.js"]
  agents = ["Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1)"]
  code = [200, 200, 200, 304, 404, 500][i % 6]
  %(#{hosts[i % hosts.size]} - - [#{t.strftime("%d/%b/%Y:%H:%M:%S %z")}] "GET #{paths[i % paths.size]}##{i} HTTP/1.1" ) +
    %(#{code} #{200 + (i * 37) % 5000} "https://www.example.com/" "#{agents[i % agents.size]}")
end

command, load_path = find_fluentd
dir = Dir.mktmpdir("kinesis-demo")
kinesis = LocalKinesis.new
stream = kinesis.create_stream("apache-access", SHARDS)
puts "local Kinesis: #{kinesis.endpoint} (pid #{kinesis.pid}), stream #{stream} with #{SHARDS} shards"

log = File.join(dir, "access_log")
File.write(log, "")
conf = File.join(dir, "td-agent.conf")
File.write(conf, <<~CONF)
  <source>
    @type tail
    path #{log}
    pos_file #{dir}/access_log.pos
    tag apache.access
    <parse>
      @type apache2
    </parse>
  </source>
  <match apache.access>
    @type kinesis_streams_aggregated
    stream_name #{stream}
    region ap-northeast-1
    endpoint #{kinesis.endpoint}
    aws_key_id DEMOACCESSKEY
    aws_sec_key demo-secret
    #{PARTITION_KEY.empty? ? "" : "partition_key #{PARTITION_KEY}"}
    <buffer>
      flush_interval 1s
    </buffer>
  </match>
CONF
puts "fluentd config: #{conf}"
fluentd_log = File.join(dir, "fluentd.log")
env = { "RUBYLIB" => ([File.join(ROOT, "lib")] + load_path).join(File::PATH_SEPARATOR) }
fluentd = Process.spawn(env, *command, "-c", conf, "-o", fluentd_log, pgroup: true)

begin
  sleep 0.5 until File.exist?(fluentd_log) && File.read(fluentd_log).include?("fluentd worker is now running")
  t0 = Time.now
  File.open(log, "a") do |f|
    LINES.times do |i|
      f.puts apache_line(i, t0 + i / 100.0)
      f.flush if (i % 1000).zero?
    end
  end
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
  lines = records.map { |r| JSON.parse(r["data"]) }
  per_shard = records.group_by { |r| r["shard"] }.transform_values(&:size).sort
  received = lines.map { |l| l["path"][/#(\d+)\z/, 1].to_i }
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
  Process.kill("TERM", fluentd) rescue nil
  Process.wait(fluentd) rescue nil
  kinesis.stop
  FileUtils.rm_rf(dir) if ENV["KEEP"].nil?
end

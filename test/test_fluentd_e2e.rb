# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("real fluentd end-to-end tests")

require "tmpdir"
require "timeout"
require "rbconfig"
require "socket"
require "net/http"
require_relative "support/local_kinesis"

# A real fluentd process, as in production: in_tail of an Apache access log (format apache2)
# -> this plugin -> local Kinesis with several shards -> read back and deaggregated with the
# Python consumer library (aws_kinesis_agg, as in a Lambda consumer), every line once, and the
# KCL's shard-range check holding for every aggregate.
class FluentdEndToEndTest < Test::Unit::TestCase
  LINES = 5000

  setup do
    @kinesis = LocalKinesis.shared
    @dir = Dir.mktmpdir("fluentd-e2e")
  end

  teardown do
    stop_fluentd
    FileUtils.rm_rf(@dir)
  end

  def fluentd_command
    lib = $LOAD_PATH.find { |d| File.exist?(File.join(d, "fluent", "engine.rb")) }
    bin = File.expand_path("../bin/fluentd", lib)
    bin = Gem.bin_path("fluentd", "fluentd") unless File.exist?(bin)
    [RbConfig.ruby, bin]
  end

  def apache_line(i)
    ip = "10.#{i % 3}.#{(i / 3) % 256}.#{i % 200}"
    %(#{ip} - user#{i % 5} [25/Nov/2026:10:#{format("%02d", (i / 60) % 60)}:#{format("%02d", i % 60)} +0000] ) +
      %("GET /shop/item/#{i}?ref=e2e HTTP/1.1" 200 #{1000 + i} "https://example.com/start" "Mozilla/5.0 (e2e #{i})")
  end

  def start_fluentd(stream, extra)
    log = File.join(@dir, "access.log")
    File.write(log, "")
    conf = File.join(@dir, "fluent.conf")
    @monitor_port = free_port
    File.write(conf, <<~CONF)
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{@monitor_port}
      </source>
      <source>
        @type tail
        path #{log}
        pos_file #{@dir}/access.log.pos
        tag apache.access
        read_from_head true
        <parse>
          @type apache2
        </parse>
      </source>
      <match apache.access>
        @type kinesis_streams_aggregated
        stream_name #{stream}
        region ap-northeast-1
        endpoint #{@kinesis.endpoint}
        aws_key_id AKIDTEST
        aws_sec_key secretsecret
        #{extra}
        <buffer>
          flush_interval 1s
          flush_thread_count 2
        </buffer>
      </match>
    CONF
    env = { "RUBYLIB" => ([File.join(TestHelper::ROOT, "lib")] + $LOAD_PATH.grep(%r{fluentd|serverengine})).join(File::PATH_SEPARATOR) }
    @fluentd_log = File.join(@dir, "fluentd.log")
    @fluentd = Process.spawn(env, *fluentd_command, "-c", conf, "--no-supervisor", "-o", @fluentd_log, pgroup: true)
    File.open(log, "a") do |f|
      LINES.times do |i|
        f.puts apache_line(i)
        f.flush if (i % 500).zero?
      end
    end
  end

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  # The plugin's counters as fluentd's monitor_agent serves them.
  def monitor_output
    plugins = JSON.parse(Net::HTTP.get(URI("http://127.0.0.1:#{@monitor_port}/api/plugins.json")))["plugins"]
    plugins.find { |p| p["type"] == "kinesis_streams_aggregated" }
  end

  def stop_fluentd
    return unless @fluentd

    Process.kill("TERM", @fluentd)
    Timeout.timeout(30) { Process.wait(@fluentd) }
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  ensure
    @fluentd = nil
  end

  def wait_for_records(stream, count, timeout: 90)
    deadline = Time.now + timeout
    loop do
      got = @kinesis.read(stream)
      return got if got["records"].size >= count
      if Time.now > deadline
        flunk "only #{got["records"].size} of #{count} records arrived in #{timeout}s; fluentd log:\n#{File.read(@fluentd_log)[-4000..]}"
      end
      sleep 1
    end
  end

  def assert_every_line_once(got)
    paths = got["records"].map { |r| JSON.parse(r["data"])["path"] }
    assert_equal LINES, paths.size
    assert_equal Array.new(LINES) { |i| "/shop/item/#{i}?ref=e2e" }.sort, paths.sort
    assert_equal 0, got["kcl_dropped_aggregates"]
    assert got["records"].all? { |r| r["kcl_ok"] }
  end

  test "in_tail apache2 -> kinesis_streams_aggregated -> Kinesis, random keys" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("e2e"), 2)
    start_fluentd(stream, "")
    got = wait_for_records(stream, LINES)
    assert_every_line_once(got)
    assert got["records"].all? { |r| r["aggregated"] }
    assert_operator got["kinesis_records"], :<, LINES / 10
    stats = monitor_output
    assert_equal LINES, stats["kinesis_delivered"]
    assert_equal 0, stats["kinesis_failed"]
    assert_operator stats["kinesis_requests"], :>=, 1
    assert_operator stats["kinesis_aggregates"], :>=, 1
    log = File.read(@fluentd_log)
    assert_match(/kinesis_streams_aggregated is fluent-plugin-kinesis-rs/, log)
    assert_match(/is reachable with 2 open shard/, log)
  end

  test "in_tail apache2 -> kinesis_streams_aggregated with partition_key host, 4 shards" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("e2e-pk"), 4)
    start_fluentd(stream, "partition_key host\naggregation_max_size 64k")
    got = wait_for_records(stream, LINES)
    assert_every_line_once(got)
    got["records"].each { |r| assert_equal JSON.parse(r["data"])["host"], r["partition_key"] }
    assert_equal 4, got["records"].map { |r| r["shard"] }.uniq.size
  end
end

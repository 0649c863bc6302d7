# frozen_string_literal: true

require "etc"
require "fileutils"
require "tmpdir"
require_relative "apache_log"
require_relative "fault_proxy"
require_relative "fluentd_process"
require_relative "local_kinesis"
require_relative "scenario_setup"

# Scale-out inside one host: a forwarder fluentd tails an Apache log and sends it with
# out_forward (file buffer, acknowledged) to an aggregator fluentd running `workers N` with
# in_forward and this plugin (one file buffer per worker). Optionally the aggregator gets
# SIGTERM mid-stream and is started again; the forwarder keeps its events until they are
# acknowledged. Every line is then counted in the stream, and the KCL's check is applied.
class MultiWorkerScenario
  include ScenarioSetup
  Result = Struct.new(:written, :received, :lost, :duplicates, :kcl_dropped, :seconds, :cpu_seconds,
                      :stops, keyword_init: true) do
    def records_per_second
      received / seconds
    end

    def cpu_us_per_record
      cpu_seconds * 1e6 / received
    end
  end

  attr_reader :aggregator, :forwarder, :stream

  # faults: fault proxy commands (the aggregator sends through the proxy)
  def initialize(kinesis:, lines:, workers:, shards: 4, faults: [], name: "workers")
    @kinesis = kinesis
    @lines = lines
    prepare_stream_and_proxy(name, shards, faults)
    forward_port = FluentdProcess.free_port
    agg_dir = File.join(@dir, "aggregator")
    config = FluentdProcess.pipeline_config(
      dir: agg_dir, stream: @stream, endpoint: @proxy.endpoint, tail: false, tag: "apache.access",
      plugin: ["partition_key host"], workers: workers, forward_port: forward_port,
      buffer: { type: "file", flush_thread_count: 2 }
    )
    @aggregator = FluentdProcess.new(dir: agg_dir, config: config, workers: workers, name: "aggregator")
    fwd_dir = File.join(@dir, "forwarder")
    FileUtils.mkdir_p(fwd_dir)
    @forwarder = FluentdProcess.new(dir: fwd_dir, config: <<~CONF, supervisor: false, name: "forwarder")
      #{FluentdProcess.tail_source(log: @log)}
      <match apache.access>
        @type forward
        require_ack_response true
        ack_response_timeout 30
        <server>
          host 127.0.0.1
          port #{forward_port}
        </server>
        <buffer>
          @type file
          path #{fwd_dir}/buffer
          flush_interval 1s
          chunk_limit_size 2m
          retry_wait 1s
          retry_max_interval 2s
        </buffer>
      </match>
    CONF
    @stops = []
  end

  # Starts both, writes the log; with `sigterm_at` (a fraction of the lines), SIGTERM to the
  # aggregator's supervisor once that much is written and a PutRecords call is in flight, then
  # a restart.
  def run(sigterm_at: nil, timeout: 600)
    @aggregator.start.wait_until_running(120)
    @forwarder.start.wait_until_running(60)
    started = now
    writer = Thread.new do
      (0...@lines).each_slice(5000) { |r| ApacheLog.append(@log, r.first..r.last, flush_every: 5000, host: ApacheLog::SPREAD_HOST) }
    end
    cpu = 0.0
    if sigterm_at
      sleep 0.2 until File.foreach(@log).count >= @lines * sigterm_at
      sleep 0.02 until @proxy.stats["in_flight_user_records"].to_i.positive?
      cpu += group_cpu_seconds(@aggregator)
      stop = @aggregator.stop(timeout: 300)
      @stops << { signal: :TERM, seconds: stop.seconds.round(1), escalated: stop.escalated }
      @aggregator.start.wait_until_running(120)
    end
    writer.join
    got = wait_for_all(timeout)
    seconds = now - started
    cpu += group_cpu_seconds(@aggregator)
    @forwarder.stop(timeout: 60)
    stop = @aggregator.stop(timeout: 300)
    @stops << { signal: :TERM, seconds: stop.seconds.round(1), escalated: stop.escalated }
    count(got, seconds, cpu)
  end

  def cleanup
    [@forwarder, @aggregator].each { |f| f.kill! if f&.alive? }
    @proxy&.stop
    FileUtils.rm_rf(@dir) unless ENV["KEEP"]
  end

  def log_text
    "#{@aggregator.log_text}\n--- forwarder\n#{@forwarder.log_text}"
  end

  private

  def wait_for_all(timeout)
    deadline = now + timeout
    loop do
      got = @kinesis.read(@stream)
      return got if got["records"].size >= @lines || now > deadline

      sleep 2
    end
  end

  def count(got, seconds, cpu)
    counts = Hash.new(0)
    got["records"].each { |r| counts[ApacheLog.number(r["data"])] += 1 }
    Result.new(written: @lines, received: counts.size, lost: (0...@lines).count { |i| counts[i].zero? },
               duplicates: counts.values.sum { |c| c - 1 }, kcl_dropped: got["kcl_dropped_aggregates"],
               seconds: seconds, cpu_seconds: cpu, stops: @stops)
  end

  # CPU seconds (user + system) used so far by the supervisor and its workers.
  def group_cpu_seconds(fluentd)
    ticks = Etc.respond_to?(:sysconf) ? Etc.sysconf(Etc::SC_CLK_TCK) : 100
    fluentd.group_pids.sum do |pid|
      fields = File.read("/proc/#{pid}/stat").split(") ").last.split
      (fields[11].to_i + fields[12].to_i).to_f / ticks
    rescue Errno::ENOENT
      0.0
    end
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

# frozen_string_literal: true

require "fileutils"
require "tmpdir"
require_relative "apache_log"
require_relative "fault_proxy"
require_relative "fluentd_process"
require_relative "local_kinesis"
require_relative "scenario_setup"

# A real fluentd (supervisor + worker) tailing an Apache log into this plugin, through the
# fault proxy to a local Kinesis, while the test stops it (SIGTERM, SIGINT) or crashes it
# (SIGKILL) mid-stream and starts it again, as an operator's `systemctl restart` or the OOM
# killer would. At the end, a clean run reads the rest of the log, and every line is counted
# in the stream as a Lambda consumer (Python aws_kinesis_agg) reads it: lost, and repeated.
#
#   s = RestartScenario.new(kinesis: LocalKinesis.shared, lines: 20_000, buffer: { type: "file" },
#                           faults: ["shard_limit 262144 1000"])
#   s.start
#   s.signal_mid_stream(:TERM)       # or signal_after_last_read, kill_during_delivery
#   result = s.finish                # => Result(written, received, lost, duplicates, ...)
#   s.cleanup
class RestartScenario
  include ScenarioSetup
  # What a run came to. stops: [{signal:, seconds:, escalated:}], kills: [{in_flight_user_records:,
  # in_flight_put_entries:, duplicates:}] (duplicates resent after that kill).
  # kcl_lost, kcl_duplicates: the same counts as a KCL consumer sees them (aggregates that fail
  # its shard-range check dropped).
  Result = Struct.new(:written, :received, :lost, :duplicates, :stops, :kills, :kinesis_records, :kcl_dropped,
                      :kcl_lost, :kcl_duplicates, keyword_init: true)

  attr_reader :fluentd, :proxy, :stream, :dir, :lines

  # lines:   Apache lines written to the tailed log, at `rate` lines per second, from start
  # shards:  of the stream; plugin: extra lines for the <match> (default: partition_key host,
  #          as the issue's setup)
  # buffer:  pipeline_config's buffer: ({type: "memory"} or {type: "file"} ...)
  # faults:  fault proxy commands applied before fluentd starts ("shard_limit 262144 1000",
  #          "sometimes 0.02 status 500", "always partial_internal_failure 0.05")
  # output:  the @type (kinesis_streams_aggregated by default, or kinesis_streams)
  def initialize(kinesis:, lines:, shards: 4, rate: 20_000, plugin: ["partition_key host"], buffer: { type: "memory" },
                 faults: [], workers: nil, name: "restart", output: "kinesis_streams_aggregated")
    @kinesis = kinesis
    @lines = lines
    @rate = rate
    prepare_stream_and_proxy(name, shards, faults)
    @stops = []
    @kills = []
    config = FluentdProcess.pipeline_config(
      dir: @dir, stream: @stream, endpoint: @proxy.endpoint, log: @log, plugin: plugin, output: output,
      buffer: { flush_thread_count: 2 }.merge(buffer), monitor_port: FluentdProcess.free_port, workers: workers
    )
    @fluentd = FluentdProcess.new(dir: @dir, config: config, name: name)
  end

  # Starts fluentd, then the writer of the log.
  def start
    @fluentd.start.wait_until_running(90)
    @writer = Thread.new do
      slice = [@rate / 10, 1].max
      (0...@lines).each_slice(slice) do |range|
        ApacheLog.append(@log, range.first..range.last, flush_every: slice)
        sleep 0.1
      end
    end
    self
  end

  # `sig` to the supervisor once about half the log is written, at a moment a PutRecords call
  # is in flight; waits for the whole process group to exit (the stop's duration is recorded).
  def signal_mid_stream(sig, fraction: 0.5)
    wait_until(60, "half of the log written") { written_lines >= @lines * fraction }
    wait_until(60, "a PutRecords call in flight", interval: 0.02) { @proxy.stats["in_flight_user_records"].to_i.positive? }
    stop(sig)
  end

  # `sig` `delay` seconds after fluentd has read the last line of the log.
  def signal_after_last_read(sig, delay: 1.5)
    @writer.join
    wait_until(120, "fluentd reading the whole log") { read_offset >= File.size(@log) }
    sleep delay
    stop(sig)
  end

  # Splits a shard once about half the log is written and deliveries are under way: the shard
  # map the plugin holds goes stale mid-stream.
  def split_mid_stream(fraction: 0.5)
    wait_until(60, "half of the log written and a PutRecords call") do
      written_lines >= @lines * fraction && put_records_calls.positive?
    end
    @kinesis.split_shard(@stream)
  end

  # SIGKILL to the whole group (supervisor and worker) while PutRecords calls are in flight,
  # then a restart; `times` times. The proxy's in-flight gauges are recorded at each kill, and
  # the duplicates in the stream, so each restart's resends can be told apart.
  def kill_during_delivery(times:)
    times.times do |i|
      before = put_records_calls
      stats = nil
      wait_until(120, "a PutRecords call in flight (kill #{i + 1})", interval: 0.02) do
        stats = @proxy.stats
        stats.dig("requests", "PutRecords").to_i > before + 1 && stats["in_flight_user_records"].to_i.positive?
      end
      @fluentd.kill!
      # In flight at the kill: the proxy still counts the requests the dead process had sent (it
      # finishes them), and no new one can start. Sampled before the kill, it would miss the calls
      # started in between (each of up to 500 records without aggregation).
      stats = @proxy.stats
      # What the stream holds now, before the restart resends anything.
      @kills << { in_flight_put_entries: stats["in_flight_put_entries"],
                  in_flight_user_records: stats["in_flight_user_records"], duplicates_before: duplicates_now }
      @fluentd.start.wait_until_running(90)
    end
  end

  # Lets the writer finish, (re)starts fluentd to read whatever is left, waits until every line
  # arrived (or nothing new came for `quiet` seconds), stops cleanly and counts.
  def finish(timeout: 300, quiet: 45)
    @writer&.join
    @fluentd.start.wait_until_running(90) unless @fluentd.alive?
    last_count = -1
    last_change = now
    deadline = now + timeout
    got = nil
    loop do
      got = @kinesis.read(@stream)
      count = got["records"].map { |r| ApacheLog.number(r["data"]) }.uniq.size
      break if count >= @lines && read_offset >= File.size(@log)

      if count != last_count
        last_count = count
        last_change = now
      end
      break if now - last_change > quiet || now > deadline

      sleep 3
    end
    stop(:TERM)
    count(@kinesis.read(@stream))
  end

  def cleanup
    @fluentd&.kill! if @fluentd&.alive?
    @proxy&.stop
    FileUtils.rm_rf(@dir) unless ENV["KEEP"]
  end

  def log_text
    @fluentd.log_text
  end

  # The plugin's progress files left in a file buffer's directory.
  def progress_files
    Dir.glob(File.join(@dir, "buffer", "*.kinesis-progress*"))
  end

  private

  def stop(sig)
    result = @fluentd.stop(signal: sig, timeout: 600)
    @stops << { signal: sig, seconds: result.seconds.round(1), escalated: result.escalated }
    result
  end

  def count(got)
    numbers = got["records"].map { |r| ApacheLog.number(r["data"]) }
    counts = Hash.new(0)
    numbers.each { |n| counts[n] += 1 }
    lost = (0...@lines).count { |i| counts[i].zero? }
    duplicates = counts.values.sum { |c| c - 1 }
    kcl = Hash.new(0)
    got["records"].each_with_index { |r, i| kcl[numbers[i]] += 1 if r["kcl_ok"] }
    attribute_duplicates(duplicates)
    Result.new(written: @lines, received: counts.size, lost: lost, duplicates: duplicates, stops: @stops,
               kills: @kills, kinesis_records: got["kinesis_records"], kcl_dropped: got["kcl_dropped_aggregates"],
               kcl_lost: (0...@lines).count { |i| kcl[i].zero? }, kcl_duplicates: kcl.values.sum { |c| c - 1 })
  end

  # The copies a restart resent: the duplicates in the stream at the next kill (or at the end)
  # minus those there at this kill.
  def attribute_duplicates(final)
    @kills.each_with_index do |k, i|
      after = i + 1 < @kills.size ? @kills[i + 1][:duplicates_before] : final
      k[:duplicates] = after - k[:duplicates_before]
    end
  end

  def duplicates_now
    counts = Hash.new(0)
    @kinesis.read(@stream)["records"].each { |r| counts[ApacheLog.number(r["data"])] += 1 }
    counts.values.sum { |c| c - 1 }
  end

  def written_lines
    File.foreach(@log).count
  end

  def put_records_calls
    @proxy.stats.dig("requests", "PutRecords").to_i
  end

  # in_tail's position in the log (its pos file: path \t hex offset \t hex inode).
  def read_offset
    line = File.exist?("#{@log}.pos") ? File.read("#{@log}.pos").lines.first : nil
    line ? line.split("\t")[1].to_i(16) : 0
  end

  def wait_until(timeout, what, interval: 0.1)
    deadline = now + timeout
    until yield
      raise "#{what}: not within #{timeout}s\n#{@fluentd.diagnostics}" if now > deadline

      sleep interval
    end
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

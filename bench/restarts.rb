# frozen_string_literal: true

# Stops, restarts and crashes of a real fluentd under load, measured: the issue's table, at
# full size, each row printed as it finishes (lines lost and repeated, how long each stop
# took), then the multi-worker run (4 workers behind in_forward, SIGTERM mid-stream) and the
# CPU and throughput of 4 workers against 1.
#
#   ruby bench/restarts.rb                       every row
#   ROWS=kill,workers LINES=50000 ruby bench/restarts.rb
#
# Needs what the tests need (script/setup) and a built extension (rake compile).

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require_relative "../test/support/restart_scenario"
require_relative "../test/support/multi_worker_scenario"

LINES = Integer(ENV.fetch("LINES", "50000"))
WORKER_LINES = Integer(ENV.fetch("WORKER_LINES", "200000"))
ROWS = ENV.fetch("ROWS", "term-memory,term-file,term-throttled,int-faults,kill,reshard,workers").split(",")

THROTTLED = ["shard_limit 262144 1000"].freeze
# PutRecords calls that take 1.5 s (a slow network, or a throttled stream's retries): the stops
# land while a chunk's delivery is under way.
SLOW_CALLS = "always delay_ms 1500"
FAULTY = ["shard_limit 1048576 1000", "sometimes 0.02 status 500", "always partial_internal_failure 0.05"].freeze

def row(name, description)
  return unless ROWS.include?(name)

  started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  result = yield
  seconds = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
  printf("%-70s %s (%.0f s)\n", description, result, seconds)
  $stdout.flush
rescue StandardError => e
  printf("%-70s FAILED: %s\n", description, e.message.lines.first.strip)
end

def restart_row(name, description, lines: LINES, **options)
  row(name, description) do
    s = RestartScenario.new(kinesis: KINESIS, lines: lines, name: name, **options).start
    begin
      yield s
      r = s.finish
      stops = r.stops.map { |st| "#{st[:signal]} #{st[:seconds]}s#{st[:escalated] ? " (escalated)" : ""}" }.join(", ")
      kills = r.kills.map { |k| "#{k[:duplicates]} dup / #{k[:in_flight_user_records]} in flight" }.join("; ")
      "#{r.received}/#{r.written} received, #{r.lost} lost, #{r.duplicates} duplicates " \
        "(as the KCL sees it: #{r.kcl_lost} lost, #{r.kcl_duplicates} duplicates, #{r.kcl_dropped} aggregates dropped); " \
        "stops: #{stops}#{kills.empty? ? "" : "; per kill: #{kills}"}"
    ensure
      s.cleanup
    end
  end
end

KINESIS = LocalKinesis.new
at_exit { KINESIS.stop }
puts "restarts under load: #{LINES} Apache lines, partition_key host, 4 shards (real fluentd #{`git -C #{__dir__} rev-parse --short HEAD`.strip})"

restart_row("term-memory", "SIGTERM mid-stream, memory buffer, 1.5 s calls", faults: [SLOW_CALLS]) { |s| s.signal_mid_stream(:TERM) }
restart_row("term-file", "SIGTERM mid-stream, file buffer, 1.5 s calls, then restart", buffer: { type: "file" },
                                                                                   faults: [SLOW_CALLS]) { |s| s.signal_mid_stream(:TERM) }
restart_row("term-throttled", "SIGTERM mid-stream, memory buffer, shards at 256 KiB/s", faults: THROTTLED) { |s| s.signal_mid_stream(:TERM) }
restart_row("int-faults", "SIGINT 1.5 s after the last read, 1 MiB/s shards, 5 % entry failures, 2 % 500",
            lines: Integer(ENV.fetch("INT_LINES", "60000")), faults: FAULTY) { |s| s.signal_after_last_read(:INT) }
# Calls of 100 ms (a real network's latency): what is in flight at a kill is what a call carries,
# not what a 1.5 s stall piles up.
[["64k", ["aggregation_max_size 64k"]], ["1m (default)", []]].each do |size, lines|
  restart_row("kill", "3 x SIGKILL during delivery, file buffer, 256 KiB/s shards, 100 ms calls, #{size} aggregates",
              buffer: { type: "file" }, plugin: ["partition_key host", *lines],
              faults: THROTTLED + ["always delay_ms 100"]) do |s|
    s.kill_during_delivery(times: 3)
  end
end

restart_row("reshard", "a shard split mid-stream, 1.5 s calls (no stop): what a consumer without the KCL check sees",
            faults: [SLOW_CALLS]) do |s|
  s.split_mid_stream
end

row("workers", "#{WORKER_LINES} events, in_forward, 4 workers, SIGTERM mid-stream") do
  s = MultiWorkerScenario.new(kinesis: KINESIS, lines: WORKER_LINES, workers: 4, name: "w4-term", faults: [SLOW_CALLS])
  begin
    r = s.run(sigterm_at: 0.5)
    "#{r.received}/#{r.written} received, #{r.lost} lost, #{r.duplicates} duplicates, KCL-dropped #{r.kcl_dropped}; " \
      "stops: #{r.stops.map { |st| "#{st[:seconds]}s" }.join(", ")}"
  ensure
    s.cleanup
  end
end

if ROWS.include?("workers")
  [1, 4].each do |workers|
    row("workers", "#{WORKER_LINES} events, in_forward, #{workers} worker(s), no stop: throughput and CPU") do
      s = MultiWorkerScenario.new(kinesis: KINESIS, lines: WORKER_LINES, workers: workers, name: "w#{workers}")
      begin
        r = s.run
        format("%d/%d received, %d duplicates; %.0f records/s end to end, aggregator CPU %.1f us/record (%.1f s)",
               r.received, r.written, r.duplicates, r.records_per_second, r.cpu_us_per_record, r.cpu_seconds)
      ensure
        s.cleanup
      end
    end
  end
end

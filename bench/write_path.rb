# frozen_string_literal: true

# The write path alone, through fluentd's test driver (Fluent::Test::Driver::Output), for
# whichever `kinesis_streams_aggregated` the load path provides (run by bench/compare.rb once
# per plugin, each in its own process with its own RUBYLIB):
#
#   ruby bench/write_path.rb ENDPOINT STREAM RECORDS
#   ruby bench/write_path.rb - - RECORDS null     fluentd's own share: `@type null` with the
#                                                 same memory buffer (8 MiB chunks by tag)
#   ruby bench/write_path.rb - - RECORDS null-unbuffered   `@type null` without a buffer: the
#                                                 events go straight to its #process (the floor)
#
# The events are the apache2 parser's records of RECORDS bench lines, fed as in_tail emits them
# (event streams of 1,000) into the plugin's default memory buffer. First a warm-up of WARMUP
# more events (first-call costs: SDK clients, connections, shard maps) is fed and flushed, then
# two measured phases, each timed with the process CPU clock (every thread, the extension's
# included):
#   emit   feeding the events: the plugin's #format (if it has one) and buffering. #write is
#          held at a gate meanwhile, so no delivery overlaps this phase (only the feed calls
#          are timed, not the events' construction);
#   write  gate opened and the buffer flushed: fluentd's flush machinery and the plugin's
#          #write, until every chunk is written. Its minor page faults are counted too: each is
#          a fresh 4 KiB page the kernel allocates, zeroes and later frees, about 1.4 µs of
#          CPU on the 2-core bench VM (a mapping written once and unmapped, per page).
# Prints one JSON line with the results on stdout. WRITE_PATH_PLUGIN_CONF: extra lines for the
# plugin's configuration (bench/compare.rb's metrics column).
#
# STACKPROF_OUT=/tmp/wp samples both phases with stackprof (cpu mode, if it is installed) into
# /tmp/wp-emit.dump and /tmp/wp-write.dump (`stackprof --text FILE`); the CPU numbers then
# include the profiler's overhead. For the extension's own frames, run this under
# `perf record -g` with a build that keeps its symbols.

require "json"
require "fluent/test"
require "fluent/version"
require "fluent/test/driver/output"
require "fluent/plugin/parser_apache2"
require_relative "../test/support/apache_log"

Test::Unit::AutoRunner.need_auto_run = false

endpoint, stream, count, type = ARGV
count = Integer(count)
type ||= "kinesis_streams_aggregated"
WARMUP = 1000

# The driver keeps every #format result for assertions; a benchmark must not.
class BenchOutputDriver < Fluent::Test::Driver::Output
  def instance_hook_after_started; end
end

def cpu
  Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
end

def wall
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

# Minor page faults of the process so far (every thread): each is a fresh page the kernel
# allocated and zeroed. nil where /proc is not Linux's.
def minor_faults
  File.read("/proc/self/stat").split(") ", 2)[1].split[7].to_i
rescue StandardError
  nil
end

PROFILE_OUT = ENV["STACKPROF_OUT"]
require "stackprof" if PROFILE_OUT

def phase(name, &block)
  return block.call unless PROFILE_OUT

  StackProf.run(mode: :cpu, interval: 500, raw: true, out: "#{PROFILE_OUT}-#{name}.dump", &block)
end

Fluent::Test.setup
$log = Fluent::Log.new(ServerEngine::DaemonLogger.new($stderr, log_level: ServerEngine::DaemonLogger::WARN))

parser = Fluent::Plugin.new_parser("apache2")
parser.configure(Fluent::Config::Element.new("parse", "", {}, []))
# The events wait packed, one string per event stream of 1,000, and each stream is unpacked into
# the MultiEventStream in_tail would emit right before it is fed: 100k parsed events held live
# would make every major GC mark some 700k objects a real fluentd never has. Only the feed calls
# are timed.
packed_streams = lambda do |numbers|
  numbers.each_slice(1000).map do |slice|
    es = Fluent::MultiEventStream.new
    slice.each { |i| parser.parse(ApacheLog.line(i)) { |time, record| es.add(time, record) } }
    es.to_msgpack_stream.freeze
  end
end

def unpack(data)
  es = Fluent::MultiEventStream.new
  Fluent::MessagePackFactory.msgpack_unpacker.feed_each(data) { |time, record| es.add(time, record) }
  es
end

# Objects one unpacked event brings (time, record hash, 9 keys, string values), subtracted from
# the emit phase's allocation count.
OBJECTS_PER_UNPACKED_EVENT = begin
  sample = packed_streams.(0...1000).first
  before = GC.stat(:total_allocated_objects)
  unpack(sample)
  (GC.stat(:total_allocated_objects) - before) / 1000
end

warmup = packed_streams.(count...count + WARMUP)
slices = packed_streams.(0...count)

klass = Fluent::Plugin.new_output(type == "null-unbuffered" ? "null" : type).class
implementation = if type == "null" then "fluentd #{Fluent::VERSION} null output, buffered"
                 elsif type == "null-unbuffered" then "fluentd #{Fluent::VERSION} null output, unbuffered"
                 elsif defined?(FluentPluginKinesisRs::VERSION) then "fluent-plugin-kinesis-rs #{FluentPluginKinesisRs::VERSION}"
                 elsif defined?(FluentPluginKinesis::VERSION) then "fluent-plugin-kinesis #{FluentPluginKinesis::VERSION}"
                 else klass.name
                 end

driver = BenchOutputDriver.new(klass)
if type == "null-unbuffered"
  driver.configure("")
elsif type == "null"
  # out_null's own buffer defaults (10 KiB chunks) are for tests; use the memory buffer's.
  driver.configure(<<~CONF)
    <buffer tag>
      chunk_limit_size 8m
    </buffer>
  CONF
else
  driver.configure(<<~CONF)
    stream_name #{stream}
    region ap-northeast-1
    endpoint #{endpoint}
    aws_key_id AKIDBENCH
    aws_sec_key bench-secret
    #{ENV.fetch("WRITE_PATH_PLUGIN_CONF", "")}
  CONF
end
plugin = driver.instance

# #write waits while the current phase's gate (a queue) is open for pushing; closing it lets every
# write through. Each phase has its own gate, so a write of the warm-up never waits for the
# measured phase (and is never counted in it).
gate = [Queue.new]
plugin.singleton_class.prepend(Module.new do
  define_method(:write) do |chunk|
    g = gate[0]
    g.pop unless g.closed?
    super(chunk)
  end
end)

# No chunk staged, queued or being written: buffer.dequeued holds the chunks a flush thread took
# and is writing (dequeued_chunks only those awaiting a delayed commit). Always, without a buffer.
def settled?(plugin)
  return true unless plugin.buffer

  plugin.buffer.queue.empty? && plugin.buffer.stage.empty? && plugin.buffer.dequeued.empty? &&
    plugin.dequeued_chunks_mutex.synchronize { plugin.dequeued_chunks.empty? }
end

def flush_all(plugin, gate)
  gate.close
  plugin.force_flush
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 600
  sleep 0.01 until settled?(plugin) || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
  raise "the buffer was not flushed within 600 s (retry state: #{plugin.retry.inspect})" unless settled?(plugin)
end

result = { "implementation" => implementation, "records" => count, "warmup_records" => WARMUP }
driver.run(default_tag: "apache.access", flush: false, shutdown: false, timeout: 3600) do
  warmup.each { |data| driver.feed(unpack(data)) }
  flush_all(plugin, gate[0])
  gate[0] = Queue.new
  writes0 = plugin.write_count

  # Only the feed calls are timed: each stream is unpacked (not counted), then fed.
  GC.start
  gc0 = GC.stat
  emit_cpu = 0.0
  wall0 = wall
  phase("emit") do
    slices.each do |data|
      es = unpack(data)
      t = cpu
      driver.feed(es)
      emit_cpu += cpu - t
    end
  end
  cpu1 = cpu
  wall1 = wall
  gc1 = GC.stat
  faults1 = minor_faults

  phase("write") { flush_all(plugin, gate[0]) }
  cpu2 = cpu
  wall2 = wall
  gc2 = GC.stat
  faults2 = minor_faults

  result.merge!(
    "emit_cpu_s" => emit_cpu, "write_cpu_s" => cpu2 - cpu1,
    "emit_wall_s" => wall1 - wall0, "write_wall_s" => wall2 - wall1,
    "emit_gc_runs" => gc1[:count] - gc0[:count], "write_gc_runs" => gc2[:count] - gc1[:count],
    "emit_allocated_objects" => gc1[:total_allocated_objects] - gc0[:total_allocated_objects] - count * OBJECTS_PER_UNPACKED_EVENT,
    "write_allocated_objects" => gc2[:total_allocated_objects] - gc1[:total_allocated_objects],
    "write_minor_faults" => faults1 && faults2 && faults2 - faults1,
    "write_count" => plugin.write_count - writes0, "num_errors" => plugin.num_errors,
    "plugin_counters" => plugin.respond_to?(:kinesis_statistics) ? plugin.kinesis_statistics : nil
  )
end
driver.instance_shutdown
$stdout.puts JSON.generate(result)

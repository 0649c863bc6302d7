# frozen_string_literal: true

# The side-by-side benchmark: this plugin against the one it replaces, on this machine, in one run.
#
#   script/bench                         (builds the extension in release, then runs this)
#   LINES=200000 ROUNDS=5 SHARDS=16 WRITE_PATH_RECORDS=100000 ruby bench/compare.rb
#   PARTS=fluentd,write_path LINES=20000 ROUNDS=1 ruby bench/compare.rb      (a small run)
#
# It has five parts (PARTS picks them), each printing a table, then a summary of one line per
# figure the performance goals are stated in.
#
# fluentd (real fluentd processes, `--no-supervisor`, so the process measured is the worker),
# each tailing the same Apache access log (in_tail, apache2 parser, read_from_head):
#   floor         `@type null`: what fluentd costs without any Kinesis output;
#   floor+buffer  `@type null` with a memory buffer like the Kinesis outputs' (8 MiB chunks by
#                 tag, flushed every second, written nowhere): fluentd's own buffering cost,
#                 which every buffered output pays on top of the floor;
#   anchor        fluent-plugin-kinesis's `kinesis_streams_aggregated`, when it can be loaded;
#   ours          this gem's `kinesis_streams_aggregated`, with the very same <match> section.
# ROUNDS rounds, each running the four in that order (alternating, so that slow phases of a
# shared machine hit every column alike); each figure is the median over the rounds. Both Kinesis
# outputs talk to one local Kinesis (kinesalite on 127.0.0.1, started here) through
# bench/counting_proxy.rb, a separate process that counts every PutRecords call on the wire the
# same way for both. Each fluentd is started on an empty log, then the whole log is appended at
# once; the run ends when every line is delivered (proxy) or, for the floors, read (in_tail's pos
# file) and flushed. CPU is the fluentd process's utime+stime from /proc/<pid>/stat between those
# two moments; peak RSS is its VmHWM. Everything delivered is read back from kinesalite and
# deaggregated with the Python consumer library (aws_kinesis_agg), line numbers checked.
# Printed: CPU µs per record, above the buffered floor, peak RSS; PutRecords calls, Kinesis
# records per call, how many calls were full, PUT payload units against their minimum.
#
# write_path: bench/write_path.rb drives each plugin with fluentd's test driver (same events,
# same default buffer, same proxy), in its own process, and reports CPU per record for the
# emit/format phase and for the write phase separately; `@type null` without a buffer (floor)
# and with the same buffer (floor+buffer) go through the same steps, so what fluentd itself
# costs can be subtracted. ROUNDS rounds, alternating as above, medians. "ours+metrics" is ours
# with CloudWatch metrics on (detailed, per shard) against a local moto server, when moto is
# installed.
#
# shards: ours alone, in a real fluentd (in_tail as above), writing to streams of N shards
# through test/support/fault_proxy.rb, which limits every shard to 1 MiB/s and 1,000 records/s
# as Kinesis does (entries above that are throttled), for each N of SHARD_COUNTS (each N with a
# kinesalite and proxies of its own: kinesalite keeps every record in memory). The log is
# sized to take about SHARD_SECONDS at N MiB/s. The delivered rate is taken over the steady part:
# the middle 80% of the bytes delivered (from the call that brought the total past 10% to the one
# that brought it past 90%), and printed against N MiB/s; every line is read back. The proxies,
# kinesalite and fluentd share this machine's CPUs: fluentd's CPU use is printed so that a rate
# bound by CPU rather than by the shards shows.
#
# steady: anchor and ours in a real fluentd (in_tail as above, the same <match> with the default
# 1 s flush), the log appended at STEADY_RATE lines/s for STEADY_SECONDS, on a stream of SHARDS
# shards without any limit: PutRecords calls and how full they are on a steady stream (where a
# burst of LINES ends with a partial call, a steady stream has chunks coming every second), PUT
# payload units, peak RSS, every line read back. ROUNDS rounds, alternating, medians.
#
# outage: ours in a real fluentd with a memory buffer (total_limit_size OUTAGE_BUFFER, 8 MiB
# chunks, retries at most 5 s apart), behind the fault proxy answering every PutRecords call with
# HTTP 500 for OUTAGE_SECONDS, while lines are appended to the tailed log at a steady rate (by
# default enough to fill the buffer in a third of the outage). VmRSS and the buffer's bytes are
# sampled every 10 s; the buffer counts as full from the first sample by which it has refused an
# emit (fluentd logs BufferOverflowError's warning). Printed: the samples, and how much RSS grew
# after the buffer first filled (max over the outage's second half minus RSS at that first full
# sample; flat = at most one chunk). Then the fault is cleared and every
# line fluentd accepted (its output's emit_records; in_tail retries lines refused with
# BufferOverflowError, so in the end that is every line) must be delivered and read back.
#
# The two plugins register the same @type, so they never share a process or a load path.
#
# Environment:
#   PARTS               comma-separated, of fluentd, write_path, steady, shards, outage (default all)
#   ROUNDS              rounds of the fluentd and write_path parts (default 5): medians over them
#   LINES               log lines per fluentd run (default 200000)
#   SHARDS              shards of every stream but the shards part's (default 16, so that our
#                       per-shard rate limiter, 150% of 1 MiB/s, does not bound records/s)
#   WRITE_PATH_RECORDS  events per write_path run (default 100000)
#   SHARD_COUNTS        shard counts of the shards part (default 2,8,32)
#   SHARD_SECONDS       seconds each shards run should take at N MiB/s (default 25)
#   SHARD_LINE_BYTES    length of the shards part's log lines, their user agent padded to it
#                       (default: the usual lines, about 175 bytes). fluentd reads, parses and
#                       buffers each line in Ruby, under its lock, whatever the output: at 32
#                       MiB/s of 175-byte lines that is about 190,000 lines/s
#   STEADY_RATE         lines per second of the steady part (default 15000, about 3 MB/s of log)
#   STEADY_SECONDS      seconds the steady part appends them for (default 30)
#   OUTAGE_SECONDS      length of the outage (default 300; 0 skips the outage part)
#   OUTAGE_BUFFER       the outage run's total_limit_size (default 64m)
#   OUTAGE_RATE         lines per second appended during the outage (default: see above)
#   FLUENTD_LIB         fluentd's and serverengine's lib dirs (default /opt/serverengine/lib and
#                       /opt/fluentd/lib when both exist, else an installed fluentd gem)
#   ANCHOR_LIB          load path of the anchor, colon-separated (see below)
#   TIMEOUT             seconds one fluentd run may take to deliver everything (default 600)
#   KEEP                keep the runs' directories (config, log, fluentd's log)
#
# Getting the anchor (nothing of it is part of this repository, and nothing here downloads it):
# fluent-plugin-kinesis is published on GitHub as awslabs/aws-fluent-plugin-kinesis (also as
# the `fluent-plugin-kinesis` gem on rubygems.org); this bench was written against v3.6.1. It
# needs the AWS SDK for Ruby, published on GitHub as aws/aws-sdk-ruby with one directory per gem
# under gems/ (also as gems on rubygems.org): aws-sdk-kinesis, aws-sdk-core, aws-sigv4,
# aws-partitions and aws-eventstream (take all five from the same revision); plus jmespath and
# google-protobuf (Debian: ruby-jmespath, ruby-google-protobuf; they load from the system Ruby's
# path). ANCHOR_LIB lists the `lib` directories, in this order:
#   <plugin>/lib:<sdk>/gems/aws-sdk-core/lib:<sdk>/gems/aws-sdk-kinesis/lib:
#   <sdk>/gems/aws-sigv4/lib:<sdk>/gems/aws-partitions/lib:<sdk>/gems/aws-eventstream/lib
# Unset, it defaults to that layout with <plugin> = /opt/fluent-plugin-kinesis and
# <sdk> = /opt/aws-sdk-ruby. If the anchor cannot be loaded from there, its columns say
# "skipped" with a note saying why, and everything else runs. If the anchor is installed as a gem
# instead, point ANCHOR_LIB at the gems' lib directories.

require "etc"
require "json"
require "fileutils"
require "net/http"
require "open3"
require "rbconfig"
require "tmpdir"
require "uri"
require_relative "../test/support/apache_log"
require_relative "../test/support/fault_proxy"
require_relative "../test/support/fluentd_process"
require_relative "../test/support/local_kinesis"

module Bench
  ROOT = File.expand_path("..", __dir__)
  ALL_PARTS = %w[fluentd write_path steady shards outage].freeze
  PARTS = ENV.fetch("PARTS", ALL_PARTS.join(",")).split(",").map(&:strip).reject(&:empty?)
  ROUNDS = Integer(ENV.fetch("ROUNDS", "5"))
  LINES = Integer(ENV.fetch("LINES", "200000"))
  SHARDS = Integer(ENV.fetch("SHARDS", "16"))
  WRITE_PATH_RECORDS = Integer(ENV.fetch("WRITE_PATH_RECORDS", "100000"))
  SHARD_COUNTS = ENV.fetch("SHARD_COUNTS", "2,8,32").split(",").map { |n| Integer(n) }
  SHARD_SECONDS = Float(ENV.fetch("SHARD_SECONDS", "25"))
  SHARD_LINE_BYTES = ENV["SHARD_LINE_BYTES"]&.then { |n| Integer(n) }
  STEADY_RATE = Integer(ENV.fetch("STEADY_RATE", "15000"))
  STEADY_SECONDS = Integer(ENV.fetch("STEADY_SECONDS", "30"))
  OUTAGE_SECONDS = Integer(ENV.fetch("OUTAGE_SECONDS", "300"))
  OUTAGE_BUFFER = ENV.fetch("OUTAGE_BUFFER", "64m")
  OUTAGE_CHUNK = "8m"
  OUTAGE_SAMPLE_SECONDS = 10
  TIMEOUT = Integer(ENV.fetch("TIMEOUT", "600"))

  MIB = 1024 * 1024
  MAX_CALL_BYTES = 5 * MIB
  MAX_CALL_ENTRIES = 500
  MAX_RECORD_BYTES = MIB
  PAYLOAD_UNIT = 25 * 1024
  # Kinesis bytes per log line (the apache2 parser's record as JSON, plus aggregation and
  # partition key), about; only used to size the shards and outage runs.
  KINESIS_BYTES_PER_LOG_BYTE = 1.25
  FULL_CALL = "full = #{MAX_CALL_ENTRIES} Kinesis records, or >= #{MAX_CALL_BYTES / MIB - MAX_RECORD_BYTES / MIB} MiB " \
              "(within one 1 MiB record of the 5 MiB a call may carry: the next record might not have fit)"
  ANCHOR_DEFAULT = ["/opt/fluent-plugin-kinesis/lib"] +
                   %w[aws-sdk-core aws-sdk-kinesis aws-sigv4 aws-partitions aws-eventstream].map { |g| "/opt/aws-sdk-ruby/gems/#{g}/lib" }
  OUR_IMPLEMENTATION = /kinesis_streams_aggregated is (fluent-plugin-kinesis-rs [^\s]+)/

  module_function

  def part?(name)
    PARTS.include?(name) && !(name == "outage" && OUTAGE_SECONDS.zero?)
  end

  # [ruby + fluentd bin, load path dirs]
  def fluentd
    FluentdProcess.locate
  rescue FluentdProcess::NotFound => e
    abort "bench: #{e.message}"
  end

  # [load path dirs, nil] or [nil, why the anchor cannot run]
  def anchor_lib(fluentd_dirs)
    dirs = ENV["ANCHOR_LIB"] ? ENV["ANCHOR_LIB"].split(File::PATH_SEPARATOR).reject(&:empty?) : ANCHOR_DEFAULT.select { |d| File.directory?(d) }
    source = ENV["ANCHOR_LIB"] ? "ANCHOR_LIB=#{ENV["ANCHOR_LIB"]}" : "the default #{ANCHOR_DEFAULT.first} (+ /opt/aws-sdk-ruby/gems/*/lib)"
    return [nil, "#{source}: no such directories"] if dirs.empty?

    probe = 'require "fluent/plugin/out_kinesis_streams_aggregated"; require "aws-sdk-kinesis"; ' \
            'abort "another kinesis_streams_aggregated comes first on the path" unless defined?(FluentPluginKinesis::VERSION); ' \
            'print FluentPluginKinesis::VERSION, " (aws-sdk-core ", Aws::CORE_GEM_VERSION, ", aws-sdk-kinesis ", Aws::Kinesis::GEM_VERSION, ")"'
    out, err, status = Open3.capture3({ "RUBYLIB" => (dirs + fluentd_dirs).join(File::PATH_SEPARATOR) }, RbConfig.ruby, "-e", probe)
    unless status.success?
      why = err.lines.grep(/Error|error|abort/).first.to_s.sub(/\A.*?:in `[^']*': /, "").strip
      return [nil, "#{source} does not load (#{why.empty? ? err.strip : why})"]
    end

    [dirs, out]
  end

  def proc_cpu_seconds(pid)
    fields = File.read("/proc/#{pid}/stat").sub(/\A.*\) /m, "").split
    # After "pid (comm) ": state is field 3, utime field 14, stime field 15.
    (fields[11].to_i + fields[12].to_i).to_f / Etc.sysconf(Etc::SC_CLK_TCK)
  end

  # CPU seconds the whole machine has been busy (every process, every CPU), from /proc/stat.
  def machine_busy_seconds
    user, nice, system, _idle, _iowait, irq, softirq, steal = File.read("/proc/stat")[/\Acpu\s+(.*)$/, 1].split.map(&:to_i)
    (user + nice + system + irq + softirq + steal.to_i).to_f / Etc.sysconf(Etc::SC_CLK_TCK)
  end

  # A memory figure of /proc/<pid>/status in KiB: "VmHWM" (peak RSS), "VmRSS".
  def proc_status_kib(pid, field)
    File.read("/proc/#{pid}/status")[/^#{field}:\s+(\d+) kB/, 1].to_i
  end

  def now
    Process.clock_gettime(Process::CLOCK_REALTIME)
  end

  def http_json(url)
    JSON.parse(Net::HTTP.get(URI(url)))
  end

  # "64m" -> bytes, as fluentd reads sizes.
  def size_bytes(text)
    match = text.to_s.downcase.match(/\A(\d+)([kmg]?)\z/)
    raise ArgumentError, "not a size: #{text.inspect}" unless match

    number, unit = match.captures
    Integer(number) * { "" => 1, "k" => 1024, "m" => MIB, "g" => 1024 * MIB }.fetch(unit)
  end

  def payload_units(bytes)
    (bytes + PAYLOAD_UNIT - 1) / PAYLOAD_UNIT
  end

  # The fewest PUT payload units `bytes` can be sent in: cut into whole 1 MiB records and a
  # last, smaller one.
  def min_payload_units(bytes)
    (bytes / MAX_RECORD_BYTES) * payload_units(MAX_RECORD_BYTES) + payload_units(bytes % MAX_RECORD_BYTES)
  end

  # The median of the numbers (the mean of the middle two for an even count); nil for none.
  def median(values)
    sorted = values.compact.sort
    return nil if sorted.empty?

    mid = sorted.size / 2
    sorted.size.odd? ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2.0
  end

  def fmt(value, digits = 0)
    return "-" if value.nil?
    return value if value.is_a?(String)

    s = format("%.#{digits}f", value)
    int, frac = s.split(".")
    int = int.delete("-").reverse.scan(/\d{1,3}/).join(",").reverse.prepend(int.start_with?("-") ? "-" : "")
    frac ? "#{int}.#{frac}" : int
  end

  def table(title, columns, rows, notes = [])
    puts
    puts "== #{title}"
    width = [rows.map { |r| r[0].size }.max, 10].max
    cell_width = [16, *columns.map(&:size)].max
    puts "#{" " * width}  #{columns.map { |c| c.rjust(cell_width) }.join(" ")}"
    rows.each { |label, *cells| puts "#{label.ljust(width)}  #{cells.map { |c| fmt(c).rjust(cell_width) }.join(" ")}" }
    notes.each { |n| puts "(#{n})" }
  end

  # One row of a table whose columns are a series of runs each: `series` maps a column to its
  # runs (an Array of result hashes, one per round), or to a String saying why it has none. The
  # block turns the runs (and the column's name) into a cell (a number is printed with `digits`
  # decimals).
  def row(label, series, columns, digits = 2)
    cells = columns.map do |c|
      runs = series[c]
      next "skipped" unless runs.is_a?(Array)

      v = yield runs, c
      v.is_a?(Numeric) ? fmt(v, digits) : v
    end
    [label, *cells]
  end

  # "name value, name value, ..." over the columns of `series` (as in #row): for summary lines.
  def per_column(series, digits = 2, separator: ", ")
    series.map { |name, runs| "#{name} #{runs.is_a?(Array) ? fmt(yield(runs), digits) : "skipped"}" }.join(separator)
  end

  # Notes under a table for the columns that have no runs.
  def skipped_notes(series)
    series.select { |_, runs| runs.is_a?(String) }.map { |name, why| "#{name} skipped: #{why}" }
  end
end

# bench/counting_proxy.rb, a separate process in front of `upstream`.
class CountingProxy
  attr_reader :endpoint

  def pid
    @wait.pid
  end

  def initialize(upstream)
    @stdin, @stdout, @wait = Open3.popen2(RbConfig.ruby, File.join(__dir__, "counting_proxy.rb"), upstream)
    line = @stdout.gets or abort "bench: the counting proxy did not start"
    @endpoint = "http://127.0.0.1:#{JSON.parse(line).fetch("port")}"
  end

  def stats(stream)
    Bench.http_json("#{@endpoint}/__bench/stats")["streams"].fetch(stream, {})
  end

  # [[time, bytes delivered], ...], one per call that delivered anything.
  def calls(stream)
    Bench.http_json("#{@endpoint}/__bench/calls?stream=#{URI.encode_www_form_component(stream)}")
  end

  def stop
    @stdin.close unless @stdin.closed?
    @wait.join(5)
  end
end

# The Kinesis side: a kinesalite of its own and the counting proxy in front of it, with (fault:
# true) test/support/fault_proxy.rb in between: fluentd -> counting proxy -> fault proxy ->
# kinesalite. kinesalite keeps every record in memory, so the parts that send the most each have
# their own.
class BenchKinesis
  attr_reader :kinesis, :proxy, :fault

  def initialize(fault: false)
    @kinesis = LocalKinesis.new
    @fault = FaultProxy.new(@kinesis.endpoint) if fault
    @proxy = CountingProxy.new((@fault || @kinesis).endpoint)
  end

  # Yields a new BenchKinesis and stops it after.
  def self.open(fault: false)
    bk = new(fault: fault)
    yield bk
  ensure
    bk&.stop
  end

  def endpoint
    @proxy.endpoint
  end

  def create_stream(name, shards)
    @kinesis.create_stream(name, shards)
  end

  # The processes on the Kinesis side: {"kinesalite" => pid, "fault proxy" => pid, "counting proxy" => pid}.
  def pids
    { "kinesalite" => @kinesis.pid, "fault proxy" => @fault&.pid, "counting proxy" => @proxy.pid }.compact
  end

  def stop
    @proxy.stop
    @fault&.stop
    @kinesis.stop
  end

  # {"read", "unique", "duplicates", "missing", "kinesis_records", "kcl_dropped"}
  def read_back(stream, expected)
    got = @kinesis.read(stream)
    numbers = got["records"].map { |r| ApacheLog.number(r["data"]) }
    unique = numbers.compact.uniq
    { "read" => numbers.size, "unique" => unique.size, "duplicates" => numbers.size - unique.size,
      "missing" => expected - (unique & (0...expected).to_a).size, "kinesis_records" => got["kinesis_records"],
      "kcl_dropped" => got["kcl_dropped_aggregates"], "expected" => expected }
  end

  def self.all_back?(read_back)
    read_back["unique"] == read_back["expected"] && read_back["duplicates"].zero? && read_back["kcl_dropped"].zero?
  end

  # Table cells of the read-backs of several runs: "unique/expected" (with " !" unless every one
  # was complete), and "duplicates, missing, KCL-dropped".
  def self.read_back_cell(read_backs)
    "#{read_backs.sum { |b| b["unique"] }}/#{read_backs.sum { |b| b["expected"] }}" + (read_backs.all? { |b| all_back?(b) } ? "" : " !")
  end

  def self.problems_cell(read_backs)
    %w[duplicates missing kcl_dropped].map { |k| read_backs.sum { |b| b[k] } }.join(", ")
  end
end

# One fluentd process (test/support/fluentd_process.rb, `--no-supervisor`): in_tail (apache2) of
# its own, initially empty, access.log -> the given <match> body; monitor_agent for the output's
# counters.
class FluentdRun
  attr_reader :name, :pid, :log_path, :implementation

  def initialize(name, match_body, load_path, command)
    @name = name
    @match_body = match_body
    @load_path = load_path
    @command = command
    @dir = Dir.mktmpdir("bench-#{name.tr("^a-z0-9", "-")}")
    @log_path = File.join(@dir, "access.log")
  end

  def start
    File.write(@log_path, "")
    config = <<~CONF
      #{FluentdProcess.tail_source(log: @log_path)}
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{FluentdProcess.free_port}
      </source>
      <match apache.access>
        #{@match_body.gsub("\n", "\n  ")}
      </match>
    CONF
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false, load_path: @load_path,
                                  command: @command, name: "fluentd (#{@name})")
    @pid = @fluentd.start.pid
    begin
      @fluentd.wait_until_running(120)
    rescue FluentdProcess::Error => e
      raise "fluentd (#{@name}) did not start: #{e.message}"
    end
    @implementation = @fluentd.log_text[Bench::OUR_IMPLEMENTATION, 1]
    self
  end

  def append(text)
    File.open(@log_path, "a") { |f| f.write(text) }
  end

  # Appends the first `bytes` bytes of the file at `path`, in one write.
  def append_file(path, bytes)
    File.open(path, "rb") { |src| File.open(@log_path, "ab") { |dst| IO.copy_stream(src, dst, bytes) } }
  end

  def cpu_seconds
    Bench.proc_cpu_seconds(@pid)
  end

  def memory_kib(field)
    Bench.proc_status_kib(@pid, field)
  end

  def output
    @fluentd.monitor_plugins.find { |p| p["plugin_category"] == "output" }
  end

  # The bytes of access.log in_tail has read, per its pos file.
  def read_position
    line = File.read("#{@log_path}.pos").lines.find { |l| l.start_with?("#{@log_path}\t") }
    line ? line.split("\t")[1].to_i(16) : 0
  rescue Errno::ENOENT
    0
  end

  # Every byte of access.log read, and (with a buffer) `records` events in the buffer and the
  # buffer empty again. monitor_agent is asked at most every MONITOR_POLL seconds: each request
  # costs the measured process about 1.5 ms of CPU.
  MONITOR_POLL = 0.5

  def read_and_flushed?(records)
    return false if read_position < File.size(@log_path)
    return true unless @match_body.include?("<buffer")
    return false if @polled_at && Bench.now - @polled_at < MONITOR_POLL

    @polled_at = Bench.now
    out = output
    out["emit_records"] >= records && out["buffer_total_queued_size"].zero?
  end

  # Polls the block every 0.1 s until it returns a truthy value, which it returns; nil after
  # `timeout` seconds. Raises if fluentd exits meanwhile.
  def wait_for(timeout = Bench::TIMEOUT)
    deadline = Bench.now + timeout
    loop do
      value = yield
      return value if value
      return nil if Bench.now > deadline
      raise "fluentd (#{@name}) exited before it was done:\n#{log_tail}" unless @fluentd.alive?

      sleep 0.1
    end
  end

  def log_tail
    @fluentd ? @fluentd.log_tail(3000) : "(no log)"
  end

  def log_includes?(text)
    @fluentd.log_text.include?(text)
  end

  def stop
    @fluentd&.stop(timeout: 120)
  end

  def cleanup
    FileUtils.rm_rf(@dir) unless ENV["KEEP"]
  end
end

# Starts a FluentdRun, yields it, and stops and removes it whatever happens.
def with_fluentd(ctx, name, match, load_path)
  run = FluentdRun.new(name, match, load_path, ctx.command)
  run.start
  yield run
ensure
  run&.stop
  run&.cleanup
end

# What the parts share: fluentd, the load paths, the Kinesis side, the summary lines.
Context = Struct.new(:command, :fluentd_dirs, :ours_lib, :anchor_dirs, :anchor_why, :bk, :summary, keyword_init: true) do
  def anchor_load_path
    anchor_dirs && anchor_dirs + fluentd_dirs
  end

  # The first element of every series of runs: an empty list, or why the anchor has none.
  def anchor_runs
    anchor_dirs ? [] : anchor_why
  end
end

# The <match> body of both Kinesis outputs; `buffer`: lines for its <buffer> section.
def kinesis_match(stream, endpoint, buffer: "flush_interval 1s")
  <<~MATCH.chomp
    @type kinesis_streams_aggregated
    stream_name #{stream}
    region ap-northeast-1
    endpoint #{endpoint}
    aws_key_id AKIDBENCH
    aws_sec_key bench-secret
    <buffer>
      #{buffer.gsub("\n", "\n  ")}
    </buffer>
  MATCH
end

FLOOR_MATCHES = { "floor" => "@type null",
                  "floor+buffer" => "@type null\n<buffer tag>\n  chunk_limit_size 8m\n  flush_interval 1s\n</buffer>" }.freeze

# Runs `series`' columns once each per round, in order; a column whose run raises is an error
# for ours and the floors, and for the anchor becomes the reason it has no figures.
def alternate_rounds(series)
  Bench::ROUNDS.times do |round|
    series.each_key do |name|
      next unless series[name].is_a?(Array)

      begin
        series[name] << yield(name, round)
      rescue StandardError => e
        raise unless name == "anchor"

        series[name] = "failed in round #{round + 1}: #{e.message.lines.first.to_s.strip}"
      end
    end
  end
  series
end

# ---- part fluentd ------------------------------------------------------------------------------

# One fluentd run of `log_text`, from the moment it is appended until every line is delivered
# (stream) or read and flushed (floors).
def measure_fluentd(ctx, name, match, load_path, log_text, stream)
  with_fluentd(ctx, name, match, load_path) { |run| measure_fluentd_run(ctx, run, name, log_text, stream) }
end

def measure_fluentd_run(ctx, run, name, log_text, stream)
  if name == "ours" && run.implementation.nil?
    abort "bench: the 'ours' fluentd did not log our implementation line; check #{ctx.ours_lib.first}:\n#{run.log_tail}"
  elsif name == "anchor" && run.implementation
    abort "bench: the 'anchor' fluentd loaded #{run.implementation} instead of fluent-plugin-kinesis"
  end
  cpu0 = run.cpu_seconds
  t0 = Bench.now
  run.append(log_text)
  finished_at = run.wait_for do
    if stream
      s = ctx.bk.proxy.stats(stream)
      s["user_records_ok"].to_i >= Bench::LINES && s["last_ok_at"]
    else
      run.read_and_flushed?(Bench::LINES) && Bench.now
    end
  end
  result = { "complete" => !finished_at.nil?, "seconds" => (finished_at || Bench.now) - t0, "cpu_s" => run.cpu_seconds - cpu0,
             "vm_hwm_kib" => run.memory_kib("VmHWM"), "monitor" => run.output }
  warn "bench: #{name} did not deliver every line within #{Bench::TIMEOUT} s; fluentd log tail:\n#{run.log_tail}" unless result["complete"]
  run.stop
  if stream
    result["wire"] = ctx.bk.proxy.stats(stream)
    result["read_back"] = ctx.bk.read_back(stream, Bench::LINES)
  end
  result
end

def fluentd_part(ctx)
  log_text = ApacheLog.text(Bench::LINES)
  puts "bench: fluentd part: log of #{Bench.fmt(Bench::LINES)} lines, #{Bench.fmt(log_text.bytesize / 1e6, 1)} MB " \
       "(#{Bench.fmt(log_text.bytesize.to_f / Bench::LINES)} bytes a line), #{Bench::ROUNDS} round(s)"
  load_paths = { "floor" => ctx.fluentd_dirs, "floor+buffer" => ctx.fluentd_dirs, "anchor" => ctx.anchor_load_path, "ours" => ctx.ours_lib }
  series = { "floor" => [], "floor+buffer" => [], "anchor" => ctx.anchor_runs, "ours" => [] }
  alternate_rounds(series) do |name, round|
    if FLOOR_MATCHES.key?(name)
      measure_fluentd(ctx, name, FLOOR_MATCHES[name], load_paths[name], log_text, nil)
    else
      stream = ctx.bk.create_stream("bench-#{name}-#{round}", Bench::SHARDS)
      measure_fluentd(ctx, name, kinesis_match(stream, ctx.bk.endpoint), load_paths[name], log_text, stream)
    end
  end
  report_fluentd_cpu(ctx, series)
  report_calls(ctx, series)
end

# CPU µs per record of each run, and of each run above its round's floor+buffer.
def cpu_us(run)
  run["cpu_s"] * 1e6 / Bench::LINES
end

def above_buffered_floor(series, name)
  runs = series[name]
  floors = series["floor+buffer"]
  return nil unless runs.is_a?(Array) && floors.is_a?(Array)

  Bench.median(runs.zip(floors).map { |r, f| cpu_us(r) - cpu_us(f) if r && f })
end

def report_fluentd_cpu(ctx, series)
  columns = series.keys
  row = ->(label, digits = 2, &f) { Bench.row(label, series, columns, digits, &f) }
  rows = [
    row.("CPU µs per record") { |runs| Bench.median(runs.map { |r| cpu_us(r) }) },
    row.("  above floor+buffer") { |_, name| name.start_with?("floor") ? "-" : above_buffered_floor(series, name) },
    row.("records/s", 0) { |runs| Bench.median(runs.map { |r| Bench::LINES / r["seconds"] }) },
    row.("seconds (appended -> delivered)") { |runs| Bench.median(runs.map { |r| r["seconds"] }) },
    row.("peak RSS MiB (VmHWM)", 1) { |runs| Bench.median(runs.map { |r| r["vm_hwm_kib"] / 1024.0 }) },
    row.("runs complete") { |runs| "#{runs.count { |r| r["complete"] }} of #{runs.size}" }
  ]
  # Each measured column's value of every round, one decimal.
  every_round = lambda do |value|
    series.select { |_, runs| runs.is_a?(Array) }
          .map { |name, runs| "#{name} #{runs.map { |r| Bench.fmt(value.(r), 1) }.join(", ")}" }.join("; ")
  end
  every = every_round.(->(r) { cpu_us(r) })
  every_rss = every_round.(->(r) { r["vm_hwm_kib"] / 1024.0 })
  Bench.table("fluentd in_tail (apache2) -> output: CPU and memory, #{Bench.fmt(Bench::LINES)} lines, " \
              "median of #{Bench::ROUNDS} round(s)", columns, rows,
              ["CPU = the fluentd process's utime+stime from the log's append to the last line delivered (read and flushed for the floors); " \
               "above floor+buffer = median over the rounds of the run's CPU minus its round's floor+buffer's",
               "every round, CPU µs per record: #{every}", "every round, peak RSS MiB: #{every_rss}", *Bench.skipped_notes(series)])
  ours = above_buffered_floor(series, "ours")
  anchor = above_buffered_floor(series, "anchor")
  ctx.summary << "(a) fluentd CPU µs per record: " + Bench.per_column(series) { |runs| Bench.median(runs.map { |r| cpu_us(r) }) } +
                 "; above floor+buffer: ours #{Bench.fmt(ours, 2)}, " +
                 (anchor ? "anchor #{Bench.fmt(anchor, 2)} (anchor/ours #{ratio_text(anchor, ours)})" : "anchor skipped")
  ctx.summary << "(d) peak RSS MiB (VmHWM), median: " + Bench.per_column(series, 1) { |runs| Bench.median(runs.map { |r| r["vm_hwm_kib"] / 1024.0 }) }
end

def ratio_text(numerator, denominator)
  numerator && denominator&.positive? ? "#{Bench.fmt(numerator / denominator, 2)}x" : "-"
end

# Figures of one run's PutRecords calls (the counting proxy's stats of its stream).
def call_figures(wire)
  calls = wire["calls"].to_i
  per_call = ->(key) { calls.positive? ? wire[key].to_f / calls : nil }
  min_units = Bench.min_payload_units(wire["delivered_bytes"].to_i)
  { "calls" => calls, "entries_per_call" => per_call.("entries"), "users_per_call" => per_call.("user_records"),
    "bytes_per_call" => per_call.("bytes"), "full_pct" => calls.positive? ? 100.0 * wire["full_calls"] / calls : nil,
    # The run's last call takes what is left when the log ends; a steady stream has no last call.
    "full_pct_but_last" => calls > 1 ? 100.0 * (wire["full_calls"] - wire["last_call_full"].to_i) / (calls - 1) : nil,
    "max_call_bytes" => wire["max_call_bytes"], "units" => wire["delivered_payload_units"], "min_units" => min_units,
    "units_ratio" => min_units.positive? ? wire["delivered_payload_units"].to_f / min_units : nil,
    "failed_entries" => wire["failed_entries"], "http_errors" => wire["http_errors"] }
end

def report_calls(ctx, series)
  kinesis = series.slice("anchor", "ours")
  columns = kinesis.keys
  median_of = ->(key) { proc { |runs| Bench.median(runs.map { |r| call_figures(r["wire"])[key] }) } }
  sum_of = ->(key) { proc { |runs| runs.sum { |r| r["wire"][key].to_i } } }
  row = ->(label, digits, f) { Bench.row(label, kinesis, columns, digits, &f) }
  rows = [
    row.("PutRecords calls", 0, median_of.("calls")),
    row.("Kinesis records per call (mean)", 2, median_of.("entries_per_call")),
    row.("user records per call (mean)", 1, median_of.("users_per_call")),
    row.("bytes per call (mean)", 0, median_of.("bytes_per_call")),
    row.("calls full, %", 1, median_of.("full_pct")),
    row.("  the run's last call aside, %", 1, median_of.("full_pct_but_last")),
    row.("largest call bytes", 0, median_of.("max_call_bytes")),
    row.("PUT payload units delivered", 0, median_of.("units")),
    row.("  minimum for the same bytes", 0, median_of.("min_units")),
    row.("  delivered / minimum", 3, median_of.("units_ratio")),
    row.("failed entries, all rounds", 0, sum_of.("failed_entries")),
    row.("HTTP errors, all rounds", 0, sum_of.("http_errors")),
    row.("read back, all rounds", 0, proc { |runs| BenchKinesis.read_back_cell(runs.map { |r| r["read_back"] }) }),
    row.("  duplicates, missing, KCL-dropped", 0, proc { |runs| BenchKinesis.problems_cell(runs.map { |r| r["read_back"] }) })
  ]
  Bench.table("PutRecords calls (counting proxy), #{Bench.fmt(Bench::LINES)} lines, median of #{Bench::ROUNDS} round(s)",
              columns, rows,
              ["a call is #{Bench::FULL_CALL}",
               "PUT payload units: one per started 25 KiB of each delivered Kinesis record (data + partition key); the minimum is " \
               "what the same bytes would cost cut into full 1 MiB records (41 units each) and one last smaller record",
               *Bench.skipped_notes(kinesis)])
  report_own_counters(series["ours"])
  ctx.summary << "(b) PutRecords calls, median: " + Bench.per_column(kinesis, separator: "; ") { |runs|
    "#{Bench.fmt(median_of.("calls").(runs))} calls, #{Bench.fmt(median_of.("entries_per_call").(runs), 1)} records/call, " \
      "#{Bench.fmt(median_of.("full_pct").(runs), 1)} % full (#{Bench.fmt(median_of.("full_pct_but_last").(runs), 1)} % but the last)"
  }
  ctx.summary << "(c) PUT payload units / minimum, median: " + Bench.per_column(kinesis, 3, &median_of.("units_ratio"))
  ctx.summary << "    every line read back once (fluentd part): " +
                 Bench.per_column(kinesis) { |runs| runs.all? { |r| BenchKinesis.all_back?(r["read_back"]) } ? "yes" : "NO" }
end

# Ours' own counters (monitor_agent) against what the proxy saw, each round.
def report_own_counters(runs)
  agree = runs.count do |r|
    m = r["monitor"]
    w = r["wire"]
    [m["kinesis_requests"], m["kinesis_kinesis_records"], m["kinesis_bytes_delivered"], m["kinesis_put_payload_units"]] ==
      [w["calls"], w["entries"], w["bytes"], w["payload_units"]]
  end
  m = runs.last["monitor"]
  puts "ours, own counters (monitor_agent, last round): requests #{m["kinesis_requests"]}, kinesis_records #{m["kinesis_kinesis_records"]}, " \
       "delivered #{m["kinesis_delivered"]}, bytes #{m["kinesis_bytes_delivered"]}, payload units #{m["kinesis_put_payload_units"]}, " \
       "retried #{m["kinesis_retried_entries"]}, rate limiter waited #{m["kinesis_rate_limited_ms"]} ms, fluentd write_count #{m["write_count"]}"
  puts "ours, own counters agree with the proxy (calls, entries, bytes, payload units) in #{agree} of #{runs.size} round(s)"
end

# ---- part write_path ---------------------------------------------------------------------------

# One bench/write_path.rb process. null: the floors' mode ("null-unbuffered", "null");
# plugin_conf: extra lines for the plugin's configuration.
def write_path(ctx, name, load_path, round, null: nil, plugin_conf: "")
  args = if null then ["-", "-", Bench::WRITE_PATH_RECORDS.to_s, null]
         else
           stream = ctx.bk.create_stream("bench-write-path-#{name.tr("^a-z", "-")}-#{round}", Bench::SHARDS)
           [ctx.bk.endpoint, stream, Bench::WRITE_PATH_RECORDS.to_s]
         end
  env = { "RUBYLIB" => load_path.join(File::PATH_SEPARATOR), "WRITE_PATH_PLUGIN_CONF" => plugin_conf }
  out, status = Open3.capture2(env, RbConfig.ruby, File.join(__dir__, "write_path.rb"), *args)
  raise "bench/write_path.rb (#{name}) failed: #{status}" unless status.success?

  result = JSON.parse(out.lines.last)
  return result unless stream

  result["wire"] = ctx.bk.proxy.stats(stream)
  result["read_back"] = ctx.bk.read_back(stream, result["records"] + result["warmup_records"])
  result
end

# The write path again with CloudWatch metrics at their most expensive (detailed, per shard),
# sent to a local moto server; [nil, why] when moto is not installed.
def metrics_plugin_conf
  require_relative "../test/support/moto_server"
  return [nil, MotoServer.missing] if MotoServer.missing

  moto = MotoServer.shared
  [<<~CONF, nil]
    metrics_level detailed
    metrics_granularity shard
    metrics_endpoint #{moto.endpoint}
    metrics_request_compression false
  CONF
end

def write_path_part(ctx)
  metrics_conf, no_metrics = metrics_plugin_conf
  series = { "floor" => [], "floor+buffer" => [], "anchor" => ctx.anchor_runs, "ours" => [], "ours+metrics" => metrics_conf ? [] : no_metrics }
  alternate_rounds(series) do |name, round|
    case name
    when "floor" then write_path(ctx, name, ctx.fluentd_dirs, round, null: "null-unbuffered")
    when "floor+buffer" then write_path(ctx, name, ctx.fluentd_dirs, round, null: "null")
    when "anchor" then write_path(ctx, name, ctx.anchor_load_path, round)
    when "ours" then write_path(ctx, name, ctx.ours_lib, round)
    when "ours+metrics" then write_path(ctx, name, ctx.ours_lib, round, plugin_conf: metrics_conf)
    end
  end
  report_write_path(ctx, series)
end

# CPU µs per record of a write path run: emit and write phases.
def phase_us(r, key)
  r[key] * 1e6 / r["records"]
end

# CPU µs per record of the plugin itself: each phase minus its round's buffered null's. The emit
# phase of a plugin without #format runs only fluentd code, the same as null's; its difference to
# null's is noise (GC timing, neighbours), so a negative one counts as 0 rather than being taken
# off the write phase.
def plugin_own_us(r, null)
  [phase_us(r, "emit_cpu_s") - phase_us(null, "emit_cpu_s"), 0].max + phase_us(r, "write_cpu_s") - phase_us(null, "write_cpu_s")
end

def report_write_path(ctx, series)
  n = Bench::WRITE_PATH_RECORDS
  columns = series.keys
  floors = series["floor+buffer"]
  median = ->(runs, &f) { Bench.median(runs.map(&f)) }
  own = proc do |runs, name|
    next "-" if name.start_with?("floor")

    Bench.median(runs.zip(floors).map { |r, null| plugin_own_us(r, null) if r && null })
  end
  total = ->(r) { phase_us(r, "emit_cpu_s") + phase_us(r, "write_cpu_s") }
  wire = ->(runs, &f) { runs.first["wire"] ? f.(runs) : "-" }
  figures = ->(runs, key) { Bench.median(runs.map { |r| call_figures(r["wire"])[key] }) }
  rows = [
    ["emit/format CPU µs per record", 2, proc { |runs| median.(runs) { |r| phase_us(r, "emit_cpu_s") } }],
    ["write CPU µs per record", 2, proc { |runs| median.(runs) { |r| phase_us(r, "write_cpu_s") } }],
    ["total CPU µs per record", 2, proc { |runs| median.(runs, &total) }],
    ["  above floor+buffer (the plugin's own)", 2, own],
    ["write wall s", 2, proc { |runs| median.(runs) { |r| r["write_wall_s"] } }],
    ["write phase page faults per 100 records", 1, proc { |runs| r0 = runs.first; r0["write_minor_faults"] ? median.(runs) { |r| r["write_minor_faults"] * 100.0 / n } : "-" }],
    ["Ruby objects allocated per record", 1, proc { |runs| median.(runs) { |r| (r["emit_allocated_objects"] + r["write_allocated_objects"]).to_f / n } }],
    ["fluentd write calls (chunks)", 0, proc { |runs| median.(runs) { |r| r["write_count"] } }],
    ["PutRecords calls", 0, proc { |runs| wire.(runs) { figures.(runs, "calls") } }],
    ["Kinesis records per call (mean)", 2, proc { |runs| wire.(runs) { figures.(runs, "entries_per_call") } }],
    ["calls full, %", 1, proc { |runs| wire.(runs) { figures.(runs, "full_pct") } }],
    ["read back, all rounds", 0, proc { |runs| wire.(runs) { BenchKinesis.read_back_cell(runs.map { |r| r["read_back"] }) } }],
    ["  duplicates, missing, KCL-dropped", 0, proc { |runs| wire.(runs) { BenchKinesis.problems_cell(runs.map { |r| r["read_back"] }) } }]
  ].map { |label, digits, f| Bench.row(label, series, columns, digits, &f) }
  every = series.select { |_, runs| runs.is_a?(Array) }
                .map { |name, runs| "#{name} #{runs.map { |r| "#{Bench.fmt(phase_us(r, "emit_cpu_s"), 2)}+#{Bench.fmt(phase_us(r, "write_cpu_s"), 2)}" }.join(", ")}" }.join("; ")
  Bench.table("write path only: fluentd test driver, #{Bench.fmt(n)} apache2 records, default memory buffer, " \
              "median of #{Bench::ROUNDS} round(s)", columns, rows,
              ["after a warm-up of 1,000 records: emit/format = feeding event streams of 1,000 with #write held back; " \
               "write = flushing every chunk; process CPU clock, all threads; PutRecords and read-back include the warm-up",
               "floor = `@type null` unbuffered, floor+buffer = with the same buffer as the plugins; above floor+buffer = " \
               "median over the rounds of emit and write each minus that round's floor+buffer's, a negative emit difference counted as 0",
               "every round, emit+write µs per record: #{every}", *Bench.skipped_notes(series)])
  ours = own.(series["ours"], "ours")
  anchor = series["anchor"].is_a?(Array) ? own.(series["anchor"], "anchor") : nil
  ctx.summary << "(a) write path CPU µs per record: " +
                 Bench.per_column(series.slice("floor", "floor+buffer", "anchor", "ours")) { |runs| median.(runs, &total) } +
                 "; above floor+buffer: ours #{Bench.fmt(ours, 2)}, " +
                 (anchor ? "anchor #{Bench.fmt(anchor, 2)} (anchor/ours #{ratio_text(anchor, ours)})" : "anchor skipped")
end

# ---- part shards -------------------------------------------------------------------------------

# Delivered MiB/s over the middle 80% of the bytes: between the call that took the running total
# past 10% and the one that took it past 90%, counting the bytes of the calls after the first up
# to the second. Also [first to last call]. nil when there are too few calls.
def steady_rate(calls)
  calls = calls.sort_by(&:first)
  total = calls.sum(&:last)
  return [nil, nil] if calls.size < 3 || total.zero?

  running = 0
  cumulative = calls.map { |t, bytes| [t, running += bytes] }
  i10 = cumulative.index { |_, c| c >= 0.1 * total }
  i90 = cumulative.index { |_, c| c >= 0.9 * total }
  middle = i90 > i10 ? (cumulative[i90][1] - cumulative[i10][1]) / (cumulative[i90][0] - cumulative[i10][0]) / Bench::MIB : nil
  whole = (total - calls.first.last) / (calls.last.first - calls.first.first) / Bench::MIB
  [middle, whole]
end

# Writes a log of as many lines as the largest of `counts` to `path`, in slices; returns
# {count => bytes of its first `count` lines}.
def write_log_file(path, counts, **fields)
  offsets = {}
  File.open(path, "wb") do |f|
    from = 0
    counts.uniq.sort.each do |upto|
      (from...upto).each_slice(100_000) { |slice| f.write(ApacheLog.text(slice.first..slice.last, **fields)) }
      offsets[upto] = f.pos
      from = upto
    end
  end
  offsets
end

# The shards part's line fields: with SHARD_LINE_BYTES, a user agent that pads lines to it.
def shard_line_fields
  return {} unless Bench::SHARD_LINE_BYTES

  pad = [Bench::SHARD_LINE_BYTES - ApacheLog.text(1000).bytesize / 1000, 0].max
  { agent: ->(i) { "#{ApacheLog::AGENTS[i % ApacheLog::AGENTS.size]} #{"x" * pad}" } }
end

def shards_part(ctx)
  fields = shard_line_fields
  line_bytes = ApacheLog.text(1000, **fields).bytesize / 1000.0
  lines_for = Bench::SHARD_COUNTS.to_h { |n| [n, (Bench::SHARD_SECONDS * n * Bench::MIB / (line_bytes * Bench::KINESIS_BYTES_PER_LOG_BYTE)).ceil] }
  dir = Dir.mktmpdir("bench-shards-log")
  source = File.join(dir, "access.log")
  puts "bench: shards part: writing a log of #{Bench.fmt(lines_for.values.max)} lines (#{Bench.fmt(line_bytes, 0)} bytes a line) for " \
       "#{lines_for.map { |n, l| "#{n} shards #{Bench.fmt(l)}" }.join(", ")}..."
  offsets = write_log_file(source, lines_for.values, **fields)
  results = lines_for.to_h do |shards, lines|
    r = BenchKinesis.open(fault: true) do |bk|
      bk.fault.shard_limit(Bench::MIB, 1000)
      shards_run(ctx, bk, shards, lines) { |run| run.append_file(source, offsets[lines]) }
    end
    [shards, r]
  end
  FileUtils.rm_rf(dir)
  report_shards(ctx, results)
end

# Ours in fluentd on a stream of `shards` shards; the block appends `lines` lines to the run's log.
def shards_run(ctx, bk, shards, lines)
  stream = bk.create_stream("bench-shards-#{shards}", shards)
  with_fluentd(ctx, "ours-#{shards}-shards", kinesis_match(stream, bk.endpoint), ctx.ours_lib) do |run|
    # CPU seconds of each process, and of the whole machine.
    cpu = -> { bk.pids.merge("fluentd" => run.pid).transform_values { |pid| Bench.proc_cpu_seconds(pid) }.merge("machine" => Bench.machine_busy_seconds) }
    cpu0 = cpu.()
    t0 = Bench.now
    yield run
    done = run.wait_for { bk.proxy.stats(stream)["user_records_ok"].to_i >= lines }
    wall = Bench.now - t0
    r = { "lines" => lines, "complete" => !done.nil?, "wall" => wall, "cpu_pct" => cpu.().to_h { |name, s| [name, 100 * (s - cpu0[name]) / wall] },
          "vm_hwm_kib" => run.memory_kib("VmHWM"), "wire" => bk.proxy.stats(stream), "over_limit" => bk.fault.stats["entries_over_shard_limit"].to_i }
    warn "bench: #{shards} shards: not every line delivered within #{Bench::TIMEOUT} s; fluentd log tail:\n#{run.log_tail}" unless r["complete"]
    calls = bk.proxy.calls(stream)
    r["steady"], r["first_to_last"] = steady_rate(calls)
    r["seconds"] = calls.empty? ? nil : calls.last.first - calls.first.first
    run.stop
    r["read_back"] = bk.read_back(stream, lines)
    r
  end
end

def report_shards(ctx, results)
  columns = results.keys.map { |n| "#{n} shards" }
  rows = [
    ["log lines", ->(_, r) { Bench.fmt(r["lines"]) }],
    ["MiB delivered", ->(_, r) { Bench.fmt(r["wire"]["delivered_bytes"].to_f / Bench::MIB, 1) }],
    ["seconds, log appended to all delivered", ->(_, r) { Bench.fmt(r["wall"], 1) }],
    ["seconds, first to last call", ->(_, r) { Bench.fmt(r["seconds"], 1) }],
    ["MiB/s, middle 80% of the bytes", ->(_, r) { Bench.fmt(r["steady"], 2) }],
    ["  % of N MiB/s", ->(n, r) { r["steady"] ? "#{Bench.fmt(100 * r["steady"] / n, 1)} %" : "-" }],
    ["MiB/s, first to last call", ->(_, r) { Bench.fmt(r["first_to_last"], 2) }],
    ["PutRecords calls", ->(_, r) { Bench.fmt(r["wire"]["calls"]) }],
    ["entries throttled (over the shard limit)", ->(_, r) { Bench.fmt(r["over_limit"]) }],
    ["PutRecords answer time, mean s", ->(_, r) { Bench.fmt(r["wire"]["upstream_seconds"] / r["wire"]["calls"], 3) }],
    ["  calls in flight, mean", ->(_, r) { r["seconds"]&.positive? ? Bench.fmt(r["wire"]["upstream_seconds"] / r["seconds"], 1) : "-" }],
    *%w[fluentd kinesalite fault\ proxy counting\ proxy].map do |process|
      ["CPU % of one core, #{process}", ->(_, r) { Bench.fmt(r["cpu_pct"][process], 0) }]
    end,
    ["CPU % busy, whole machine (of #{Etc.nprocessors * 100})", ->(_, r) { Bench.fmt(r["cpu_pct"]["machine"], 0) }],
    ["peak RSS MiB (VmHWM)", ->(_, r) { Bench.fmt(r["vm_hwm_kib"] / 1024.0, 1) }],
    ["lines read back", ->(_, r) { BenchKinesis.read_back_cell([r["read_back"]]) }],
    ["  duplicates, missing, KCL-dropped", ->(_, r) { BenchKinesis.problems_cell([r["read_back"]]) }]
  ].map { |label, f| [label, *results.map { |n, r| f.(n, r) }] }
  Bench.table("throttled shards: ours in fluentd (in_tail), fault proxy limiting each shard to 1 MiB/s and 1,000 records/s, one run each",
              columns, rows,
              ["#{Bench.fmt(Bench::SHARD_SECONDS, 0)} s of N MiB/s of log each; fluentd -> counting proxy -> fault proxy -> kinesalite, " \
               "all on #{Etc.nprocessors} CPU(s): a rate well below N MiB/s with one of them near 100% of a core (or all together near " \
               "#{Etc.nprocessors * 100}%) is bound by this machine, not by the shards",
               "answer time: from the counting proxy's forwarding a call to the answer (fault proxy + kinesalite); CPU % over the time " \
               "from the log's append to the last line delivered"])
  ctx.summary << "(e) throttled shards, delivered MiB/s (middle 80%): " + results.map { |n, r|
    "#{n} shards #{Bench.fmt(r["steady"], 2)} (#{r["steady"] ? Bench.fmt(100 * r["steady"] / n, 1) : "-"} %)"
  }.join(", ") + "; every line read back once: " + (results.values.all? { |r| BenchKinesis.all_back?(r["read_back"]) } ? "yes" : "NO")
end

# ---- part outage -------------------------------------------------------------------------------

# Appends lines 0, 1, ... to the run's log at `rate` lines/s, in batches every 0.1 s, until
# `stop` is set; returns the thread (its value: the lines written).
def steady_writer(run, rate, stop)
  Thread.new do
    written = 0
    t0 = Bench.now
    until stop[0]
      due = ((Bench.now - t0) * rate).floor
      if due > written
        run.append(ApacheLog.text(written...due))
        written = due
      end
      sleep 0.1
    end
    written
  end
end

# ---- part steady -------------------------------------------------------------------------------

# One plugin in fluentd while the log grows at STEADY_RATE lines/s for STEADY_SECONDS.
def steady_run(ctx, name, load_path, round)
  stream = ctx.bk.create_stream("bench-steady-#{name}-#{round}", Bench::SHARDS)
  with_fluentd(ctx, "#{name}-steady", kinesis_match(stream, ctx.bk.endpoint), load_path) do |run|
    stop = [false]
    writer = steady_writer(run, Bench::STEADY_RATE, stop)
    sleep Bench::STEADY_SECONDS
    stop[0] = true
    lines = writer.value
    done = run.wait_for { ctx.bk.proxy.stats(stream)["user_records_ok"].to_i >= lines }
    warn "bench: steady #{name}: not every line delivered within #{Bench::TIMEOUT} s; fluentd log tail:\n#{run.log_tail}" unless done
    r = { "lines" => lines, "complete" => !done.nil?, "vm_hwm_kib" => run.memory_kib("VmHWM"), "wire" => ctx.bk.proxy.stats(stream) }
    run.stop
    r["read_back"] = ctx.bk.read_back(stream, lines)
    r
  end
end

def steady_part(ctx)
  puts "bench: steady part: #{Bench.fmt(Bench::STEADY_RATE)} lines/s for #{Bench::STEADY_SECONDS} s, #{Bench::SHARDS} shards, #{Bench::ROUNDS} round(s)"
  series = { "anchor" => ctx.anchor_runs, "ours" => [] }
  alternate_rounds(series) do |name, round|
    steady_run(ctx, name, name == "anchor" ? ctx.anchor_load_path : ctx.ours_lib, round)
  end
  columns = series.keys
  median_of = ->(key) { proc { |runs| Bench.median(runs.map { |r| call_figures(r["wire"])[key] }) } }
  row = ->(label, digits, f) { Bench.row(label, series, columns, digits, &f) }
  rows = [
    row.("log lines", 0, proc { |runs| Bench.median(runs.map { |r| r["lines"] }) }),
    row.("PutRecords calls", 0, median_of.("calls")),
    row.("Kinesis records per call (mean)", 2, median_of.("entries_per_call")),
    row.("calls full, %", 1, median_of.("full_pct")),
    row.("  the run's last call aside, %", 1, median_of.("full_pct_but_last")),
    row.("PUT payload units / minimum", 3, median_of.("units_ratio")),
    row.("peak RSS MiB (VmHWM)", 1, proc { |runs| Bench.median(runs.map { |r| r["vm_hwm_kib"] / 1024.0 }) }),
    row.("read back, all rounds", 0, proc { |runs| BenchKinesis.read_back_cell(runs.map { |r| r["read_back"] }) }),
    row.("  duplicates, missing, KCL-dropped", 0, proc { |runs| BenchKinesis.problems_cell(runs.map { |r| r["read_back"] }) })
  ]
  Bench.table("steady stream: #{Bench.fmt(Bench::STEADY_RATE)} lines/s for #{Bench::STEADY_SECONDS} s, #{Bench::SHARDS} shards, " \
              "median of #{Bench::ROUNDS} round(s)", columns, rows,
              ["a call is #{Bench::FULL_CALL}", "default settings of each plugin, flush_interval 1s", *Bench.skipped_notes(series)])
  ctx.summary << "(b) steady stream, calls full, median: " + Bench.per_column(series, separator: "; ") { |runs|
    "#{Bench.fmt(median_of.("full_pct").(runs), 1)} % (#{Bench.fmt(median_of.("full_pct_but_last").(runs), 1)} % but the last) of " \
      "#{Bench.fmt(median_of.("calls").(runs))} calls, units/minimum #{Bench.fmt(median_of.("units_ratio").(runs), 3)}"
  }
end

# What fluentd logs when its buffer refuses an emit (BufferOverflowError).
BUFFER_OVERFLOW = "failed to write data into buffer by buffer overflow"

def outage_part(ctx)
  limit = Bench.size_bytes(Bench::OUTAGE_BUFFER)
  chunk = Bench.size_bytes(Bench::OUTAGE_CHUNK)
  line_bytes = ApacheLog.text(1000).bytesize / 1000.0
  rate = Integer(ENV.fetch("OUTAGE_RATE") { (limit / (line_bytes * Bench::KINESIS_BYTES_PER_LOG_BYTE) / (Bench::OUTAGE_SECONDS / 3.0)).clamp(500, 20_000).round.to_s })
  buffer = "@type memory\ntotal_limit_size #{Bench::OUTAGE_BUFFER}\nchunk_limit_size #{Bench::OUTAGE_CHUNK}\nflush_interval 1s\nretry_max_interval 5s"
  puts "bench: outage part: #{Bench::OUTAGE_SECONDS} s of HTTP 500, #{Bench.fmt(rate)} lines/s appended, " \
       "total_limit_size #{Bench::OUTAGE_BUFFER}, chunk_limit_size #{Bench::OUTAGE_CHUNK}"
  BenchKinesis.open(fault: true) do |bk|
    stream = bk.create_stream("bench-outage", Bench::SHARDS)
    bk.fault.always("status 500")
    with_fluentd(ctx, "ours-outage", kinesis_match(stream, bk.endpoint, buffer: buffer), ctx.ours_lib) do |run|
      stop = [false]
      writer = steady_writer(run, rate, stop)
      samples = []
      t0 = Bench.now
      loop do
        out = run.output
        samples << { "t" => Bench.now - t0, "rss_kib" => run.memory_kib("VmRSS"), "buffer" => out["buffer_total_queued_size"],
                     "accepted" => out["emit_records"], "retries" => out["retry_count"], "refused" => run.log_includes?(BUFFER_OVERFLOW) }
        break if samples.last["t"] >= Bench::OUTAGE_SECONDS

        sleep [Bench::OUTAGE_SAMPLE_SECONDS - (Bench.now - t0) % Bench::OUTAGE_SAMPLE_SECONDS, 0.5].max
      end
      stop[0] = true
      written = writer.value
      bk.fault.clear
      t1 = Bench.now
      done = run.wait_for do
        out = run.output
        out["emit_records"] >= written && bk.proxy.stats(stream)["user_records_ok"].to_i >= out["emit_records"] && out["buffer_total_queued_size"].zero?
      end
      recovery = { "complete" => !done.nil?, "seconds" => Bench.now - t1, "written" => written, "accepted" => run.output["emit_records"] }
      warn "bench: outage: not everything delivered within #{Bench::TIMEOUT} s after the fault was cleared:\n#{run.log_tail}" unless recovery["complete"]
      run.stop
      recovery["read_back"] = bk.read_back(stream, written)
      report_outage(ctx, samples, recovery, limit, chunk, rate)
    end
  end
end

def report_outage(ctx, samples, recovery, limit, chunk, rate)
  mib = ->(kib) { Bench.fmt(kib / 1024.0, 1) }
  full_at = samples.index { |s| s["refused"] }
  rows = samples.map do |s|
    ["#{Bench.fmt(s["t"], 0)} s", mib.(s["rss_kib"]), Bench.fmt(s["buffer"] / Bench::MIB.to_f, 1), Bench.fmt(s["accepted"]),
     s["refused"] ? "yes" : "no", Bench.fmt(s["retries"])]
  end
  Bench.table("outage: ours in fluentd, every PutRecords call answered HTTP 500 for #{Bench::OUTAGE_SECONDS} s, " \
              "#{Bench.fmt(rate)} lines/s appended", ["VmRSS MiB", "buffer MiB", "lines accepted", "buffer full", "retries"], rows,
              ["memory buffer: total_limit_size #{Bench::OUTAGE_BUFFER}, chunk_limit_size #{Bench::OUTAGE_CHUNK}; " \
               "full = it has refused an emit by then (BufferOverflowError, logged as \"#{BUFFER_OVERFLOW}\"); " \
               "lines accepted = the output's emit_records (in_tail retries what the full buffer refuses)"])
  growth_text =
    if full_at.nil?
      "the buffer never filled (raise OUTAGE_RATE or OUTAGE_SECONDS, or lower OUTAGE_BUFFER)"
    else
      full = samples[full_at]
      later = samples[full_at..].select { |s| s["t"] >= Bench::OUTAGE_SECONDS / 2.0 }
      growth = later.empty? ? nil : later.map { |s| s["rss_kib"] }.max - full["rss_kib"]
      verdict = if growth.nil? || later == [full] then "too few samples after it to tell"
                elsif growth <= chunk / 1024 then "flat: at most one chunk, #{Bench::OUTAGE_CHUNK}"
                else "NOT flat: more than one chunk, #{Bench::OUTAGE_CHUNK}"
                end
      "buffer first full at the #{Bench.fmt(full["t"], 0)} s sample with RSS #{mib.(full["rss_kib"])} MiB; max RSS over the " \
        "outage's second half#{full["t"] > Bench::OUTAGE_SECONDS / 2.0 ? " (from then on)" : ""} minus that: " \
        "#{growth ? mib.(growth) : "-"} MiB (#{verdict})"
    end
  rb = recovery["read_back"]
  delivered_text = "after the fault was cleared: #{Bench.fmt(rb["unique"])} lines delivered (read back) of #{Bench.fmt(recovery["accepted"])} accepted " \
                   "(#{Bench.fmt(recovery["written"])} written to the log) in #{Bench.fmt(recovery["seconds"], 1)} s; " \
                   "#{rb["duplicates"]} duplicates, #{rb["missing"]} missing, #{rb["kcl_dropped"]} KCL-dropped" +
                   (recovery["complete"] ? "" : " (NOT complete within #{Bench::TIMEOUT} s)")
  puts growth_text
  puts delivered_text
  ctx.summary << "(f) outage, total_limit_size #{Bench::OUTAGE_BUFFER}: #{growth_text}"
  ctx.summary << "    #{delivered_text}; every accepted line delivered once: " +
                 (rb["unique"] >= recovery["accepted"] && rb["duplicates"].zero? && rb["kcl_dropped"].zero? ? "yes" : "NO")
end

# ---- main --------------------------------------------------------------------------------------

def main
  unknown = Bench::PARTS - Bench::ALL_PARTS
  abort "bench: unknown PARTS #{unknown.join(", ")}; known: #{Bench::ALL_PARTS.join(", ")}" unless unknown.empty?

  command, fluentd_dirs = Bench.fluentd
  anchor_dirs, anchor_info = Bench.anchor_lib(fluentd_dirs)
  ctx = Context.new(command: command, fluentd_dirs: fluentd_dirs, ours_lib: [File.join(Bench::ROOT, "lib")] + fluentd_dirs,
                    anchor_dirs: anchor_dirs, anchor_why: anchor_info, summary: [])
  puts "bench: parts #{Bench::ALL_PARTS.select { |p| Bench.part?(p) }.join(", ")}; #{Bench::ROUNDS} round(s); #{Etc.nprocessors} CPU(s), " \
       "load average #{File.read("/proc/loadavg").split.first(3).join(" ")}"
  puts "bench: fluentd #{fluentd_dirs.empty? ? "gem" : fluentd_dirs.join(":")}, #{RUBY_DESCRIPTION}"
  if anchor_dirs
    puts "bench: anchor fluent-plugin-kinesis #{anchor_info} from #{anchor_dirs.first} (+#{anchor_dirs.size - 1} dirs)"
  else
    ctx.anchor_why = "#{anchor_info}; see the top of bench/compare.rb for ANCHOR_LIB"
    puts "bench: anchor SKIPPED: #{ctx.anchor_why}"
  end

  if Bench.part?("fluentd") || Bench.part?("write_path") || Bench.part?("steady")
    ctx.bk = BenchKinesis.new
    puts "bench: kinesalite #{ctx.bk.kinesis.endpoint}, counting proxy #{ctx.bk.endpoint}"
  end
  fluentd_part(ctx) if Bench.part?("fluentd")
  write_path_part(ctx) if Bench.part?("write_path")
  steady_part(ctx) if Bench.part?("steady")
  shards_part(ctx) if Bench.part?("shards")
  outage_part(ctx) if Bench.part?("outage")

  puts
  puts "== summary (by goal: a CPU, b calls, c payload units, d peak RSS, e throttled shards, f outage)"
  # Each "(x)" line with the indented lines after it, in the goals' order.
  groups = ctx.summary.slice_before { |line| line.start_with?("(") }.each_with_index.sort_by { |group, i| [group.first[1], i] }
  groups.each { |group, _| puts group }
ensure
  ctx&.bk&.stop
end

main if $PROGRAM_NAME == __FILE__

# frozen_string_literal: true

# The side-by-side benchmark: this plugin against the one it replaces, on this machine, in one run.
#
#   script/bench                         (builds the extension in release, then runs this)
#   LINES=200000 SHARDS=16 WRITE_PATH_RECORDS=100000 ruby bench/compare.rb
#
# Part 1, real fluentd processes (`--no-supervisor`, so the process measured is the worker),
# each tailing the same Apache access log (in_tail, apache2 parser, read_from_head):
#   (a) floor   `@type null`: what fluentd costs without any Kinesis output;
#       floor+buffer  `@type null` with a memory buffer like the Kinesis outputs' (8 MiB chunks
#               by tag, flushed every second, written nowhere): fluentd's own buffering cost,
#               which every buffered output pays on top of the floor;
#   (b) anchor  fluent-plugin-kinesis's `kinesis_streams_aggregated`, when it can be loaded;
#   (c) ours    this gem's `kinesis_streams_aggregated`, with the very same <match> section.
# Both Kinesis outputs talk to one local Kinesis (kinesalite on 127.0.0.1, started here)
# through bench/counting_proxy.rb, a separate process that counts every PutRecords call on the
# wire the same way for both. Each fluentd is started on an empty log, then the whole log is
# appended at once; the run ends when every line is delivered (proxy) or, for the floor, read
# (in_tail's pos file). CPU is the fluentd process's utime+stime from /proc/<pid>/stat between
# those two moments; peak RSS is its VmHWM. Everything delivered is read back from kinesalite
# and deaggregated with the Python consumer library (aws_kinesis_agg), line numbers checked.
#
# Part 2, the write path alone: bench/write_path.rb drives each plugin with fluentd's test
# driver (same events, same default buffer, same proxy), in its own process, and reports CPU
# per record for the emit/format phase and for the write phase separately; a buffered
# `@type null` goes through the same steps, so what fluentd itself costs can be subtracted.
# "ours+metrics" is ours with CloudWatch metrics on (detailed, per shard) against a local moto
# server, when moto is installed.
#
# The two plugins register the same @type, so they never share a process or a load path.
#
# Environment:
#   LINES               log lines for part 1 (default 200000)
#   SHARDS              shards of every stream (default 16, so that our per-shard rate limiter,
#                       150% of 1 MiB/s, does not bound records/s; its waiting time is printed)
#   WRITE_PATH_RECORDS  events for part 2 (default 100000)
#   WRITE_PATH_RUNS     runs of part 2 per plugin, alternating (default 3); each phase's least
#                       CPU over the runs is reported (machines are shared), every run shown
#   FLUENTD_LIB         fluentd's and serverengine's lib dirs (default /opt/serverengine/lib and
#                       /opt/fluentd/lib when both exist, else an installed fluentd gem)
#   ANCHOR_LIB          load path of the anchor, colon-separated (see below)
#   TIMEOUT             seconds one fluentd run may take (default 600)
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
# <sdk> = /opt/aws-sdk-ruby. If the anchor cannot be loaded from there, (b) is skipped with one
# line saying why. If the anchor is installed as a gem instead, point ANCHOR_LIB at the gems'
# lib directories.

require "etc"
require "json"
require "fileutils"
require "net/http"
require "open3"
require "rbconfig"
require "tmpdir"
require_relative "../test/support/apache_log"
require_relative "../test/support/fluentd_process"
require_relative "../test/support/local_kinesis"

module Bench
  ROOT = File.expand_path("..", __dir__)
  LINES = Integer(ENV.fetch("LINES", "200000"))
  SHARDS = Integer(ENV.fetch("SHARDS", "16"))
  WRITE_PATH_RECORDS = Integer(ENV.fetch("WRITE_PATH_RECORDS", "100000"))
  WRITE_PATH_RUNS = Integer(ENV.fetch("WRITE_PATH_RUNS", "3"))
  TIMEOUT = Integer(ENV.fetch("TIMEOUT", "600"))
  MAX_CALL_BYTES = 5 * 1024 * 1024
  ANCHOR_DEFAULT = ["/opt/fluent-plugin-kinesis/lib"] +
                   %w[aws-sdk-core aws-sdk-kinesis aws-sigv4 aws-partitions aws-eventstream].map { |g| "/opt/aws-sdk-ruby/gems/#{g}/lib" }
  OUR_IMPLEMENTATION = /kinesis_streams_aggregated is (fluent-plugin-kinesis-rs [^\s]+)/

  module_function

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

  def vm_hwm_kib(pid)
    File.read("/proc/#{pid}/status")[/^VmHWM:\s+(\d+) kB/, 1].to_i
  end

  def now
    Process.clock_gettime(Process::CLOCK_REALTIME)
  end

  def http_json(url)
    JSON.parse(Net::HTTP.get(URI(url)))
  end

  def fmt(value, digits = 0)
    return "-" if value.nil?
    return value if value.is_a?(String)

    s = format("%.#{digits}f", value)
    int, frac = s.split(".")
    int = int.reverse.scan(/\d{1,3}/).join(",").reverse.prepend(int.start_with?("-") ? "-" : "")
    frac ? "#{int}.#{frac}" : int
  end

  def table(title, columns, rows)
    puts
    puts "== #{title}"
    width = [rows.map { |r| r[0].size }.max, 10].max
    puts "#{" " * width}  #{columns.map { |c| c.rjust(16) }.join(" ")}"
    rows.each { |label, *cells| puts "#{label.ljust(width)}  #{cells.map { |c| fmt(c).rjust(16) }.join(" ")}" }
  end
end

# The Kinesis side: kinesalite and the counting proxy in front of it.
class BenchKinesis
  attr_reader :kinesis, :endpoint

  def initialize
    @kinesis = LocalKinesis.new
    @proxy_in, @proxy_out, @proxy_wait = Open3.popen2(RbConfig.ruby, File.join(__dir__, "counting_proxy.rb"), @kinesis.endpoint)
    line = @proxy_out.gets or abort "bench: the counting proxy did not start"
    @endpoint = "http://127.0.0.1:#{JSON.parse(line).fetch("port")}"
  end

  def stats(stream)
    all = Bench.http_json("#{@endpoint}/__bench/stats")
    all["streams"].fetch(stream, {})
  end

  def stop
    @proxy_in.close unless @proxy_in.closed?
    @proxy_wait.join(5)
    @kinesis.stop
  end

  # {"read", "unique", "duplicates", "missing", "kinesis_records", "kcl_dropped"}
  def read_back(stream, expected)
    got = @kinesis.read(stream)
    numbers = got["records"].map { |r| ApacheLog.number(r["data"]) }
    unique = numbers.compact.uniq
    { "read" => numbers.size, "unique" => unique.size, "duplicates" => numbers.size - unique.size,
      "missing" => expected - (unique & (0...expected).to_a).size, "kinesis_records" => got["kinesis_records"],
      "kcl_dropped" => got["kcl_dropped_aggregates"] }
  end
end

# One fluentd process (test/support/fluentd_process.rb, `--no-supervisor`): in_tail (apache2) ->
# the given <match> body, with its own config text and load path.
class FluentdRun
  attr_reader :name, :result

  def initialize(name, match_body, load_path, command, bench_kinesis, log_text)
    @name = name
    @match_body = match_body
    @load_path = load_path
    @command = command
    @bk = bench_kinesis
    @log_text = log_text
    @dir = Dir.mktmpdir("bench-#{name}")
    @result = { "name" => name }
  end

  def config(monitor_port)
    <<~CONF
      #{FluentdProcess.tail_source(log: "#{@dir}/access.log")}
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{monitor_port}
      </source>
      <match apache.access>
        #{@match_body.gsub("\n", "\n  ")}
      </match>
    CONF
  end

  # Runs it; `done` is called with nothing and returns the delivery time once complete, or nil.
  def run(stream: nil)
    File.write(File.join(@dir, "access.log"), "")
    @fluentd = FluentdProcess.new(dir: @dir, config: config(FluentdProcess.free_port), supervisor: false,
                                  load_path: @load_path, command: @command, name: "fluentd (#{@name})")
    @pid = @fluentd.start.pid
    begin
      @fluentd.wait_until_running(120)
    rescue FluentdProcess::Error => e
      raise "fluentd (#{@name}) did not start: #{e.message}"
    end
    @result["implementation"] = @fluentd.log_text[Bench::OUR_IMPLEMENTATION, 1]
    cpu0 = Bench.proc_cpu_seconds(@pid)
    t0 = Bench.now
    File.open(File.join(@dir, "access.log"), "a") { |f| f.write(@log_text) }
    finished_at = wait_for_completion(stream)
    cpu1 = Bench.proc_cpu_seconds(@pid)
    @result["complete"] = !finished_at.nil?
    @result["seconds"] = (finished_at || Bench.now) - t0
    @result["cpu_s"] = cpu1 - cpu0
    @result["vm_hwm_kib"] = Bench.vm_hwm_kib(@pid)
    @result["monitor"] = @fluentd.monitor_plugins.find { |p| p["plugin_category"] == "output" }
    @result
  ensure
    stop
  end

  def log_tail
    @fluentd ? @fluentd.log_tail(3000) : "(no log)"
  end

  def cleanup
    FileUtils.rm_rf(@dir) unless ENV["KEEP"]
  end

  private

  def read_position
    line = File.read(File.join(@dir, "access.log.pos")).lines.find { |l| l.start_with?(File.join(@dir, "access.log") + "\t") }
    line ? line.split("\t")[1].to_i(16) : 0
  rescue Errno::ENOENT
    0
  end

  # Without a buffer, or once monitor_agent shows every event buffered and the buffer empty.
  def flushed?
    return true unless @match_body.include?("<buffer")

    out = @fluentd.monitor_plugins.find { |p| p["plugin_category"] == "output" }
    out["emit_records"] >= Bench::LINES && out["buffer_total_queued_size"].zero?
  end

  # The time the last line was delivered (stream) or read and flushed (floors); nil on timeout.
  def wait_for_completion(stream)
    deadline = Bench.now + Bench::TIMEOUT
    loop do
      if stream
        s = @bk.stats(stream)
        return s["last_ok_at"] if s["user_records_ok"].to_i >= Bench::LINES
      elsif read_position >= @log_text.bytesize && flushed?
        return Bench.now
      end
      return nil if Bench.now > deadline
      raise "fluentd (#{@name}) exited before it was done:\n#{log_tail}" unless @fluentd.alive?

      sleep 0.1
    end
  end

  def stop
    @fluentd&.stop(timeout: 120)
  end
end

def kinesis_match(stream, endpoint)
  <<~MATCH.chomp
    @type kinesis_streams_aggregated
    stream_name #{stream}
    region ap-northeast-1
    endpoint #{endpoint}
    aws_key_id AKIDBENCH
    aws_sec_key bench-secret
    <buffer>
      flush_interval 1s
    </buffer>
  MATCH
end

# plugin_conf: extra lines for the plugin's configuration.
def write_path(name, load_path, bench_kinesis, run, plugin_conf: "")
  args = if name == "null" then ["-", "-", Bench::WRITE_PATH_RECORDS.to_s, "null"]
         else
           stream = bench_kinesis.kinesis.create_stream("bench-write-path-#{name.tr("^a-z", "-")}-#{run}", Bench::SHARDS)
           [bench_kinesis.endpoint, stream, Bench::WRITE_PATH_RECORDS.to_s]
         end
  env = { "RUBYLIB" => load_path.join(File::PATH_SEPARATOR), "WRITE_PATH_PLUGIN_CONF" => plugin_conf }
  out, status = Open3.capture2(env, RbConfig.ruby, File.join(__dir__, "write_path.rb"), *args)
  raise "bench/write_path.rb (#{name}) failed: #{status}" unless status.success?

  result = JSON.parse(out.lines.last)
  return result unless stream

  result["wire"] = bench_kinesis.stats(stream)
  result["expected_back"] = result["records"] + result["warmup_records"]
  result["read_back"] = bench_kinesis.read_back(stream, result["expected_back"])
  result
end

# The write path again with CloudWatch metrics at their most expensive (detailed, per shard),
# sent to a local moto server; nil (with a note) when moto is not installed.
def metrics_plugin_conf
  require_relative "../test/support/moto_server"
  if MotoServer.missing
    warn "bench: no ours+metrics column: #{MotoServer.missing}"
    return nil
  end
  moto = MotoServer.shared
  <<~CONF
    metrics_level detailed
    metrics_granularity shard
    metrics_endpoint #{moto.endpoint}
    metrics_request_compression false
  CONF
end

def per_call(wire, key)
  wire["calls"].to_i.positive? ? wire[key].to_f / wire["calls"] : nil
end

def main
  command, fluentd_dirs = Bench.fluentd
  ours_lib = [File.join(Bench::ROOT, "lib")] + fluentd_dirs
  anchor_dirs, anchor_info = Bench.anchor_lib(fluentd_dirs)
  cores = Etc.nprocessors
  puts "bench: #{Bench::LINES} lines, #{Bench::SHARDS} shards per stream, #{cores} CPU(s), load average #{File.read("/proc/loadavg").split.first(3).join(" ")}"
  puts "bench: fluentd #{fluentd_dirs.empty? ? "gem" : fluentd_dirs.join(":")}, #{RUBY_DESCRIPTION}"
  if anchor_dirs
    puts "bench: anchor fluent-plugin-kinesis #{anchor_info} from #{anchor_dirs.first} (+#{anchor_dirs.size - 1} dirs)"
  else
    puts "bench: (b) anchor SKIPPED: #{anchor_info}; see the top of bench/compare.rb for ANCHOR_LIB"
  end

  bk = BenchKinesis.new
  puts "bench: kinesalite #{bk.kinesis.endpoint}, counting proxy #{bk.endpoint}"
  log_text = ApacheLog.text(Bench::LINES)
  puts "bench: log #{Bench.fmt(log_text.bytesize / 1e6, 1)} MB (#{Bench.fmt(log_text.bytesize.to_f / Bench::LINES)} bytes a line)"

  runs = []
  floors = { "floor" => "@type null",
             "floor+buffer" => "@type null\n<buffer tag>\n  chunk_limit_size 8m\n  flush_interval 1s\n</buffer>" }
  floors.each do |name, match|
    floor = FluentdRun.new(name, match, fluentd_dirs, command, bk, log_text)
    runs << [name, floor.run, nil]
    floor.cleanup
  end
  plugins = []
  plugins << ["anchor", anchor_dirs + fluentd_dirs] if anchor_dirs
  plugins << ["ours", ours_lib]
  plugins.each do |name, load_path|
    stream = bk.kinesis.create_stream("bench-#{name}", Bench::SHARDS)
    run = FluentdRun.new(name, kinesis_match(stream, bk.endpoint), load_path, command, bk, log_text)
    result = run.run(stream: stream)
    if name == "ours" && result["implementation"].nil?
      abort "bench: the 'ours' fluentd did not log our implementation line; check #{ours_lib.first}:\n#{run.log_tail}"
    elsif name == "anchor" && result["implementation"]
      abort "bench: the 'anchor' fluentd loaded #{result["implementation"]} instead of fluent-plugin-kinesis"
    end
    warn "bench: #{name} did not deliver every line within #{Bench::TIMEOUT} s; fluentd log tail:\n#{run.log_tail}" unless result["complete"]
    result["wire"] = bk.stats(stream)
    result["read_back"] = bk.read_back(stream, Bench::LINES)
    runs << [name, result, stream]
    run.cleanup
  end

  report_fluentd(runs)

  candidates = Hash.new { |h, k| h[k] = [] }
  metrics_conf = metrics_plugin_conf
  Bench::WRITE_PATH_RUNS.times do |i|
    candidates["null"] << write_path("null", fluentd_dirs, bk, i)
    candidates["anchor"] << write_path("anchor", anchor_dirs + fluentd_dirs, bk, i) if anchor_dirs
    candidates["ours"] << write_path("ours", ours_lib, bk, i)
    candidates["ours+metrics"] << write_path("ours+metrics", ours_lib, bk, i, plugin_conf: metrics_conf) if metrics_conf
  end
  paths = candidates.map do |name, results|
    # Each phase's least CPU over the runs: contention from other work on the machine only ever
    # adds CPU time (a busy sibling hyperthread, evicted caches), and it comes and goes.
    best = results.first.merge("emit_cpu_s" => results.map { |r| r["emit_cpu_s"] }.min,
                               "write_cpu_s" => results.map { |r| r["write_cpu_s"] }.min)
    best["all_phases_us"] = results.map { |r| [r["emit_cpu_s"], r["write_cpu_s"]].map { |c| c * 1e6 / r["records"] } }
    best["all_read_back"] = results.map { |r| [r["read_back"], r["expected_back"]] } if best["read_back"]
    [name, best]
  end
  report_write_path(paths)
  report_goals(runs, paths)
ensure
  bk&.stop
end

def report_fluentd(runs)
  floor = runs.first[1]
  columns = runs.map(&:first)
  rows = []
  rows << ["records/s", *runs.map { |_, r, _| Bench::LINES / r["seconds"] }]
  rows << ["seconds (log appended -> last delivered)", *runs.map { |_, r, _| Bench.fmt(r["seconds"], 2) }]
  rows << ["fluentd CPU s", *runs.map { |_, r, _| Bench.fmt(r["cpu_s"], 2) }]
  rows << ["CPU s per M records", *runs.map { |_, r, _| Bench.fmt(r["cpu_s"] * 1e6 / Bench::LINES, 2) }]
  rows << ["CPU s per M records above floor", *runs.map { |n, r, _| n == "floor" ? "-" : Bench.fmt((r["cpu_s"] - floor["cpu_s"]) * 1e6 / Bench::LINES, 2) }]
  buffered = runs.find { |n, _, _| n == "floor+buffer" }[1]
  rows << ["CPU s per M records above floor+buffer", *runs.map { |n, r, _| n.start_with?("floor") ? "-" : Bench.fmt((r["cpu_s"] - buffered["cpu_s"]) * 1e6 / Bench::LINES, 2) }]
  rows << ["peak RSS MiB (VmHWM)", *runs.map { |_, r, _| Bench.fmt(r["vm_hwm_kib"] / 1024.0, 1) }]
  wire = ->(key) { runs.map { |_, r, _| r["wire"] ? r["wire"][key] : "-" } }
  rows << ["PutRecords calls", *wire.("calls")]
  rows << ["Kinesis records (entries)", *wire.("entries")]
  rows << ["user records per call", *runs.map { |_, r, _| r["wire"] ? Bench.fmt(per_call(r["wire"], "user_records"), 1) : "-" }]
  rows << ["entries per call", *runs.map { |_, r, _| r["wire"] ? Bench.fmt(per_call(r["wire"], "entries"), 2) : "-" }]
  rows << ["bytes per call", *runs.map { |_, r, _| r["wire"] ? per_call(r["wire"], "bytes") : "-" }]
  rows << ["call fullness (bytes/5 MiB)", *runs.map { |_, r, _| r["wire"] ? Bench.fmt(100 * per_call(r["wire"], "bytes") / Bench::MAX_CALL_BYTES, 1) + " %" : "-" }]
  rows << ["calls >= 95% full", *runs.map { |_, r, _| r["wire"] ? "#{r["wire"]["full_calls"]} of #{r["wire"]["calls"]}" : "-" }]
  rows << ["largest call bytes", *wire.("max_call_bytes")]
  rows << ["PUT payload units (25 KB)", *wire.("payload_units")]
  rows << ["failed entries / HTTP errors", *runs.map { |_, r, _| r["wire"] ? "#{r["wire"]["failed_entries"]} / #{r["wire"]["http_errors"]}" : "-" }]
  rows << ["user records delivered (wire)", *wire.("user_records_ok")]
  rows << ["records read back / sent", *runs.map { |_, r, _| r["read_back"] ? "#{r["read_back"]["unique"]} / #{Bench::LINES}" : "-" }]
  rows << ["  duplicates, missing, KCL-dropped", *runs.map { |_, r, _| r["read_back"] ? "#{r["read_back"]["duplicates"]}, #{r["read_back"]["missing"]}, #{r["read_back"]["kcl_dropped"]}" : "-" }]
  Bench.table("fluentd in_tail (apache2) -> output, #{Bench.fmt(Bench::LINES)} lines, one process each", columns, rows)
  puts "(one run each: on a shared machine a run's CPU varies by about ±0.6 s between repeats, ±3 s per M records " \
       "at 200k lines, so small differences between columns are noise)"

  ours = runs.find { |n, _, _| n == "ours" }&.[](1)
  return unless ours && ours["monitor"]

  m = ours["monitor"]
  w = ours["wire"]
  puts "ours, its own counters (monitor_agent): requests #{m["kinesis_requests"]}, kinesis_records #{m["kinesis_kinesis_records"]}, " \
       "delivered #{m["kinesis_delivered"]}, bytes #{m["kinesis_bytes_delivered"]}, payload units #{m["kinesis_put_payload_units"]}, " \
       "retried #{m["kinesis_retried_entries"]}, rate limiter waited #{m["kinesis_rate_limited_ms"]} ms, fluentd write_count #{m["write_count"]}"
  same = [m["kinesis_requests"], m["kinesis_kinesis_records"], m["kinesis_bytes_delivered"], m["kinesis_put_payload_units"]] ==
         [w["calls"], w["entries"], w["bytes"], w["payload_units"]]
  puts same ? "ours, own counters agree with the proxy (calls, entries, bytes, payload units)" : "ours, own counters DIFFER from the proxy's"
end

def report_write_path(paths)
  n = Bench::WRITE_PATH_RECORDS
  by_name = paths.to_h
  null = by_name["null"]
  us = ->(r, key) { r[key] * 1e6 / n }
  total = ->(r) { (r["emit_cpu_s"] + r["write_cpu_s"]) * 1e6 / n }
  own = ->(r) { plugin_own_us(r, null) }
  columns = paths.map(&:first)
  compare = by_name.key?("anchor")
  columns << "anchor/ours" if compare
  row = lambda do |label, digits = 2, &value|
    values = paths.map { |_, r| value.(r) }
    cells = values.map { |v| v.is_a?(Numeric) ? Bench.fmt(v, digits) : v }
    if compare
      a = value.(by_name["anchor"])
      o = value.(by_name["ours"])
      cells << (a.is_a?(Numeric) && o.is_a?(Numeric) && o.positive? ? "#{Bench.fmt(a / o, 1)}x" : "")
    end
    [label, *cells]
  end
  wire = ->(r, &f) { r["wire"] ? f.(r["wire"]) : "-" }
  rows = []
  rows << row.("emit/format CPU µs per record") { |r| us.(r, "emit_cpu_s") }
  rows << row.("write CPU µs per record") { |r| us.(r, "write_cpu_s") }
  rows << row.("total CPU µs per record") { |r| total.(r) }
  rows << row.("  the plugin's own (each phase above null's)") { |r| r.equal?(null) ? "-" : own.(r) }
  rows << row.("write wall s") { |r| Bench.fmt(r["write_wall_s"], 2) }
  rows << row.("Ruby objects allocated per record", 1) { |r| (r["emit_allocated_objects"] + r["write_allocated_objects"]).to_f / n }
  rows << row.("GC runs (emit + write)") { |r| "#{r["emit_gc_runs"]} + #{r["write_gc_runs"]}" }
  rows << row.("fluentd write calls (chunks)") { |r| r["write_count"].to_s }
  rows << row.("PutRecords calls") { |r| wire.(r) { |w| w["calls"].to_s } }
  rows << row.("call fullness (bytes/5 MiB)") { |r| wire.(r) { |w| "#{Bench.fmt(100 * per_call(w, "bytes") / Bench::MAX_CALL_BYTES, 1)} %" } }
  rows << row.("records read back / sent") { |r| r["read_back"] ? "#{r["read_back"]["unique"]} / #{r["expected_back"]}" : "-" }
  Bench.table("write path only: fluentd test driver, #{Bench.fmt(n)} apache2 records, default memory buffer, " \
              "each phase's least CPU of #{Bench::WRITE_PATH_RUNS} run(s)", columns, rows)
  puts "(after a warm-up of 1,000 records: emit/format = feeding event streams of 1,000 with #write held back; " \
       "write = flushing every chunk; process CPU clock, all threads; PutRecords and read-back include the warm-up;"
  puts " null = `@type null` with the same buffer: fluentd's own share of every column; the plugin's own = " \
       "emit and write each minus null's, a negative difference counted as 0: emit varies by ±2 µs run to run)"
  puts "every run, emit + write µs per record: " +
       paths.map { |name, r| "#{name} #{r["all_phases_us"].map { |e, w| "#{Bench.fmt(e, 2)} + #{Bench.fmt(w, 2)}" }.join(", ")}" }.join("; ")
end

# CPU µs per record of the plugin itself: each phase minus the buffered null's. The emit phase of
# a plugin without #format runs only fluentd code, the same as null's; its difference to null's
# is noise (GC timing, neighbours), so a negative one counts as 0 rather than being taken off
# the write phase.
def plugin_own_us(r, null)
  n = r["records"].to_f
  [(r["emit_cpu_s"] - null["emit_cpu_s"]) * 1e6 / n, 0].max + (r["write_cpu_s"] - null["write_cpu_s"]) * 1e6 / n
end

def report_goals(runs, paths)
  puts
  puts "== goals"
  anchor = paths.find { |n, _| n == "anchor" }&.[](1)
  ours = paths.find { |n, _| n == "ours" }[1]
  null = paths.find { |n, _| n == "null" }[1]
  total = ->(r) { r["emit_cpu_s"] + r["write_cpu_s"] }
  if anchor
    ratio = total.(anchor) / total.(ours)
    own_ratio = plugin_own_us(anchor, null) / plugin_own_us(ours, null)
    write_ratio = anchor["write_cpu_s"] / ours["write_cpu_s"]
    verdict = ->(x) { x >= 20 ? "MET" : "NOT MET" }
    puts "write-path CPU per record, ours <= 1/20 of the anchor's: total #{Bench.fmt(ratio, 1)}x less (#{verdict.(ratio)}); " \
         "the plugins' own (above null) #{Bench.fmt(own_ratio, 1)}x less (#{verdict.(own_ratio)}); " \
         "write phase alone #{Bench.fmt(write_ratio, 1)}x less (#{verdict.(write_ratio)})"
  else
    puts "write-path CPU ratio: not measured (anchor skipped)"
  end
  ours_run = runs.find { |n, _, _| n == "ours" }[1]
  fullness = per_call(ours_run["wire"], "bytes") / Bench::MAX_CALL_BYTES
  puts "PutRecords calls >= 95% full (ours, fluentd run): #{Bench.fmt(100 * fullness, 1)} % on average, " \
       "#{ours_run["wire"]["full_calls"]} of #{ours_run["wire"]["calls"]} calls >= 95% (#{fullness >= 0.95 ? "MET" : "NOT MET"})"
  all_back = runs.reject { |n, _, _| n.start_with?("floor") }.map { |n, r, _| [n, r["read_back"], Bench::LINES] } +
             paths.flat_map { |n, r| (r["all_read_back"] || []).each_with_index.map { |(rb, expected), i| ["#{n} write path, run #{i + 1}", rb, expected] } }
  all_back.each do |name, rb, expected|
    ok = rb["unique"] == expected && rb["duplicates"].zero? && rb["kcl_dropped"].zero?
    puts "every record read back once (#{name}): #{rb["unique"]} of #{expected}, #{rb["duplicates"]} duplicates, " \
         "#{rb["kcl_dropped"]} KCL-dropped aggregates (#{ok ? "MET" : "NOT MET"})"
  end
end

main if $PROGRAM_NAME == __FILE__

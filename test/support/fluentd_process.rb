# frozen_string_literal: true

require "fileutils"
require "json"
require "net/http"
require "rbconfig"
require "socket"

# A real fluentd process, started the way it runs in production, for the demo, the end-to-end
# tests and the bench (and restart, crash and multi-worker tests):
#
#   dir = Dir.mktmpdir
#   config = FluentdProcess.pipeline_config(dir: dir, stream: "s", endpoint: kinesis.endpoint,
#                                           monitor_port: FluentdProcess.free_port)
#   fluentd = FluentdProcess.new(dir: dir, config: config).start
#   fluentd.wait_until_running(60)
#   ApacheLog.append(File.join(dir, "access.log"), 5000)
#   ...
#   fluentd.monitor_plugin("kinesis_streams_aggregated")["kinesis_delivered"]
#   fluentd.stop(timeout: 30)           # => #<Stop status=..., seconds=1.2, escalated=false>
#   fluentd.kill!                       # or: SIGKILL to supervisor and workers, as a crash
#
# The process runs in its own process group (its pgid is its pid), with
# RUBYLIB = this project's lib + fluentd's load path (FluentdProcess.locate). It is only ever
# signalled by pid or by that process group, never by name. Every group started is killed at
# exit (of the process that started it) if it is still there, with a warning, so a failing
# test cannot leave a fluentd behind.
class FluentdProcess
  ROOT = File.expand_path("../..", __dir__)
  PROJECT_LIB = File.join(ROOT, "lib")
  DEFAULT_FLUENTD_LIB = %w[/opt/serverengine/lib /opt/fluentd/lib].freeze
  RUNNING = /fluentd worker is now running worker=(\d+)/.freeze

  # fluentd is not installed / not found.
  class NotFound < StandardError; end

  # Startup failed, the process exited while being waited for, or a wait timed out. The message
  # ends with the tail of fluentd's log and its stderr.
  class Error < StandardError; end

  NOT_FOUND = <<~MSG
    fluentd is not available. The demo (like the end-to-end tests and the bench) runs a real
    fluentd (>= 1.8, < 2) with this plugin.
    Either install it as a gem (`gem install fluentd`, or use td-agent / fluent-package's
    ruby), or point FLUENTD_LIB at a fluentd source tree and serverengine >= 2.3:
      FLUENTD_LIB=/path/to/serverengine/lib:/path/to/fluentd/lib script/demo
  MSG

  # What #stop (and #kill!) return.
  #   status     Process::Status of the supervisor (or the lone process); nil if it was reaped
  #              elsewhere
  #   seconds    from the signal to every process of the group gone
  #   escalated  true when the group was still there after the timeout and got SIGKILL
  #   lingering  pids of the group still alive at the timeout (empty unless escalated)
  Stop = Struct.new(:status, :seconds, :escalated, :lingering, keyword_init: true) do
    def exitstatus
      status&.exitstatus
    end

    def termsig
      status&.termsig
    end

    def success?
      !escalated && status&.success? ? true : false
    end
  end

  # ---- finding fluentd ------------------------------------------------------------------

  # [command array, load path dirs]: FLUENTD_LIB (dirs separated by ':'), else
  # /opt/serverengine/lib:/opt/fluentd/lib when both exist, else the fluentd gem.
  # Raises NotFound (message: what to install or set) when there is none.
  def self.locate
    dirs = if ENV["FLUENTD_LIB"] then ENV["FLUENTD_LIB"].split(File::PATH_SEPARATOR).reject(&:empty?)
           elsif DEFAULT_FLUENTD_LIB.all? { |d| File.directory?(d) } then DEFAULT_FLUENTD_LIB.dup
           else []
           end
    lib = dirs.find { |d| File.exist?(File.join(d, "fluent", "engine.rb")) }
    bin = lib && File.expand_path("../bin/fluentd", lib)
    return [[RbConfig.ruby, bin], dirs] if bin && File.exist?(bin)

    begin
      [[RbConfig.ruby, Gem.bin_path("fluentd", "fluentd")], []]
    rescue Gem::Exception
      raise NotFound, NOT_FOUND
    end
  end

  # ---- ports ----------------------------------------------------------------------------

  # A free TCP port on 127.0.0.1 such that port...port+count are all free (monitor_agent with
  # `workers N` listens on port + worker id).
  def self.free_port(count = 1)
    100.times do
      servers = [TCPServer.new("127.0.0.1", 0)]
      port = servers[0].addr[1]
      begin
        (1...count).each { |i| servers << TCPServer.new("127.0.0.1", port + i) }
        return port
      rescue StandardError
        next
      ensure
        servers.each(&:close)
      end
    end
    raise Error, "no #{count} consecutive free ports on 127.0.0.1"
  end

  # ---- the standard pipeline's config ---------------------------------------------------

  # The config the demo and the tests run: in_tail (apache2) of `log` -> this plugin.
  #
  #   dir:             where the pos file and a file buffer go by default
  #   output:          the output (kinesis_streams_aggregated by default, kinesis_streams,
  #                    kinesis_firehose: then `stream` is the delivery_stream_name)
  #   stream:, endpoint:, region:, aws_key_id:, aws_sec_key:   the plugin's connection (fake
  #                    static credentials by default)
  #   parse:           in_tail's parser (apache2 by default; none keeps each line in "message")
  #   log:             the tailed file (default dir/access.log); tag: its tag (apache.access)
  #   read_from_head:  in_tail's (default true); pos_file: default "#{log}.pos"
  #   tail:            false leaves in_tail out (e.g. events only through in_forward)
  #   tail_worker:     with workers > 1, the worker in_tail runs on (it is not multi-worker
  #                    ready), inside <worker N>
  #   plugin:          extra lines for the <match> (String or Array), e.g. "partition_key host"
  #   buffer:          the <buffer> section: {type: "memory"|"file", path: (file; default
  #                    dir/buffer, a directory: per-worker subdirectories with workers),
  #                    flush_interval: "1s" (default), flush_thread_count:, chunk_limit_size:,
  #                    chunk_keys: "tag" (the section's argument), any other buffer parameter}
  #   match:           the <match> pattern (default: the tag)
  #   monitor_port:    adds monitor_agent on 127.0.0.1:port (worker N: port + N)
  #   forward_port:    adds in_forward on 127.0.0.1:port (shared by all workers)
  #   workers:         <system> workers N </system>
  #   system:          extra <system> lines (String or Array); log_level: <system> log_level
  #   error_file:      adds <label @ERROR> writing every error event as a JSON line (with its
  #                    tag in "tag") to exactly this file, flushed immediately
  #   extra:           raw config text appended at the end
  def self.pipeline_config(dir:, stream:, endpoint:, log: nil, tag: "apache.access", read_from_head: true,
                           output: "kinesis_streams_aggregated", parse: "apache2",
                           pos_file: nil, tail: true, tail_worker: 0, region: "ap-northeast-1",
                           aws_key_id: "AKIDTEST", aws_sec_key: "secretsecret", plugin: nil, buffer: {},
                           match: nil, monitor_port: nil, forward_port: nil, workers: nil, system: nil,
                           log_level: nil, error_file: nil, extra: nil)
    log ||= File.join(dir, "access.log")
    parts = []
    system_lines = []
    system_lines << "workers #{workers}" if workers
    system_lines << "log_level #{log_level}" if log_level
    system_lines.concat(lines(system))
    parts << section("system", system_lines) unless system_lines.empty?
    if monitor_port
      parts << section("source", ["@type monitor_agent", "bind 127.0.0.1", "port #{monitor_port}"])
    end
    if forward_port
      parts << section("source", ["@type forward", "bind 127.0.0.1", "port #{forward_port}"])
    end
    if tail
      source = tail_source(log: log, pos_file: pos_file, tag: tag, read_from_head: read_from_head, parse: parse)
      parts << (workers.to_i > 1 ? section("worker #{tail_worker}", [source]) : source)
    end
    buffer = { flush_interval: "1s" }.merge(buffer.transform_keys(&:to_sym))
    chunk_keys = buffer.delete(:chunk_keys)
    type = buffer.delete(:type)&.to_s
    buffer[:path] ||= File.join(dir, "buffer") if type == "file"
    buffer_lines = []
    buffer_lines << "@type #{type}" if type
    buffer_lines.concat(buffer.map { |k, v| "#{k} #{v}" })
    parts << section("match #{match || tag}",
                     ["@type #{output}", "#{output == "kinesis_firehose" ? "delivery_stream_name" : "stream_name"} #{stream}",
                      "region #{region}", "endpoint #{endpoint}",
                      *("aws_key_id #{aws_key_id}" if aws_key_id), *("aws_sec_key #{aws_sec_key}" if aws_sec_key),
                      *lines(plugin),
                      section(chunk_keys ? "buffer #{Array(chunk_keys).join(",")}" : "buffer", buffer_lines)])
    parts << error_label(error_file) if error_file
    parts << extra.to_s unless extra.to_s.empty?
    parts.join
  end

  # The <source> of in_tail reading the Apache log at `log` (apache2 parser unless `parse` says).
  def self.tail_source(log:, pos_file: nil, tag: "apache.access", read_from_head: true, parse: "apache2")
    section("source", ["@type tail", "path #{log}", "pos_file #{pos_file || "#{log}.pos"}", "tag #{tag}",
                       ("read_from_head true" if read_from_head), section("parse", ["@type #{parse}"])].compact)
  end

  # <label @ERROR> writing error events to `path`, one JSON object a line.
  def self.error_label(path)
    section("label @ERROR", [section("match **", [
                                       "@type file", "path #{path}", "append true", "add_path_suffix false",
                                       section("format", ["@type json"]), section("inject", ["tag_key tag"]),
                                       section("buffer []", ["@type memory", "flush_mode immediate"])
                                     ])])
  end

  # Records of a file written by <label @ERROR> (pipeline_config's error_file), [] when absent.
  def self.read_json_lines(path)
    File.exist?(path) ? File.readlines(path, chomp: true).reject(&:empty?).map { |l| JSON.parse(l) } : []
  end

  def self.lines(value)
    value.is_a?(Array) ? value.compact.flat_map { |v| v.to_s.lines(chomp: true) } : value.to_s.lines(chomp: true)
  end

  def self.section(head, body)
    name = head.split.first
    inner = body.flat_map { |b| b.to_s.lines(chomp: true) }.map { |l| l.empty? ? l : "  #{l}" }
    "<#{head}>\n#{inner.map { |l| "#{l}\n" }.join}</#{name}>\n"
  end
  private_class_method :lines, :section

  # ---- processes --------------------------------------------------------------------------

  attr_reader :dir, :config_path, :log, :pid, :pgid, :workers, :monitor_port, :forward_port, :name, :status

  # Writes `config` to dir/config_name. Nothing runs until #start.
  #
  #   supervisor:   true runs fluentd's supervisor, which spawns the worker(s) (production);
  #                 false runs one process with --no-supervisor (it is the worker)
  #   env:          extra environment (RUBYLIB here replaces the computed one)
  #   log:          fluentd's log file (-o), default dir/fluentd.log
  #   workers:      how many workers #wait_until_running waits for (default: `workers N` in the
  #                 config's <system>, else 1)
  #   monitor_port: monitor_agent's port for #monitor_plugins (default: from the config)
  #   forward_port: in_forward's port for #forward (default: from the config)
  #   load_path:    RUBYLIB dirs instead of this project's lib + fluentd's (e.g. another plugin)
  #   command:      instead of FluentdProcess.locate's
  #   args:         extra fluentd arguments
  #   stdout:, stderr:  where the process's stdout/stderr go: a path (appended), File::NULL, or
  #                 :inherit; default /dev/null and "#{log}.stderr"
  #   name:         used in messages
  def initialize(dir:, config:, supervisor: true, env: {}, log: nil, workers: nil, monitor_port: nil,
                 forward_port: nil, config_name: "fluent.conf", load_path: nil, command: nil, args: [],
                 stdout: File::NULL, stderr: nil, name: "fluentd")
    @dir = dir
    FileUtils.mkdir_p(dir)
    @config_path = File.join(dir, config_name)
    File.write(@config_path, config)
    @supervisor = supervisor
    @env = env
    @log = log || File.join(dir, "fluentd.log")
    @workers = workers || config[%r{<system>(?:(?!</system>).)*?^\s*workers\s+(\d+)}m, 1]&.to_i || 1
    @monitor_port = monitor_port || source_port(config, "monitor_agent")
    @forward_port = forward_port || source_port(config, "forward")
    @load_path = load_path
    @command = command
    @args = args
    @stdout = stdout
    @stderr = stderr || "#{@log}.stderr"
    @name = name
    @pid = nil
    @start_mark = 0
  end

  def supervisor?
    @supervisor
  end

  # Spawns fluentd in its own process group. Can be called again after #stop / #kill! (same
  # config, log appended: a restart). Returns self.
  def start
    raise Error, "#{@name} is already running (pid #{@pid})" if @pid && alive?

    command, dirs = @command ? [@command, []] : self.class.locate
    env = { "RUBYLIB" => (@load_path || [PROJECT_LIB, *dirs]).join(File::PATH_SEPARATOR) }.merge(@env)
    argv = [*command, "-c", @config_path, "-o", @log]
    argv << "--no-supervisor" unless @supervisor
    argv.concat(@args)
    opts = { pgroup: true }
    opts[:out] = redirect(@stdout) unless @stdout == :inherit
    opts[:err] = redirect(@stderr) unless @stderr == :inherit
    @start_mark = log_mark
    @status = nil
    @reaped = false
    @pid = @pgid = Process.spawn(env, *argv, **opts)
    self.class.track(self)
    self
  end

  # Until every worker (0...workers) has logged "fluentd worker is now running" since the
  # last #start (or since `since`, a #log_mark: after a restart of workers, a SIGHUP...).
  # Raises Error with the log's tail when the process exits first or on timeout. Returns self.
  def wait_until_running(timeout = 60, since: @start_mark, workers: @workers)
    wait_until(timeout, "'fluentd worker is now running' from #{workers} worker(s)") do
      ids = log_text(since: since).scan(RUNNING).flatten.map(&:to_i)
      (0...workers).all? { |w| ids.include?(w) }
    end
    self
  end

  # Signals the supervisor (or, with supervisor: false, the only process).
  def signal(sig)
    Process.kill(sig, @pid)
  end

  # Pids of the workers: the supervisor's live children (with supervisor: false, the process
  # itself while alive). Empty while the supervisor has not spawned them yet.
  def worker_pids
    return [] unless @pid
    return(alive? ? [@pid] : []) unless @supervisor

    self.class.processes.select { |p| p[:ppid] == @pid && p[:state] != "Z" }.map { |p| p[:pid] }.sort
  end

  # Sends `sig` to every worker (a worker crash when :KILL; the supervisor restarts them).
  # Returns the pids signalled.
  def kill_workers(sig = :KILL)
    worker_pids.each do |p|
      Process.kill(sig, p)
    rescue Errno::ESRCH
      nil
    end
  end

  # Live (non-zombie) pids of the process group: supervisor and workers.
  def group_pids
    return [] unless @pgid

    self.class.processes.select { |p| p[:pgrp] == @pgid && p[:state] != "Z" }.map { |p| p[:pid] }.sort
  end

  # Whether the supervisor (or the lone process) is still running.
  def alive?
    return false unless @pid

    reap(false)
    !@reaped
  end

  # TERM (or `signal`) to the supervisor, then waits up to `timeout` seconds for it and every
  # other process of its group (workers) to be gone. Only after the timeout: SIGKILL to the
  # whole group, with a warning saying so. Returns a Stop (status, seconds, escalated, lingering).
  def stop(timeout: 30, signal: :TERM)
    return Stop.new(status: @status, seconds: 0.0, escalated: false, lingering: []) unless @pid

    t0 = now
    begin
      Process.kill(signal, @pid) if alive?
    rescue Errno::ESRCH
      nil
    end
    deadline = t0 + timeout
    sleep 0.05 until (!alive? && group_pids.empty?) || now > deadline
    lingering = alive? ? [@pid, *group_pids].uniq.sort : group_pids
    escalated = !lingering.empty?
    if escalated
      warn "FluentdProcess: #{@name} (pid #{@pid}) still running #{timeout} s after SIG#{signal} " \
           "(pids #{lingering.join(", ")}): sending SIGKILL to its process group #{@pgid}"
      kill_group
    end
    finished(Stop.new(status: @status, seconds: now - t0, escalated: escalated, lingering: lingering))
  end

  # SIGKILL to the whole process group, supervisor and workers at once: a crash (nothing
  # flushes, nothing shuts down). Waits until they are gone; returns a Stop.
  def kill!
    return Stop.new(status: @status, seconds: 0.0, escalated: false, lingering: []) unless @pid

    t0 = now
    kill_group
    finished(Stop.new(status: @status, seconds: now - t0, escalated: false, lingering: []))
  end

  # ---- the log ----------------------------------------------------------------------------

  # fluentd's log (every run of this object: it is appended), from byte offset `since`.
  def log_text(since: 0)
    File.open(@log, "rb") do |f|
      f.seek(since)
      f.read.force_encoding(Encoding::UTF_8).scrub
    end
  rescue Errno::ENOENT
    ""
  end

  # The log's current size: pass it as `since:` to look only at what comes after.
  def log_mark
    File.size(@log)
  rescue Errno::ENOENT
    0
  end

  def log_tail(bytes = 4000)
    text = log_text
    text.bytesize > bytes ? text.byteslice(-bytes, bytes).scrub : text
  end

  # Waits until the log (since the last #start, or `since`) matches `regex`; returns the
  # MatchData. Raises Error on timeout or when the process exits without logging it.
  def wait_for_log(regex, timeout = 30, since: @start_mark)
    wait_until(timeout, "a log line matching #{regex.inspect}") { regex.match(log_text(since: since)) }
  end

  # The log's tail and the process's stderr, for failure messages.
  def diagnostics
    stderr = @stderr.is_a?(String) && @stderr != File::NULL && File.exist?(@stderr) ? File.read(@stderr)[-2000..] || File.read(@stderr) : ""
    "--- #{@log} (tail)\n#{log_tail}" + (stderr.strip.empty? ? "" : "\n--- #{@stderr} (tail)\n#{stderr}")
  end

  # Polls the block every `interval` s until it returns a truthy value, which it returns.
  # Raises Error on timeout, or (require_alive) as soon as the process has exited.
  def wait_until(timeout, what, interval: 0.1, require_alive: true)
    deadline = now + timeout
    loop do
      result = yield
      return result if result

      if require_alive && !alive?
        result = yield
        return result if result

        raise Error, "#{@name} (pid #{@pid}) exited (#{@status&.inspect || "reaped elsewhere"}) before #{what}\n#{diagnostics}"
      end
      raise Error, "#{@name} (pid #{@pid}): no #{what} within #{timeout} s\n#{diagnostics}" if now > deadline

      sleep interval
    end
  end

  # ---- monitor_agent, in_forward ----------------------------------------------------------

  # monitor_agent's /api/plugins.json "plugins" list (of worker `worker`: port + worker id).
  def monitor_plugins(worker: 0)
    raise Error, "#{@name}: no monitor_agent port (pass monitor_port: to the config and to FluentdProcess.new)" unless @monitor_port

    JSON.parse(Net::HTTP.get(URI("http://127.0.0.1:#{@monitor_port + worker}/api/plugins.json")))["plugins"]
  end

  # The first plugin of that @type in monitor_plugins (nil if none).
  def monitor_plugin(type = "kinesis_streams_aggregated", worker: 0)
    monitor_plugins(worker: worker).find { |p| p["type"] == type }
  end

  # Sends records to in_forward (Forward mode: one message with every entry); `time` an
  # Integer (default now). Needs the msgpack gem.
  def forward(tag, records, time: Time.now.to_i)
    raise Error, "#{@name}: no in_forward port (pass forward_port:)" unless @forward_port

    require "msgpack"
    TCPSocket.open("127.0.0.1", @forward_port) do |s|
      s.write(MessagePack.pack([tag, records.map { |r| [time, r] }]))
    end
    records.size
  end

  # ---- process table, safety net ------------------------------------------------------------

  # Every process of the machine: [{pid:, ppid:, pgrp:, state:, comm:}] from /proc/*/stat.
  def self.processes
    Dir.glob("/proc/[0-9]*/stat").filter_map do |path|
      stat = File.read(path)
      close = stat.rindex(")")
      state, ppid, pgrp = stat[(close + 2)..].split(" ", 4)
      { pid: stat.to_i, ppid: ppid.to_i, pgrp: pgrp.to_i, state: state, comm: stat[(stat.index("(") + 1)...close] }
    rescue Errno::ENOENT, Errno::ESRCH, NoMethodError
      nil
    end
  end

  @started = []
  @owner = nil

  class << self
    # Every FluentdProcess started by this Ruby process.
    attr_reader :started

    # Registers `fluentd` for the at-exit safety net (registered at the first start, so it runs
    # after a test runner's own at_exit has run the tests).
    def track(fluentd)
      @started << fluentd unless @started.include?(fluentd)
      return if @owner

      @owner = Process.pid
      at_exit { kill_leftovers if Process.pid == @owner }
    end

    # Kills (SIGKILL, by process group) every started fluentd still there, saying so.
    def kill_leftovers
      @started.each do |fluentd|
        left = fluentd.group_pids
        next if left.empty? && !fluentd.alive?

        warn "FluentdProcess: #{fluentd.name} (pgid #{fluentd.pgid}, pids #{left.join(", ")}) was still running " \
             "at exit: killing its process group"
        fluentd.kill!
      end
    end
  end

  private

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def redirect(target)
    target.is_a?(String) && target != File::NULL ? [target, "a"] : target
  end

  def source_port(config, type)
    block = config.scan(%r{<source>(.*?)</source>}m).map(&:first).find { |b| b =~ /^\s*@type\s+#{type}\s*$/ }
    block && block[/^\s*port\s+(\d+)/, 1]&.to_i
  end

  # Reaps the supervisor if it has exited (blocking: waits for it).
  def reap(block)
    return if @reaped

    res = Process.wait2(@pid, block ? 0 : Process::WNOHANG)
    if res
      @status = res[1]
      @reaped = true
    end
  rescue Errno::ECHILD
    @reaped = true
  end

  # SIGKILL to the group, then reaps the supervisor and waits (10 s) for the group to be gone.
  def kill_group
    begin
      Process.kill(:KILL, -@pgid)
    rescue Errno::ESRCH, Errno::EPERM
      nil
    end
    reap(true)
    deadline = now + 10
    sleep 0.02 until group_pids.empty? || now > deadline
    left = group_pids
    warn "FluentdProcess: #{@name}: pids #{left.join(", ")} of process group #{@pgid} survived SIGKILL" unless left.empty?
  end

  def finished(stop)
    self.class.started.delete(self) if group_pids.empty?
    @last_stop = stop
  end
end

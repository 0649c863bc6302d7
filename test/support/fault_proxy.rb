# frozen_string_literal: true

require "json"
require "open3"
require "timeout"

# The Rust tests' fault-injecting proxy (ext/kinesis_core/tests/support/fault_proxy.rs), run as
# ext/kinesis_core/examples/kinesis_fault_proxy.rs in front of a local Kinesis, or of moto for
# Amazon Data Firehose. Point the plugin's endpoint at #endpoint, then inject what the real
# service does to calls of the proxy's operation (PutRecords, or PutRecordBatch for Firehose):
#
#   FaultProxy.new(kinesis.endpoint)     faults apply to PutRecords calls
#   FaultProxy.new(moto.endpoint, operation: "PutRecordBatch")   ... to PutRecordBatch calls
#   proxy.push(2, "status 500")          the next two calls answer 500 InternalFailure
#   proxy.always("partial_throttle 0.5") half the entries of every call are throttled
#   proxy.sometimes(0.02, "status 500")  2% of the calls answer 500 (tried before #always)
#   proxy.shard_limit(1_048_576, 1000)   PutRecords entries over a shard's rate (real Kinesis's
#                                        here) are throttled and not forwarded
#   proxy.clear                          back to forwarding untouched (no shard limit either)
#   proxy.stats                          {"requests" => {"PutRecords" => n}, "faults_injected" => n, ...}
#   proxy.stats["access_keys"]           {"AKID" => {"PutRecords" => n, ...}}: who signed the calls
#
# Faults: "status 500|503", "throttle_request", "partial_throttle F", "partial_internal_failure F",
# "reset", "delay_ms MS". Each fails as the service does: a throttled PutRecords call answers 400
# ProvisionedThroughputExceededException, a throttled PutRecordBatch call 500
# ServiceUnavailableException, and throttled entries carry those error codes. A call with no
# queued fault gets the first #sometimes fault whose roll hits, else the #always one. The shard
# limit applies to every PutRecords call no whole-call fault stopped.
class FaultProxy
  ROOT = File.expand_path("../..", __dir__)
  EXAMPLE = "kinesis_fault_proxy"
  # As script/test: one target directory outside the checkout unless CARGO_TARGET_DIR says otherwise.
  DEFAULT_TARGET_DIR = "/var/cache/fluent-plugin-kinesis-rs/target"
  ANSWER_TIMEOUT = 10

  OPERATIONS = %w[PutRecords PutRecordBatch].freeze

  attr_reader :endpoint, :pid, :operation

  # The proxy binary, (re)built first: cargo does nothing when it is up to date, and a stale
  # binary from an older checkout sharing the target directory is never used.
  def self.binary
    target = ENV["CARGO_TARGET_DIR"].to_s.empty? ? DEFAULT_TARGET_DIR : ENV["CARGO_TARGET_DIR"]
    path = File.join(target, "debug", "examples", EXAMPLE)
    command = ["cargo", "build", "--quiet", "-p", "kinesis_core", "--example", EXAMPLE]
    ok = system({ "CARGO_TARGET_DIR" => target }, *command, chdir: ROOT)
    raise "`#{command.join(" ")}` failed (CARGO_TARGET_DIR=#{target})" unless ok && File.executable?(path)

    path
  end

  # operation: the one #push, #always and #sometimes apply faults to, "PutRecords" (Kinesis) or
  # "PutRecordBatch" (Firehose).
  def initialize(upstream, operation: "PutRecords")
    raise ArgumentError, "operation #{operation.inspect} is not one of #{OPERATIONS.join(", ")}" unless OPERATIONS.include?(operation)

    @operation = operation
    # stdin stays open while we live: the proxy exits when it closes, even if we crash.
    @stdin, @stdout, @wait = Open3.popen2(self.class.binary, upstream, operation)
    info = JSON.parse(answer_line("startup"))
    @pid = info.fetch("pid")
    @endpoint = "http://127.0.0.1:#{info.fetch("port")}"
  end

  # Applies fault to each of the next n calls of the proxy's operation.
  def push(n, fault)
    command("push #{n} #{fault}")
  end

  # Applies fault to every call of the proxy's operation after the queued ones, until #clear.
  def always(fault)
    command("always #{fault}")
  end

  # Applies fault, with the given probability (0 to 1), to a call of the proxy's operation with no
  # queued fault, until #clear. Such faults are rolled in the order added; the first that hits
  # applies.
  def sometimes(probability, fault)
    command("sometimes #{probability} #{fault}")
  end

  # Limits each open shard to bytes_per_sec (data plus partition key) and records_per_sec, as
  # Kinesis does: PutRecords entries over it fail with ProvisionedThroughputExceededException.
  # Until #no_shard_limit or #clear.
  def shard_limit(bytes_per_sec, records_per_sec)
    command("shard_limit #{Integer(bytes_per_sec)} #{Integer(records_per_sec)}")
  end

  def no_shard_limit
    command("shard_limit off")
  end

  # Drops queued, occasional and standing faults and the shard limit; the counters stay.
  def clear
    command("clear")
  end

  # What the proxy saw and did: requests per operation, faults_injected, and, counting the entries
  # of both batch puts (PutRecords, PutRecordBatch): entries_throttled (entries_over_shard_limit
  # included), entries_over_shard_limit, entries_internal_failure, entries_forwarded,
  # user_records_forwarded (user records, those of a KPL aggregate or 1 per other entry, in the
  # entries the upstream accepted), pending (queued faults not applied yet), and the gauges
  # in_flight_put_entries and in_flight_user_records: the batch put entries, and the user records
  # in them, of the calls received and not answered yet (delayed ones and those waiting for the
  # upstream included; a call counts until the proxy is done with it, even if the client gave
  # up); access_keys: the calls per access key id of their SigV4 signature ("(unsigned)" for
  # calls without one), then per operation.
  def stats
    command("stats")
  end

  def stop
    return unless @pid

    @stdin.close unless @stdin.closed?
    Process.kill("TERM", @pid) unless @wait.join(2)
    @wait.join(5)
  rescue Errno::ESRCH
    nil
  ensure
    @pid = nil
  end

  # Sends one command line as the program reads it ("shard_limit 1048576 1000",
  # "sometimes 0.02 status 500", "always partial_internal_failure 0.05", ...).
  def command_line(line)
    command(line)
  end

  private

  def command(line)
    raise "the fault proxy is stopped" unless @pid

    @stdin.puts(line)
    @stdin.flush
    answer = JSON.parse(answer_line(line))
    raise ArgumentError, "fault proxy: #{answer["error"]}" if answer.key?("error")

    answer
  end

  def answer_line(what)
    line = Timeout.timeout(ANSWER_TIMEOUT) { @stdout.gets }
    raise "the fault proxy did not answer #{what.inspect} (exit #{@wait.value if @wait.join(0)})" unless line

    line
  end
end

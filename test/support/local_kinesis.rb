# frozen_string_literal: true

require "json"
require "base64"
require "open3"

# A kinesalite server on 127.0.0.1 for the Ruby tests, with the Python admin/consumer script
# (boto3 + aws_kinesis_agg) to create streams and read everything back deaggregated.
class LocalKinesis
  SUPPORT = __dir__
  SETUP = "run `npm ci --prefix test/support` and `pip install -r test/support/requirements.txt`"

  attr_reader :endpoint, :pid

  def self.shared
    @shared ||= new.tap { |k| at_exit { k.stop } }
  end

  def initialize
    unless File.exist?(File.join(SUPPORT, "node_modules", "kinesalite", "package.json"))
      raise "kinesalite is not installed: #{SETUP}"
    end

    # stdin stays open while we live: the server exits when it closes, even if we crash.
    @stdin, @stdout, @wait = Open3.popen2("node", File.join(SUPPORT, "kinesalite.js"))
    line = @stdout.gets or raise "kinesalite did not start (is node installed?)"
    info = JSON.parse(line)
    @pid = info.fetch("pid")
    @endpoint = "http://127.0.0.1:#{info.fetch("port")}"
    @streams = 0
  end

  def stop
    return unless @pid

    Process.kill("TERM", @pid)
    @wait.join(5)
  rescue Errno::ESRCH
    nil
  ensure
    @stdin&.close unless @stdin&.closed?
    @pid = nil
  end

  def unique_stream(prefix = "test")
    @streams += 1
    "#{prefix}-#{Process.pid}-#{@streams}"
  end

  def create_stream(name, shards)
    admin("create", name, shards.to_s)
    name
  end

  # Splits the stream's first open shard in two (a reshard) and waits until it is ACTIVE again.
  def split_shard(name)
    admin("split", name)
  end

  # {"records" => [{"data" => bytes, "partition_key", "explicit_hash_key", "shard", "aggregated",
  #                  "kcl_ok", "sequence_number", "arrival", "sub_sequence"}...],
  #  "kinesis_records" => n, "kcl_dropped_aggregates" => n}
  # sequence_number (String) and arrival (Float, epoch seconds) are the Kinesis record's, shared by
  # the user records of an aggregate; sub_sequence is the index in the aggregate (0 if none).
  def read(name)
    out = JSON.parse(admin("read", name))
    out["records"].each { |r| r["data"] = Base64.strict_decode64(r["data"]) }
    out
  end

  # Reads the stream until it holds at least `count` user records, every second, and returns what
  # #read returned; after `timeout` seconds raises, with what the block returns (e.g. the
  # fluentd log) in the message.
  def wait_for_records(name, count, timeout: 90)
    deadline = Time.now + timeout
    loop do
      got = read(name)
      return got if got["records"].size >= count
      if Time.now > deadline
        raise "only #{got["records"].size} of #{count} records arrived in #{timeout}s#{"; #{yield}" if block_given?}"
      end

      sleep 1
    end
  end

  private

  def admin(*args)
    python = ENV.fetch("PYTHON", "python3")
    out, err, status = Open3.capture3(python, File.join(SUPPORT, "kinesis_admin.py"), args[0], @endpoint, *args[1..])
    raise "kinesis_admin.py #{args.join(" ")} failed (#{SETUP}): #{err}" unless status.success?

    out
  end
end

# frozen_string_literal: true

require "base64"
require "json"
require "open3"
require_relative "moto_server"

# Amazon Data Firehose with S3 behind it, served by a moto server on 127.0.0.1: delivery streams
# to create, and what reached S3 to read back (moto writes each PutRecordBatch call's records,
# concatenated, as one object).
#
#   firehose = LocalFirehose.new(MotoServer.shared)
#   name = firehose.create(firehose.unique_name("fh"))
#   firehose.objects(name)   # => [bytes of each object...]
class LocalFirehose
  SUPPORT = __dir__

  attr_reader :moto

  @names = 0
  class << self
    # A number no other delivery stream of this process has (moto outlives each LocalFirehose).
    def next_id
      @names += 1
    end
  end

  def initialize(moto)
    @moto = moto
  end

  def endpoint
    @moto.endpoint
  end

  def unique_name(prefix = "fh")
    "#{prefix}-#{Process.pid}-#{self.class.next_id}"
  end

  # A direct PUT delivery stream `name` writing to the bucket "<name>-bucket".
  def create(name)
    admin("create", name)
    name
  end

  # The bytes of every S3 object the delivery stream wrote (one per PutRecordBatch call).
  def objects(name)
    JSON.parse(admin("read", name))["objects"].map { |o| Base64.strict_decode64(o["data"]) }
  end

  # What S3 holds, as lines (each object split after every "\n"), in no particular order.
  def lines(name)
    objects(name).flat_map { |o| o.lines }
  end

  # Waits until S3 holds at least `count` lines; returns them.
  def wait_for_lines(name, count, timeout: 60)
    deadline = Time.now + timeout
    loop do
      got = lines(name)
      return got if got.size >= count
      raise "only #{got.size} of #{count} lines reached S3 in #{timeout}s" if Time.now > deadline

      sleep 0.5
    end
  end

  private

  def admin(*args)
    python = ENV.fetch("PYTHON", "python3")
    out, err, status = Open3.capture3(python, File.join(SUPPORT, "firehose_admin.py"), args[0], endpoint, *args[1..])
    raise "firehose_admin.py #{args.join(" ")} failed (#{MotoServer::SETUP}): #{err}" unless status.success?

    out
  end
end

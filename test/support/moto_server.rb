# frozen_string_literal: true

require "base64"
require "json"
require "net/http"
require "open3"
require "socket"
require "tmpdir"
require "fileutils"

# A moto server (`python3 -m moto.server`, PyPI moto[server]) on 127.0.0.1 for the Ruby tests:
# STS, IAM, CloudWatch... and the EC2 instance metadata service (IMDSv2) on one port.
#
#   moto = MotoServer.shared            # one per test process, stopped at exit
#   moto.endpoint                       # "http://127.0.0.1:PORT" (AWS_ENDPOINT_URL_STS, ...)
#   moto.reset                          # forget every resource (POST /moto-api/reset)
#   moto.reset_auth(4)                  # check SigV4 signatures and IAM policies after 4 more
#                                       # actions; reset_auth(nil) turns the checks off again
#   moto.record { ... }                 # => the requests moto received meanwhile
#   moto.data                           # => what moto holds (issued STS sessions, metrics, ...)
#   MotoServer.new(env: { "MOTO_ENABLE_RECORDING" => "1" })   # a private one, extra env
#
# moto answers unsigned and wrongly signed requests alike unless reset_auth (or env
# INITIAL_NO_AUTH_ACTION_COUNT) turned on its IAM checks. moto 5.2.1's IMDSv2 token answer lacks the
# x-aws-ec2-metadata-token-ttl-seconds header, which the AWS SDK for Rust requires (it never falls
# back to IMDSv1): the launcher adds it, echoing the TTL asked for (unless imds_token_ttl: false).
# The server exits when our end of its stdin closes, so it does not outlive a crashed test either.
class MotoServer
  SETUP = "pip install -r test/support/requirements.txt"
  READY_TIMEOUT = 30
  PING = "/moto-api/reset" # answers a GET with "Need to POST to reset Moto"

  # Runs moto's server (argv: -H HOST -p PORT) and exits when our end of its stdin closes.
  LAUNCHER = <<~PY
    import os, sys, threading

    def exit_when_stdin_closes():
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    %<patches>s
    from moto.server import main
    main(sys.argv[1:])
  PY
  # Adds x-aws-ec2-metadata-token-ttl-seconds (the TTL asked for) to the IMDSv2 token answer.
  IMDS_TOKEN_TTL = <<~PY
    from urllib.parse import urlparse
    from moto.instance_metadata import urls as imds_urls

    TTL = "x-aws-ec2-metadata-token-ttl-seconds"

    def with_token_ttl(answer):
        def metadata_response(request, full_url, headers):
            status, out, body = answer(request, full_url, headers)
            if urlparse(full_url).path == "/latest/api/token":
                out = dict(out or {})
                out[TTL] = request.headers.get(TTL) or "21600"
            return status, out, body
        return metadata_response

    for path, answer in list(imds_urls.url_paths.items()):
        imds_urls.url_paths[path] = with_token_ttl(answer)
  PY

  # Raised when moto (or what its server mode needs) is not installed.
  class NotInstalled < StandardError; end

  attr_reader :endpoint, :port, :pid, :log

  # nil when moto's server mode can be imported, else what is missing and how to install it.
  def self.missing
    return @missing if defined?(@missing)

    python = ENV.fetch("PYTHON", "python3")
    _, err, status = Open3.capture3(python, "-c", "import moto, moto.server, flask, flask_cors")
    @missing = status.success? ? nil : "moto[server] is not installed (#{err.lines.last&.strip}): #{SETUP}"
  rescue Errno::ENOENT
    @missing = "#{python} is not installed; then #{SETUP}"
  end

  def self.shared
    @shared ||= new.tap { |m| at_exit { m.stop } }
  end

  # env: extra environment for the server (e.g. INITIAL_NO_AUTH_ACTION_COUNT, MOTO_ENABLE_RECORDING).
  # imds_token_ttl: false leaves moto's IMDSv2 token answer as it is (without the TTL header).
  def initialize(env: {}, imds_token_ttl: true)
    raise NotInstalled, self.class.missing if self.class.missing

    @launcher = format(LAUNCHER, patches: imds_token_ttl ? IMDS_TOKEN_TTL : "")

    @dir = Dir.mktmpdir("moto")
    @log = File.join(@dir, "moto.log")
    # Recordings (MOTO_ENABLE_RECORDING, /moto-api/recorder/...) go here, not into the cwd.
    env = { "MOTO_RECORDER_FILEPATH" => File.join(@dir, "recording.jsonl") }.merge(env)
    attempts = 0
    begin
      attempts += 1
      launch(env, free_port)
    rescue EOFError
      # moto exited: maybe another process took the port between our probe and moto's bind.
      halt
      retry if attempts < 3
      stop
      raise
    end
  end

  # Forgets every resource of every service (moto's POST /moto-api/reset).
  def reset
    api("reset")
    self
  end

  # Turns on moto's IAM checks (SigV4 signature and policies of every action) after `count` more
  # actions, which go unchecked (to create the users, keys and policies the checks need); nil turns
  # them off. Returns self.
  def reset_auth(count)
    api("reset-auth", count.nil? ? "inf" : Integer(count).to_s)
    self
  end

  # Every request moto received while the block ran (its recorder), in order:
  # [{"method", "url", "headers" => {name => value}, "body" => bytes}...]. IMDS calls included.
  def record
    api("recorder/reset-recording")
    api("recorder/start-recording")
    begin
      yield
    ensure
      api("recorder/stop-recording")
    end
    api("recorder/download-recording").each_line.map do |line|
      entry = JSON.parse(line)
      body = entry.delete("body").to_s
      entry.delete("body_encoded") ? entry.merge("body" => Base64.decode64(body)) : entry.merge("body" => body)
    end
  end

  # What moto holds, {service => {model => [{attribute => value}...]}} (GET /moto-api/data.json):
  # e.g. data["sts"]["AssumedRole"], the sessions its STS issued, secrets included.
  def data
    JSON.parse(Net::HTTP.get(URI("#{@endpoint}/moto-api/data.json")))
  end

  # POSTs `body` to moto's /moto-api/<path> (reset, reset-auth, recorder/start-recording, ...)
  # and returns the answer's body. Raises unless moto answers 200.
  def api(path, body = "")
    res = Net::HTTP.start("127.0.0.1", @port, read_timeout: 30) do |http|
      http.post("/moto-api/#{path}", body.to_s, "Content-Type" => "text/plain")
    end
    raise "moto /moto-api/#{path}: HTTP #{res.code} #{res.body}" unless res.code == "200"

    res.body
  end

  def stop
    halt
    FileUtils.rm_rf(@dir) if @dir && !@wait&.alive?
  end

  private

  # Ends the server: its stdin closes, then TERM, then KILL, each given 5 s. By pid only.
  def halt
    return unless @pid

    @stdin.close unless @stdin.closed?
    %w[TERM KILL].each do |signal|
      break if @wait.join(5)

      Process.kill(signal, @pid)
    end
    @wait.join(5)
  rescue Errno::ESRCH
    nil
  ensure
    @pid = nil
  end

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def launch(env, port)
    python = ENV.fetch("PYTHON", "python3")
    @port = port
    @endpoint = "http://127.0.0.1:#{port}"
    reader, @stdin = IO.pipe
    @pid = Process.spawn(env, python, "-c", @launcher, "-H", "127.0.0.1", "-p", port.to_s,
                         in: reader, %i[out err] => [@log, "a"])
    reader.close
    @wait = Process.detach(@pid)
    wait_until_ready
  end

  def wait_until_ready
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + READY_TIMEOUT
    loop do
      raise EOFError, "moto exited (#{@wait.value}) before it listened on #{@endpoint}:\n#{log_tail}" unless @wait.alive?

      begin
        body = Net::HTTP.start("127.0.0.1", @port, open_timeout: 1, read_timeout: 2) { |http| http.get(PING).body }
        return if body.include?("Need to POST")
      rescue Errno::ECONNREFUSED, Errno::ECONNRESET, EOFError, Net::OpenTimeout, Net::ReadTimeout
        nil
      end
      raise "moto did not answer on #{@endpoint} within #{READY_TIMEOUT} s:\n#{log_tail}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.1
    end
  end

  def log_tail
    File.exist?(@log) ? File.read(@log)[-2000..] || File.read(@log) : ""
  end
end

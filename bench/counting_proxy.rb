# frozen_string_literal: true

# A counting HTTP proxy in front of a local Kinesis, so that both plugins' PutRecords traffic
# is measured the same way, on the wire, outside the measured processes.
#
#   ruby bench/counting_proxy.rb http://127.0.0.1:UPSTREAM_PORT
#
# Listens on 127.0.0.1 (a free port), prints {"port": N, "pid": P} on stdout, and exits when its
# stdin closes. Every request is forwarded unchanged over one upstream connection per client
# connection. For PutRecords (X-Amz-Target Kinesis_20131202.PutRecords, JSON body) it counts,
# per stream: calls, entries, bytes (data + partition key, as Kinesis counts them), PUT payload
# units (25 KiB per entry, rounded up), user records inside KPL aggregates, failed entries from
# the response, the entries, bytes and payload units the answer says were delivered, full calls,
# the seconds spent waiting for the upstream's answers, and the time of the first call and of the
# last successful entry. A call is full when it holds
# 500 entries, or when its bytes are within one record of the largest size (1 MiB) of the 5 MiB
# a call may carry: the next Kinesis record might not have fit.
#
#   GET /__bench/stats               the counters as JSON (these paths never go upstream)
#   GET /__bench/calls?stream=NAME   [[time, bytes delivered], ...]: one pair per call of that
#                                    stream that delivered anything, in the order answered

require "socket"
require "json"
require "uri"

class CountingProxy
  PUT_RECORDS = "Kinesis_20131202.PutRecords"
  KPL_MAGIC = "\xF3\x89\x9A\xC2".b
  PAYLOAD_UNIT = 25 * 1024
  MAX_CALL_BYTES = 5 * 1024 * 1024
  MAX_CALL_ENTRIES = 500
  MAX_RECORD_BYTES = 1024 * 1024

  def initialize(upstream)
    uri = URI(upstream)
    @upstream_host = uri.host
    @upstream_port = uri.port
    @lock = Mutex.new
    @streams = Hash.new { |h, k| h[k] = new_stream_stats }
    @targets = Hash.new(0)
    @calls = Hash.new { |h, k| h[k] = [] }
  end

  def run
    server = TCPServer.new("127.0.0.1", 0)
    $stdout.puts JSON.generate("port" => server.addr[1], "pid" => Process.pid)
    $stdout.flush
    Thread.new do
      $stdin.read
      exit!(0)
    end
    loop do
      client = server.accept
      client.setsockopt(Socket::IPPROTO_TCP, Socket::TCP_NODELAY, 1)
      Thread.new(client) { |c| serve(c) }
    end
  end

  private

  def new_stream_stats
    { "calls" => 0, "entries" => 0, "bytes" => 0, "payload_units" => 0, "user_records" => 0,
      "user_records_ok" => 0, "failed_entries" => 0, "http_errors" => 0, "full_calls" => 0, "last_call_full" => 0,
      "delivered_entries" => 0, "delivered_bytes" => 0, "delivered_payload_units" => 0,
      "max_call_bytes" => 0, "upstream_seconds" => 0.0, "first_call_at" => nil, "last_ok_at" => nil }
  end

  def serve(client)
    upstream = nil
    loop do
      request = read_message(client, request: true) or break
      if (body = own_answer(request[:start]))
        client.write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: #{body.bytesize}\r\n\r\n#{body}")
        next
      end
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      upstream, response = exchange(upstream, request)
      upstream_seconds = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      client.write(response[:raw])
      account(request, response, upstream_seconds)
      if close?(request) || close?(response)
        upstream.close
        upstream = nil
        break if close?(request)
      end
    end
  rescue IOError, SystemCallError => e
    warn "counting_proxy: connection ended: #{e.class}: #{e.message}" unless e.is_a?(EOFError) || e.is_a?(Errno::ECONNRESET)
  ensure
    client.close unless client.closed?
    upstream&.close
  end

  # The JSON body of a /__bench/ request, nil for any other.
  def own_answer(start)
    path = start.split[1].to_s
    return nil unless path.start_with?("/__bench/")

    @lock.synchronize do
      case path
      when "/__bench/stats" then JSON.generate("streams" => @streams, "targets" => @targets)
      when %r{\A/__bench/calls\?stream=(.+)\z} then JSON.generate(@calls.fetch(URI.decode_www_form_component(Regexp.last_match(1)), []))
      else JSON.generate("error" => "unknown path #{path}")
      end
    end
  end

  # Sends the request upstream and reads the answer: [upstream socket, response]. The server
  # closes keep-alive connections that sat idle (node: after 5 s); a request that meets such a
  # connection (write fails, or EOF before any byte of an answer) was never processed, so it
  # goes again once over a new connection.
  def exchange(upstream, request)
    fresh = upstream.nil?
    upstream ||= connect
    upstream.write(request[:raw])
    response = read_message(upstream, request: false) or raise EOFError, "upstream closed the connection"
    [upstream, response]
  rescue EOFError, Errno::EPIPE, Errno::ECONNRESET
    upstream&.close
    raise if fresh

    @lock.synchronize { @targets["(upstream reconnects)"] += 1 }
    exchange(nil, request)
  end

  def connect
    TCPSocket.new(@upstream_host, @upstream_port).tap { |s| s.setsockopt(Socket::IPPROTO_TCP, Socket::TCP_NODELAY, 1) }
  end

  # One HTTP/1.1 message: {start:, headers: {lowercase name => value}, body:, raw:} or nil at
  # EOF. Bodies by Content-Length or chunked (forwarded as received, decoded for counting).
  def read_message(io, request:)
    start = io.gets("\r\n") or return nil
    head = +start
    headers = {}
    while (line = io.gets("\r\n"))
      head << line
      break if line == "\r\n"

      name, value = line.split(":", 2)
      headers[name.strip.downcase] = value.to_s.strip
    end
    if request && headers["expect"]&.casecmp?("100-continue")
      io.write("HTTP/1.1 100 Continue\r\n\r\n")
      head = head.sub(/^expect:[^\r]*\r\n/i, "")
    end
    body = +"".b
    raw = head.b
    if headers["transfer-encoding"]&.include?("chunked")
      loop do
        size_line = io.gets("\r\n") or raise EOFError
        raw << size_line
        size = size_line.to_i(16)
        if size.zero?
          while (trailer = io.gets("\r\n"))
            raw << trailer
            break if trailer == "\r\n"
          end
          break
        end
        chunk = io.read(size + 2)
        raw << chunk
        body << chunk.byteslice(0, size)
      end
    elsif headers["content-length"]
      body = io.read(headers["content-length"].to_i)
      raw << body
    elsif !request && !start.match?(%r{\AHTTP/1\.\d (1\d\d|204|304) })
      body = io.read
      raw << body
      headers["connection"] = "close"
    end
    { start: start, headers: headers, body: body, raw: raw }
  end

  def close?(message)
    message[:headers]["connection"]&.casecmp?("close")
  end

  def account(request, response, upstream_seconds)
    target = request[:headers]["x-amz-target"].to_s
    @lock.synchronize { @targets[target] += 1 }
    return unless target == PUT_RECORDS

    req = JSON.parse(request[:body])
    stream = req["StreamName"] || req["StreamARN"].to_s.split("/").last
    entries = req["Records"].map do |r|
      data = r["Data"].unpack1("m0")
      [data.bytesize + r["PartitionKey"].bytesize, user_records(data)]
    end
    ok = response[:start].include?(" 200 ")
    results = ok ? JSON.parse(response[:body])["Records"] : []
    now = Process.clock_gettime(Process::CLOCK_REALTIME)
    @lock.synchronize do
      s = @streams[stream]
      call_bytes = entries.sum(&:first)
      s["calls"] += 1
      s["upstream_seconds"] += upstream_seconds
      s["entries"] += entries.size
      s["bytes"] += call_bytes
      s["payload_units"] += entries.sum { |bytes, _| (bytes + PAYLOAD_UNIT - 1) / PAYLOAD_UNIT }
      s["user_records"] += entries.sum(&:last)
      full = entries.size >= MAX_CALL_ENTRIES || call_bytes >= MAX_CALL_BYTES - MAX_RECORD_BYTES
      s["full_calls"] += 1 if full
      s["last_call_full"] = full ? 1 : 0
      s["max_call_bytes"] = call_bytes if call_bytes > s["max_call_bytes"]
      s["first_call_at"] ||= now
      unless ok
        s["http_errors"] += 1
        next
      end
      delivered = 0
      delivered_bytes = 0
      entries.each_with_index do |(bytes, users), i|
        if results[i].nil? || results[i]["ErrorCode"]
          s["failed_entries"] += 1
        else
          delivered += users
          delivered_bytes += bytes
          s["delivered_entries"] += 1
          s["delivered_payload_units"] += (bytes + PAYLOAD_UNIT - 1) / PAYLOAD_UNIT
        end
      end
      s["user_records_ok"] += delivered
      s["delivered_bytes"] += delivered_bytes
      next unless delivered.positive?

      s["last_ok_at"] = now
      @calls[stream] << [now, delivered_bytes]
    end
  end

  # User records in one Kinesis record: the number of `records` (field 3) of a KPL aggregate,
  # found by walking the protobuf's top level; 1 for anything that is not an aggregate.
  def user_records(data)
    return 1 unless data.bytesize > 20 && data.byteslice(0, 4) == KPL_MAGIC

    pos = 4
    stop = data.bytesize - 16
    count = 0
    while pos < stop
      tag, pos = varint(data, pos)
      case tag & 7
      when 0 then _, pos = varint(data, pos)
      when 2
        len, pos = varint(data, pos)
        pos += len
        count += 1 if tag >> 3 == 3
      else return 1 # not a KPL aggregate after all
      end
    end
    count
  end

  def varint(data, pos)
    value = 0
    shift = 0
    loop do
      byte = data.getbyte(pos)
      pos += 1
      value |= (byte & 0x7f) << shift
      return [value, pos] if byte < 0x80

      shift += 7
    end
  end
end

CountingProxy.new(ARGV.fetch(0)).run if $PROGRAM_NAME == __FILE__

# frozen_string_literal: true

require "json"

# Apache combined-format access log lines (what fluentd's apache2 parser reads), the one
# generator of the demo, the end-to-end tests and the bench.
#
# The default line (about 190 bytes) carries its number in the request path ("GET /cart#42"),
# so that what is read back from Kinesis can be checked line by line with ApacheLog.number.
# Every field can be replaced, by a value or by a proc of the line number:
#
#   ApacheLog.line(7)                                         the bench's line 7
#   ApacheLog.line(7, time: ->(i) { t0 + i / 100.0 })         the demo: now-ish timestamps
#   ApacheLog.line(7, host: ApacheLog::SPREAD_HOST,           the e2e tests: thousands of client
#                     path: ->(i) { "/shop/item/#{i}?ref=e2e" })  addresses, their own paths
#   ApacheLog.append(log_path, 0...5000, flush_every: 500)    write lines to a tailed file
module ApacheLog
  HOSTS = %w[203.0.113.7 198.51.100.23 192.0.2.45 203.0.113.99 198.51.100.4 192.0.2.200 10.1.7.31].freeze
  USERS = %w[- - - alice bob].freeze
  PATHS = ["/", "/index.html", "/products/42", "/cart/checkout", "/api/v1/items?page=", "/static/app.js"].freeze
  CODES = [200, 200, 200, 304, 404, 500].freeze
  REFERERS = ["https://www.example.com/", "-", "https://www.example.com/products?sort=price"].freeze
  AGENTS = ["Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0", "curl/8.5.0",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 Safari/605.1.15"].freeze
  START = Time.utc(2026, 11, 25, 10, 0, 0)

  # Client addresses that differ from line to line (600 distinct ones per 600 lines): with
  # `partition_key host` they reach every shard of a stream.
  SPREAD_HOST = ->(i) { "10.#{i % 3}.#{(i / 3) % 256}.#{i % 200}" }

  DEFAULTS = {
    host: ->(i) { HOSTS[i % HOSTS.size] },
    user: ->(i) { USERS[i % USERS.size] },
    time: ->(i) { START + i / 1000 },
    method: "GET",
    path: ->(i) { "#{PATHS[i % PATHS.size]}##{i}" },
    status: ->(i) { CODES[i % CODES.size] },
    size: ->(i) { 200 + (i * 37) % 50_000 },
    referer: ->(i) { REFERERS[i % REFERERS.size] },
    agent: ->(i) { AGENTS[i % AGENTS.size] }
  }.freeze

  module_function

  # Line number `i` (0-based), without a newline. Fields: host, user, time (a Time), method,
  # path, status, size, referer, agent; each a value or a proc called with `i`.
  def line(i, **fields)
    unknown = fields.keys - DEFAULTS.keys
    raise ArgumentError, "unknown field(s) #{unknown.join(", ")}; known: #{DEFAULTS.keys.join(", ")}" unless unknown.empty?

    f = DEFAULTS.merge(fields).transform_values { |v| v.respond_to?(:call) ? v.call(i) : v }
    %(#{f[:host]} - #{f[:user]} [#{f[:time].strftime("%d/%b/%Y:%H:%M:%S %z")}] ) +
      %("#{f[:method]} #{f[:path]} HTTP/1.1" #{f[:status]} #{f[:size]} ) +
      %("#{f[:referer]}" "#{f[:agent]}")
  end

  # Lines `numbers` (a count, meaning 0...count, or a range), newline-terminated, as one string.
  def text(numbers, **fields)
    numbers = 0...numbers if numbers.is_a?(Integer)
    out = String.new(capacity: numbers.size * 200)
    numbers.each { |i| out << line(i, **fields) << "\n" }
    out
  end

  # Appends lines `numbers` (a count or a range) to the file at `path`, flushing every
  # `flush_every` lines so a tailing fluentd sees them arrive in pieces. Returns the count.
  def append(path, numbers, flush_every: 1000, **fields)
    numbers = 0...numbers if numbers.is_a?(Integer)
    File.open(path, "a") do |f|
      numbers.each_with_index do |i, n|
        f.puts line(i, **fields)
        f.flush if (n % flush_every).zero?
      end
    end
    numbers.size
  end

  # The line number of a read-back record of a default-path line (its JSON's "path" ends in
  # "#<i>"), or nil.
  def number(json_text)
    JSON.parse(json_text)["path"].to_s[/#(\d+)\z/, 1]&.to_i
  rescue JSON::ParserError
    nil
  end
end

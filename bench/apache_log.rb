# frozen_string_literal: true

# The benchmark's workload: Apache combined-format access log lines (what fluentd's apache2
# parser reads), about 190 bytes each, every line carrying its number in the request path so
# that what is read back from Kinesis can be checked line by line.
module BenchApacheLog
  HOSTS = %w[203.0.113.7 198.51.100.23 192.0.2.45 203.0.113.99 198.51.100.4 192.0.2.200 10.1.7.31].freeze
  USERS = %w[- - - alice bob].freeze
  PATHS = ["/", "/index.html", "/products/42", "/cart/checkout", "/api/v1/items?page=", "/static/app.js"].freeze
  CODES = [200, 200, 200, 304, 404, 500].freeze
  REFERERS = ["https://www.example.com/", "-", "https://www.example.com/products?sort=price"].freeze
  AGENTS = ["Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0", "curl/8.5.0",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 Safari/605.1.15"].freeze
  START = Time.utc(2026, 11, 25, 10, 0, 0)

  # Line number `i` (0-based); its request path ends in "#<i>".
  def self.line(i)
    t = START + i / 1000
    %(#{HOSTS[i % HOSTS.size]} - #{USERS[i % USERS.size]} [#{t.strftime("%d/%b/%Y:%H:%M:%S +0000")}] ) +
      %("GET #{PATHS[i % PATHS.size]}##{i} HTTP/1.1" #{CODES[i % CODES.size]} #{200 + (i * 37) % 50_000} ) +
      %("#{REFERERS[i % REFERERS.size]}" "#{AGENTS[i % AGENTS.size]}")
  end

  # Lines 0...count, newline-terminated, as one string.
  def self.text(count)
    out = String.new(capacity: count * 200)
    count.times { |i| out << line(i) << "\n" }
    out
  end

  # The line number of a read-back record (its JSON's "path"), or nil.
  def self.number(json_text)
    JSON.parse(json_text)["path"].to_s[/#(\d+)\z/, 1]&.to_i
  rescue JSON::ParserError
    nil
  end
end

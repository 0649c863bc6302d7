# frozen_string_literal: true

# Run by script/install-check with the Ruby under test, after `gem install --local` put a
# platform gem into GEM_HOME: proves the installed gem's own extension loads on this Ruby and
# delivers. Two levels:
#
#   fluentd   (fluentd and its C-extension dependencies load on this Ruby) fluentd finds the
#             output `kinesis_streams_aggregated` among the installed gems, fluentd's output
#             driver feeds it Apache log lines, and it formats, aggregates and delivers them;
#             `kinesis_streams` and `kinesis_firehose` are found and configured
#   native    (no fluentd on this Ruby) the gem's extension formats a msgpack chunk of the same
#             lines (encoded here, without the msgpack gem), aggregates and delivers it
#
# Environment: KINESIS_ENDPOINT, STREAM, EVENTS, EXPECT_MINOR, EXPECT_GEM_DIR, OUT (a file: the
# records it sent, one JSON string per line, for the caller to compare with what the stream
# holds), LEVEL (fluentd|native|auto).
# Prints one line: `exercise: OK ruby=... level=... so=...`; exits non-zero with the reason
# otherwise.

require "json"
require_relative "../support/apache_log"

def fail!(msg)
  warn "exercise: FAILED on Ruby #{RUBY_VERSION} (#{RUBY_PLATFORM}): #{msg}"
  exit 1
end

endpoint = ENV.fetch("KINESIS_ENDPOINT")
stream = ENV.fetch("STREAM")
events = Integer(ENV.fetch("EVENTS", "2000"))
expect_minor = ENV.fetch("EXPECT_MINOR")
expect_gem_dir = ENV.fetch("EXPECT_GEM_DIR")
out = ENV.fetch("OUT")
level = ENV.fetch("LEVEL", "auto")

fail!("this is Ruby #{RUBY_VERSION}, expected #{expect_minor}") unless RUBY_VERSION.start_with?("#{expect_minor}.")

# The project's Apache lines, with a non-ASCII request path so UTF-8 goes through too.
lines = Array.new(events) { |i| ApacheLog.line(i, path: ->(n) { "/item/#{n}?q=\u00e9t\u00e9" }) }
time = 1_796_000_000

credentials = { "access_key_id" => "AKIDINSTALLCHECK", "secret_access_key" => "install-check-secret" }

load_fluentd = lambda do
  require "fluent/version"
  require "fluent/log"
  require "fluent/test/log"
  require "fluent/engine"
  require "fluent/system_config"
  require "fluent/plugin"
  require "fluent/test/driver/output"
  require "serverengine"
  require "cool.io"
end

if level == "auto"
  level = begin
    load_fluentd.call
    "fluentd"
  rescue LoadError => e
    warn "exercise: fluentd does not load on Ruby #{RUBY_VERSION} (#{e.message}); exercising the extension's own API"
    "native"
  end
end

sent =
  case level
  when "fluentd"
    load_fluentd.call
    # Debian bullseye's Ruby 2.7 has msgpack 1.1.0; fluentd 1.18 wants 1.3.1 or newer, whose
    # Packer#full_pack is the one method it calls here that 1.1.0 lacks. td-agent 4 ships
    # msgpack 1.7. Only this harness adds it, and says so.
    unless MessagePack::Packer.method_defined?(:full_pack)
      MessagePack::Packer.class_eval do
        def full_pack
          packed = to_s
          clear
          packed
        end
      end
      warn "exercise: msgpack #{MessagePack::VERSION} has no Packer#full_pack; added for fluentd #{Fluent::VERSION}"
    end
    $log = Fluent::Log.new(ServerEngine::DaemonLogger.new($stderr, level: :warn))
    Fluent::Engine.init(Fluent::SystemConfig.new)
    # As fluentd does for `@type kinesis_streams_aggregated`: found among installed gems.
    plugin = Fluent::Plugin.new_output("kinesis_streams_aggregated")
    conf = Fluent::Config.parse(<<~CONF, "(install-check)", "", syntax: :v1)
      stream_name #{stream}
      region us-east-1
      endpoint #{endpoint}
      aws_key_id #{credentials['access_key_id']}
      aws_sec_key #{credentials['secret_access_key']}
      <format>
        @type single_value
        message_key message
      </format>
      <buffer>
        chunk_limit_records 700
      </buffer>
    CONF
    driver = Fluent::Test::Driver::Output.new(plugin.class).configure(conf)
    driver.run(default_tag: "apache.access", wait_flush_completion: true) do
      lines.each { |l| driver.feed(time, { "message" => l }) }
    end
    errors = driver.error_events
    fail!("#{errors.size} events went to the error stream: #{errors.first.inspect}") unless errors.empty?
    # The other two outputs load and configure on this Ruby too (they share the engine).
    { "kinesis_streams" => "stream_name #{stream}", "kinesis_firehose" => "delivery_stream_name #{stream}" }.each do |type, name|
      other = Fluent::Plugin.new_output(type).class
      fail!("@type #{type} is #{other}, not this gem's") unless other.name.to_s.end_with?("RsOutput")
      Fluent::Test::Driver::Output.new(other).configure(
        Fluent::Config.parse("#{name}\nregion us-east-1\nendpoint #{endpoint}", "(install-check)", "", syntax: :v1)
      )
    end
    lines.map { |l| "#{l}\n" }
  when "native"
    # By its full path, as fluentd's plugin search does: activating the gem would look for
    # fluentd among the installed gems, and fluentd is not a gem here.
    require File.join(expect_gem_dir, "lib/fluent_plugin_kinesis_rs")
    native = FluentPluginKinesisRs::Native
    # msgpack by hand: [int time, {"message" => str}] per event, as fluentd's buffer holds them.
    str = lambda do |s|
      b = s.b
      (b.bytesize < 256 ? [0xd9, b.bytesize].pack("CC") : [0xda, b.bytesize].pack("Cn")) + b
    end
    chunk = lines.map { |l| [0x92, 0xce, time, 0x81].pack("CCNC") + str.call("message") + str.call(l) }.join.b
    producer = native::Producer.new(
      "region" => "us-east-1", "endpoint" => endpoint,
      "credentials" => { "type" => "static" }.merge(credentials)
    )
    formatter = native::Formatter.new("format" => "json", "max_record_size" => 1024 * 1024)
    result = producer.start_chunk(stream, formatter, chunk, "apache.access", nil, nil, "0123456789abcdef".b, Time.now.to_f).wait
    producer.close
    fail!("failures: #{result['failures'].first(3).inspect}") unless result["failures"].empty?
    fail!("delivered #{result['delivered_count']} of #{events}") unless result["delivered_count"] == events
    lines.map { |l| "#{JSON.generate({ 'message' => l })}\n" }
  else
    fail!("unknown LEVEL #{level}")
  end

so = $LOADED_FEATURES.grep(%r{/kinesis_rs\.so\z})
fail!("no kinesis_rs.so was loaded") if so.empty?
want = File.join(expect_gem_dir, "lib/fluent_plugin_kinesis_rs", expect_minor, "kinesis_rs.so")
fail!("loaded #{so.join(', ')}, expected #{want}") unless so == [want]

File.write(out, sent.map { |s| JSON.generate(s) }.join("\n") + "\n")
puts "exercise: OK ruby=#{RUBY_VERSION} platform=#{RUBY_PLATFORM} level=#{level} events=#{events} so=#{want}"

# frozen_string_literal: true

require_relative "errors"

# Loads the Rust extension (kinesis_rs.so, defines FluentPluginKinesisRs::Native).
#
# A precompiled platform gem (x86_64-linux, aarch64-linux) ships one extension per Ruby minor
# under lib/fluent_plugin_kinesis_rs/<minor>/: an extension built for one minor loads into
# another without error and then corrupts data, so only the exact minor is ever loaded. The
# source gem, or `rake compile` in a checkout, puts a single one next to this file.
#
# Paths are absolute, not looked up on $LOAD_PATH, so the extension is found however the plugin
# was loaded (fluentd's plugin search requires the plugin file by its full path).
module FluentPluginKinesisRs
  # The Ruby minors a platform gem holds extensions for, from its lib/ tree.
  def self.precompiled_minors(dir = __dir__)
    Dir[File.join(dir, "*", "kinesis_rs.so")].map { |p| File.basename(File.dirname(p)) }
                                                  .sort_by { |m| Gem::Version.new(m) }
  end

  def self.extension_missing_message(ruby_minor, error, dir = __dir__)
    minors = precompiled_minors(dir)
    source_route = "install the source gem, which compiles the extension for this Ruby: " \
                   "`gem install fluent-plugin-kinesis-rs --platform ruby` (td-agent-gem / fluent-gem " \
                   "alike; it needs Rust 1.85 or newer with cargo on PATH, libclang for bindgen, and " \
                   "this Ruby's headers, e.g. ruby-dev or td-agent's own)"
    if minors.empty?
      "fluent-plugin-kinesis-rs: the native extension kinesis_rs is not built (#{error.message}). " \
        "From a source checkout run `rake compile` (needs cargo, libclang and Ruby headers); " \
        "otherwise #{source_route}."
    else
      "fluent-plugin-kinesis-rs: this precompiled gem (#{RUBY_PLATFORM}) has extensions for Ruby " \
        "#{minors.join(', ')}, not for Ruby #{RUBY_VERSION} (#{ruby_minor}). Uninstall it and " \
        "#{source_route}."
    end
  end
end

ruby_minor = RUBY_VERSION[/\A\d+\.\d+/]
versioned = File.join(__dir__, ruby_minor, "kinesis_rs.so")
begin
  require File.exist?(versioned) ? versioned : File.join(__dir__, "kinesis_rs")
rescue LoadError => e
  raise LoadError, FluentPluginKinesisRs.extension_missing_message(ruby_minor, e) unless File.exist?(versioned)

  raise LoadError, "fluent-plugin-kinesis-rs: #{versioned} did not load (#{e.message}). The precompiled " \
                   "extensions need Linux with glibc 2.17 or newer; elsewhere install the source gem: " \
                   "`gem install fluent-plugin-kinesis-rs --platform ruby`."
end

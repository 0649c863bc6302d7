# frozen_string_literal: true

require_relative "errors"

# Loads the Rust extension (kinesis_rs.so, defines FluentPluginKinesisRs::Native).
# A precompiled ("fat") gem ships one per Ruby minor version under a versioned directory;
# a source install or `rake compile` puts a single one next to this file.
begin
  ruby_minor = RUBY_VERSION[/\d+\.\d+/]
  require "fluent_plugin_kinesis_rs/#{ruby_minor}/kinesis_rs"
rescue LoadError
  begin
    require "fluent_plugin_kinesis_rs/kinesis_rs"
  rescue LoadError => e
    raise LoadError, "fluent-plugin-kinesis-rs: the native extension kinesis_rs is not built " \
                     "(#{e.message}). From a source checkout run `rake compile` (needs cargo, " \
                     "clang and ruby headers); an installed gem builds it at install time."
  end
end

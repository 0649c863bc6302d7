# frozen_string_literal: true

require_relative "lib/fluent_plugin_kinesis_rs/version"

Gem::Specification.new do |spec|
  spec.name = "fluent-plugin-kinesis-rs"
  spec.version = FluentPluginKinesisRs::VERSION
  spec.authors = ["fluent-plugin-kinesis-rs authors"]
  spec.summary = "Fluentd output to Amazon Kinesis Data Streams with KPL aggregation, in Rust"
  spec.description = "A fluentd output plugin (@type kinesis_streams_aggregated) that packs " \
                     "records into KPL aggregated records and sends them with PutRecords; " \
                     "the hot path is a Rust extension (magnus + rb-sys)."
  spec.license = "Apache-2.0"
  spec.required_ruby_version = ">= 2.7"

  spec.metadata = {
    "rubygems_mfa_required" => "true",
    "fluentd_plugin_type" => "output",
    "fluentd_plugin_name" => "kinesis_streams_aggregated",
    # Read by rb_sys (RbSys::ExtensionTask) to check the crate it builds.
    "cargo_crate_name" => "kinesis_rs"
  }

  # Explicit list (no `git ls-files`): what the extension build and the Ruby code need.
  # The binding crate is built from ext/kinesis_rs inside the Cargo workspace whose
  # Cargo.toml and Cargo.lock sit at the gem root, so every workspace member ships whole
  # (including files its manifest names, such as benches).
  spec.files = Dir.chdir(__dir__) do
    Dir[
      "lib/**/*.rb",
      "Cargo.toml", "Cargo.lock",
      "ext/*/Cargo.toml", "ext/*/build.rs", "ext/*/extconf.rb",
      "ext/*/src/**/*.rs", "ext/*/benches/**/*.rs",
      "proto/**/*.proto",
      "README*", "LICENSE*", "NOTICE*"
    ].select { |f| File.file?(f) }.sort
  end
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/kinesis_rs/extconf.rb"]

  spec.add_dependency "fluentd", ">= 1.8", "< 2"
  spec.add_dependency "rb_sys", "~> 0.9"

  spec.add_development_dependency "rake", "~> 13"
  spec.add_development_dependency "rake-compiler", "~> 1.2"
  spec.add_development_dependency "test-unit", "~> 3.3"
end

# frozen_string_literal: true

require_relative "fluent_plugin_kinesis_rs/version"
require_relative "fluent_plugin_kinesis_rs/errors"
require_relative "fluent_plugin_kinesis_rs/native"
require_relative "fluent_plugin_kinesis_rs/scrub"

# fluent-plugin-kinesis-rs: a fluentd output (`@type kinesis_streams_aggregated`) whose hot
# path (KPL aggregation, delivery) is the Rust extension FluentPluginKinesisRs::Native.
module FluentPluginKinesisRs
end

# frozen_string_literal: true

require_relative "kinesis_rs/streams_output"

module Fluent
  module Plugin
    # `@type kinesis_streams`, a drop-in for fluent-plugin-kinesis's output of the same name: one
    # Kinesis record per event, with its partition_key field (a random key when the setting is
    # absent) and explicit_hash_key field; up to 500 records / 5 MiB per PutRecords call, several
    # calls in flight, per-shard rate limits, failed entries retried. See KinesisRs::BaseOutput
    # for what happens to records.
    class KinesisStreamsRsOutput < KinesisRs::StreamsOutput
      Fluent::Plugin.register_output("kinesis_streams", self)

      PLUGIN_TYPE = "kinesis_streams"
      # Kinesis records are user records here: no aggregates, no re-routing after a reshard.
      COUNTERS = KinesisRs::StreamsOutput::COUNTERS.reject do |name, _|
        %w[aggregates wrong_shard resent_user_records].include?(name)
      end.freeze

      # fluentd decides an output is buffered by #write defined on the registered class itself,
      # and that it can acknowledge chunks later (delayed commit) by #try_write there too.
      def write(chunk)
        super
      end

      def try_write(chunk)
        super
      end
    end
  end
end

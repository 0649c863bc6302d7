# frozen_string_literal: true

require_relative "kinesis_rs/streams_output"

module Fluent
  module Plugin
    # `@type kinesis_streams_aggregated`, a drop-in for fluent-plugin-kinesis's output of the
    # same name: user records travel in KPL aggregates, one random key per aggregate, or with
    # partition_key, each record's key kept and aggregated per predicted shard (KCL-safe); many
    # aggregates per PutRecords call. See KinesisRs::BaseOutput for what happens to records.
    class KinesisStreamsAggregatedRsOutput < KinesisRs::StreamsOutput
      Fluent::Plugin.register_output("kinesis_streams_aggregated", self)

      PLUGIN_TYPE = "kinesis_streams_aggregated"

      desc "Deliver each partition key's records in the order fluentd hands them over, through retries: per shard, " \
           "one Kinesis record at a time, retried until it lands before the next. Needs partition_key or " \
           "fixed_partition_key, and flush_thread_count 1."
      config_param :keep_order, :bool, default: false
      desc "Largest aggregate in bytes (default: max_record_size)."
      config_param :aggregation_max_size, :size, default: nil

      # fluentd decides an output is buffered by #write defined on the registered class itself,
      # and that it can acknowledge chunks later (delayed commit) by #try_write there too.
      def write(chunk)
        super
      end

      def try_write(chunk)
        super
      end

      private

      def validate!
        super
        @aggregation_max_size ||= @max_record_size
        if @aggregation_max_size > @max_record_size
          raise Fluent::ConfigError, "aggregation_max_size #{@aggregation_max_size} exceeds max_record_size #{@max_record_size}"
        end

        validate_keep_order! if @keep_order
      end

      # Order holds per shard inside a delivery, and across chunks only when fluentd writes one
      # chunk at a time and retries a failed chunk before the next (it puts it back at the head
      # of its queue).
      def validate_keep_order!
        unless @partition_key || @fixed_partition_key
          raise Fluent::ConfigError, "keep_order needs partition_key (or fixed_partition_key): with a random key per " \
                                     "aggregate, records have no key whose order could be kept"
        end
        if @buffer_config.flush_thread_count > 1
          raise Fluent::ConfigError, "keep_order needs flush_thread_count 1 (it is #{@buffer_config.flush_thread_count}): " \
                                     "chunks written by several threads at once reach Kinesis in any order"
        end
        return unless system_config.workers > 1

        log.warn "keep_order with #{system_config.workers} workers: order is kept per worker; events of one key " \
                 "that reach different workers (in_forward spreads connections over workers) are not ordered " \
                 "against each other"
      end

      def extra_producer_options
        super.merge("aggregation_max_size" => @aggregation_max_size, "keep_order" => @keep_order)
      end

      def ordered?
        @keep_order
      end
    end
  end
end

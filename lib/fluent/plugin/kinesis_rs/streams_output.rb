# frozen_string_literal: true

require_relative "base_output"

module Fluent
  module Plugin
    module KinesisRs
      # What kinesis_streams_aggregated and kinesis_streams share: a Kinesis data stream, records
      # with partition keys (a record field, a fixed key, or random), per-shard rate limits and the
      # KPL's CloudWatch metrics.
      class StreamsOutput < BaseOutput
        SERVICE = "Kinesis"
        CALL = "PutRecords"
        NOUN = "stream"
        BATCH_MAX_COUNT = 500
        BATCH_MAX_BYTES = 5 * 1024 * 1024
        MAX_RECORD_SIZE_LIMIT = 10 * 1024 * 1024
        # The counters shown in monitor_agent (as kinesis_<name>), in the order the extension reports them.
        COUNTERS = %w[user_records delivered failed refused scrubbed kinesis_records aggregates requests
                      request_errors retried_entries throttled_entries bytes_delivered
                      put_payload_units wrong_shard resent_user_records shard_map_refreshes
                      rate_limited_ms].to_h { |name| [name, name] }.freeze
        # The most a stop waits for the last CloudWatch upload.
        METRICS_FLUSH_TIMEOUT = 10
        # How often messages about failed CloudWatch uploads are looked for (each upload leaves at most one).
        METRICS_MESSAGE_POLL = 1

        desc "Name of the stream to put data (chunk placeholders such as ${tag} allowed)."
        config_param :stream_name, :string
        desc "Record field holding the partition key (else a random key)."
        config_param :partition_key, :string, default: nil
        desc "Record field holding an explicit hash key (decimal 0..2^128-1); needs partition_key."
        config_param :explicit_hash_key, :string, default: nil
        desc "Send every record with this partition key (one shard) instead of random keys."
        config_param :fixed_partition_key, :string, default: nil
        desc "Per-shard rate limit, percent of 1 MiB/s and 1000 records/s (0: off)."
        config_param :rate_limit, :integer, default: 150

        desc "Producer metrics sent to Amazon CloudWatch, as the KPL sends them: none (no CloudWatch call at all), " \
             "summary or detailed. Needs cloudwatch:PutMetricData."
        config_param :metrics_level, :enum, list: %i[none summary detailed], default: :none
        desc "Finest dimension of the metrics: global (none), stream (StreamName) or shard (StreamName and ShardId). " \
             "Every metric is also sent at the coarser levels."
        config_param :metrics_granularity, :enum, list: %i[global stream shard], default: :shard
        desc "CloudWatch namespace of the metrics (names starting with AWS/ are reserved)."
        config_param :metrics_namespace, :string, default: "KinesisProducerLibrary"
        desc "Seconds between metric uploads (one PutMetricData per 1,000 metric data); a stop sends the rest."
        config_param :metrics_upload_interval, :time, default: 60
        desc "CloudWatch endpoint URL (local servers, VPC endpoints)."
        config_param :metrics_endpoint, :string, default: nil
        desc "CloudWatch region (default: region)."
        config_param :metrics_region, :string, default: nil
        desc "Let the SDK gzip large PutMetricData bodies, as it does by default (off for servers that cannot read them)."
        config_param :metrics_request_compression, :bool, default: true

        def start
          super
          return if @metrics_level == :none

          log.info "CloudWatch metrics: #{@metrics_level}, per #{@metrics_granularity}, namespace " \
                   "#{@metrics_namespace.inspect}, every #{@metrics_upload_interval}s"
          timer_execute(:kinesis_metrics_messages, METRICS_MESSAGE_POLL) do
            log_metrics_messages(@producer.metrics_messages)
          end
        end

        # The counters, and the CloudWatch upload counters when metrics are on.
        def kinesis_statistics
          stats = super
          uploads = @producer.metrics_counters if @producer && !@producer.closed?
          uploads&.each { |name, value| stats["kinesis_cloudwatch_#{name}"] = value }
          stats
        end

        private

        def target_name_template
          @stream_name
        end

        # The last CloudWatch upload carries what was measured since the one before.
        def before_producer_close
          log_metrics_messages(@producer.flush_metrics(METRICS_FLUSH_TIMEOUT)) unless @metrics_level == :none
        end

        def validate!
          if @fixed_partition_key && @partition_key
            raise Fluent::ConfigError, "fixed_partition_key and partition_key exclude each other: set one"
          end
          if @explicit_hash_key && !@partition_key
            raise Fluent::ConfigError, "explicit_hash_key needs partition_key (Kinesis requires a partition key on every record)"
          end
          super
          validate_metrics!
        end

        def validate_metrics!
          ns = @metrics_namespace
          if ns.start_with?("AWS/")
            raise Fluent::ConfigError, "metrics_namespace #{ns.inspect}: names starting with AWS/ are reserved for AWS services; " \
                                       "use e.g. KinesisProducerLibrary"
          end
          unless (1..255).cover?(ns.bytesize) && ns.match?(/\A[[:print:]&&[\x20-\x7e]]+\z/)
            raise Fluent::ConfigError, "metrics_namespace #{ns.inspect} must be 1 to 255 printable ASCII characters"
          end
          return unless @metrics_upload_interval < 1

          raise Fluent::ConfigError, "metrics_upload_interval #{@metrics_upload_interval} is too short: at least 1 second"
        end

        def extra_format_options
          { "partition_key" => @partition_key, "explicit_hash_key" => @explicit_hash_key }
        end

        def extra_producer_options
          key_mode = if @partition_key then "per_record"
                     elsif @fixed_partition_key then "fixed"
                     else "random"
                     end
          { "key_mode" => key_mode, "fixed_partition_key" => @fixed_partition_key, "rate_limit" => @rate_limit,
            "metrics" => metrics_options }
        end

        def metrics_options
          return nil if @metrics_level == :none

          { "level" => @metrics_level.to_s, "granularity" => @metrics_granularity.to_s, "namespace" => @metrics_namespace,
            "upload_interval" => @metrics_upload_interval.to_f, "endpoint" => @metrics_endpoint,
            "region" => @metrics_region || @region, "request_compression" => @metrics_request_compression }
        end

        def log_metrics_messages(messages)
          messages.each { |m| log.warn m }
        end

        def record_keys(record)
          return [nil, nil] unless @partition_key

          key = record[@partition_key]
          raise RecordRefusedError, "partition_key field '#{@partition_key}' is missing or null" if key.nil?

          key = key.to_s
          raise RecordRefusedError, "partition_key field '#{@partition_key}' is empty" if key.empty?
          raise RecordRefusedError, "partition_key field '#{@partition_key}' is not valid UTF-8" unless utf8?(key)

          ehk = nil
          if @explicit_hash_key
            ehk = record[@explicit_hash_key]
            raise RecordRefusedError, "explicit_hash_key field '#{@explicit_hash_key}' is missing or null" if ehk.nil?

            ehk = ehk.to_s
            raise RecordRefusedError, "explicit_hash_key field '#{@explicit_hash_key}' is not valid UTF-8" unless utf8?(ehk)
          end
          [key, ehk]
        end
      end
    end
  end
end

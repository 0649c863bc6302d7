# frozen_string_literal: true

require_relative "kinesis_rs/base_output"

module Fluent
  module Plugin
    # `@type kinesis_firehose`, a drop-in for fluent-plugin-kinesis's output of the same name:
    # Amazon Data Firehose direct PUT with PutRecordBatch (up to 500 records / 4 MiB per call,
    # several calls in flight, failed entries resent by their position in the answer). Each event
    # is one Firehose record, or with pack_records, newline-delimited events share Firehose
    # records of up to 1,024,000 bytes (Firehose bills each record rounded up to 5 KB). See
    # KinesisRs::BaseOutput for what happens to records.
    class KinesisFirehoseRsOutput < KinesisRs::BaseOutput
      Fluent::Plugin.register_output("kinesis_firehose", self)

      PLUGIN_TYPE = "kinesis_firehose"
      SERVICE = "Firehose"
      CALL = "PutRecordBatch"
      NOUN = "delivery stream"
      BATCH_MAX_COUNT = 500
      BATCH_MAX_BYTES = 4 * 1024 * 1024
      # A Firehose record holds at most 1,000 KiB.
      MAX_RECORD_SIZE_LIMIT = 1_024_000
      # monitor_agent name (firehose_<name>) => the extension's counter.
      COUNTERS = {
        "user_records" => "user_records", "delivered" => "delivered", "failed" => "failed", "refused" => "refused",
        "scrubbed" => "scrubbed", "records" => "kinesis_records", "packed_records" => "aggregates",
        "requests" => "requests", "request_errors" => "request_errors", "retried_entries" => "retried_entries",
        "throttled_entries" => "throttled_entries", "bytes_delivered" => "bytes_delivered",
        "billed_units" => "firehose_billed_units"
      }.freeze

      desc "Name of the delivery stream to put data (chunk placeholders such as ${tag} allowed)."
      config_param :delivery_stream_name, :string
      desc "End each record with exactly one newline: strip one trailing newline, then add \"\\n\"."
      config_param :append_new_line, :bool, default: true
      desc "Pack many newline-delimited events into each Firehose record (up to max_record_size): far fewer " \
           "billed 5 KB units and calls. Only for destinations that concatenate records (S3 and what reads it); " \
           "not for those that take each record as one event (HTTP endpoints, OpenSearch, Splunk, record format " \
           "conversion, dynamic partitioning, a transform Lambda)."
      config_param :pack_records, :bool, default: false

      config_set_default :max_record_size, MAX_RECORD_SIZE_LIMIT
      config_set_default :batch_request_max_size, BATCH_MAX_BYTES

      # fluentd decides an output is buffered by #write defined on the registered class itself,
      # and that it can acknowledge chunks later (delayed commit) by #try_write there too.
      def write(chunk)
        super
      end

      def try_write(chunk)
        super
      end

      def counter_prefix
        "firehose"
      end

      private

      def target_name_template
        @delivery_stream_name
      end

      def validate!
        super
        if @pack_records && @compression
          raise Fluent::ConfigError, "pack_records and compression exclude each other: a packed record holds many events, " \
                                     "each compressed on its own would not be one readable stream; let the delivery " \
                                     "stream compress (its S3 CompressionFormat)"
        end
        return unless @pack_records && !@append_new_line

        log.warn "pack_records with append_new_line false: events are packed as formatted, with no newline added " \
                 "between them; make sure each formatted event ends with a delimiter"
      end

      def extra_format_options
        { "append_new_line" => @append_new_line }
      end

      def extra_producer_options
        { "pack_records" => @pack_records }
      end

      # As fluent-plugin-kinesis: one trailing newline (LF, CRLF or CR) stripped, then "\n" added;
      # here before compression, so a decompressed record is still one line.
      def finish_data(data)
        @append_new_line ? "#{data.chomp}\n".b : data
      end
    end
  end
end

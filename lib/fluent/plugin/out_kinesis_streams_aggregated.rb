# frozen_string_literal: true

require "socket"
require "fluent/version"
require "fluent/plugin/output"
require_relative "../../fluent_plugin_kinesis_rs"

module Fluent
  module Plugin
    # `@type kinesis_streams_aggregated`, a drop-in for fluent-plugin-kinesis's output of the
    # same name. Each buffer chunk goes to the Rust extension as one byte string: formatting,
    # KPL aggregation per predicted shard, PutRecords with retries, all without the GVL.
    #
    # What happens to records:
    # - delivered: counted, remembered per chunk so a retry of the chunk does not resend them;
    # - can never be sent (not a hash, missing data_key or partition_key, invalid explicit hash
    #   key, too large): emitted to fluentd's error stream (`@ERROR` label) with the reason;
    # - not delivered after retries: the write raises, so fluentd retries the chunk or hands it
    #   to `<secondary>`. Only request validation errors are unrecoverable (straight to
    #   `<secondary>`); missing streams and denied access are retried until fixed.
    class KinesisStreamsAggregatedRsOutput < Fluent::Plugin::Output
      Fluent::Plugin.register_output("kinesis_streams_aggregated", self)

      helpers :formatter, :inject, :metrics, :event_emitter, :timer

      IMPLEMENTATION = "fluent-plugin-kinesis-rs #{FluentPluginKinesisRs::VERSION} (Rust extension)"
      DEFAULT_MAX_RECORD_SIZE = 1024 * 1024
      PUT_RECORDS_MAX_ENTRIES = 500
      PUT_RECORDS_MAX_BYTES = 5 * 1024 * 1024
      # The Kinesis counters shown in monitor_agent, in the order the extension reports them.
      COUNTERS = %w[user_records delivered failed refused scrubbed kinesis_records aggregates requests
                    request_errors retried_entries throttled_entries bytes_delivered
                    put_payload_units wrong_shard resent_user_records shard_map_refreshes
                    rate_limited_ms].freeze
      # Chunks whose partial delivery is remembered at most (oldest forgotten first).
      MAX_REMEMBERED_CHUNKS = 4096

      # Raised when records were not delivered; fluentd retries the chunk.
      class DeliveryError < FluentPluginKinesisRs::Error; end
      # Raised when retrying cannot help (invalid requests, unreadable chunks).
      class UnrecoverableDeliveryError < Fluent::UnrecoverableError; end
      # The error attached to records sent to the error stream.
      class RecordRefusedError < FluentPluginKinesisRs::Error; end

      # --- fluent-plugin-kinesis parameters (same names and meanings) ---
      desc "Name of the stream to put data (chunk placeholders such as ${tag} allowed)."
      config_param :stream_name, :string
      desc "AWS region of the stream (else AWS_REGION / the shared config)."
      config_param :region, :string, default: nil
      desc "Kinesis endpoint URL (local servers, VPC endpoints)."
      config_param :endpoint, :string, default: nil
      desc "Verify the endpoint's TLS certificate. Only `true` is supported; see ssl_ca_file."
      config_param :ssl_verify_peer, :bool, default: true
      desc "HTTP(S) proxy URL, e.g. http://user:pass@proxy:3128 (HTTP(S)_PROXY env is honoured too)."
      config_param :http_proxy, :string, default: nil, secret: true
      desc "AWS access key id."
      config_param :aws_key_id, :string, default: nil, secret: true
      desc "AWS secret access key."
      config_param :aws_sec_key, :string, default: nil, secret: true
      desc "AWS session token."
      config_param :aws_ses_token, :string, default: nil, secret: true
      config_section :assume_role_credentials, multi: false do
        desc "The ARN of the role to assume."
        config_param :role_arn, :string, secret: true
        desc "An identifier for the assumed role session."
        config_param :role_session_name, :string
        desc "An IAM policy in JSON format."
        config_param :policy, :string, default: nil
        desc "The duration, in seconds, of the role session (900-3600)."
        config_param :duration_seconds, :integer, default: nil
        desc "A unique identifier used by third parties when assuming roles."
        config_param :external_id, :string, default: nil, secret: true
        desc "Proxy for STS calls (the plugin's http_proxy is used for all calls)."
        config_param :sts_http_proxy, :string, default: nil, secret: true
        desc "STS endpoint URL."
        config_param :sts_endpoint_url, :string, default: nil
        desc "STS region (defaults to region)."
        config_param :sts_region, :string, default: nil
      end
      config_section :web_identity_credentials, multi: false do
        desc "The ARN of the role to assume."
        config_param :role_arn, :string
        desc "An identifier for the assumed role session."
        config_param :role_session_name, :string
        desc "The absolute path to the file on disk containing the OIDC token."
        config_param :web_identity_token_file, :string, default: nil
        desc "An IAM policy in JSON format."
        config_param :policy, :string, default: nil
        desc "The duration, in seconds, of the role session (not supported; the default applies)."
        config_param :duration_seconds, :integer, default: nil
      end
      config_section :instance_profile_credentials, multi: false do
        desc "Number of times to retry when retrieving credentials."
        config_param :retries, :integer, default: nil
        desc "IP address of the instance metadata service (default 169.254.169.254)."
        config_param :ip_address, :string, default: nil
        desc "Port of the instance metadata service (default 80)."
        config_param :port, :integer, default: nil
        desc "Seconds to wait for the connection to open."
        config_param :http_open_timeout, :float, default: nil
        desc "Seconds to wait for one block to be read."
        config_param :http_read_timeout, :float, default: nil
      end
      config_section :shared_credentials, multi: false do
        desc "Path to the shared credentials file."
        config_param :path, :string, default: nil
        desc "Profile name."
        config_param :profile_name, :string, default: nil
      end
      config_section :process_credentials, multi: false do
        desc "Command that prints credentials as JSON (credential_process)."
        config_param :process, :string, secret: true
      end
      desc "Send every record with this partition key (one shard) instead of a random key per aggregate."
      config_param :fixed_partition_key, :string, default: nil
      desc "Send record[data_key].to_s instead of the formatted record."
      config_param :data_key, :string, default: nil
      desc "Truncate log lines about refused records to this many characters (0: no limit)."
      config_param :log_truncate_max_size, :integer, default: 1024
      desc "Compress each record: zlib or gzip."
      config_param :compression, :enum, list: %i[zlib gzip], default: nil
      desc "Remove the trailing newline of each formatted record."
      config_param :chomp_record, :bool, default: false
      desc "The stream's record size limit (data plus partition key): 1 MiB unless the stream was raised, up to 10 MiB."
      config_param :max_record_size, :size, default: DEFAULT_MAX_RECORD_SIZE
      desc "Kinesis records per PutRecords call (at most 500)."
      config_param :batch_request_max_count, :integer, default: PUT_RECORDS_MAX_ENTRIES
      desc "Bytes per PutRecords call (at most 5 MiB)."
      config_param :batch_request_max_size, :size, default: PUT_RECORDS_MAX_BYTES
      desc "Retries of failed PutRecords entries before the chunk is handed back to fluentd."
      config_param :retries_on_batch_request, :integer, default: 8
      desc "Start the backoff again when a retry delivered anything."
      config_param :reset_backoff_if_success, :bool, default: true
      desc "Accepted for compatibility; undelivered records are never dropped: fluentd retries the chunk."
      config_param :drop_failed_records_after_batch_request_retries, :bool, default: nil
      desc "Accepted for compatibility; retries are counted in monitor_agent (retried_entries)."
      config_param :monitor_num_of_batch_request_retries, :bool, default: nil
      desc "Log every chunk's delivery counters at info level."
      config_param :debug, :bool, default: false
      config_section :format do
        config_set_default :@type, "json"
      end
      config_section :inject do
        config_set_default :time_type, "string"
        config_set_default :time_format, "%Y-%m-%dT%H:%M:%S.%N%z"
      end
      config_section :buffer do
        # The tag is needed by ${tag} placeholders, inject tag_key and tag-aware formatters.
        config_set_default :chunk_keys, ["tag"]
      end

      # --- new parameters ---
      desc "Record field holding the partition key: records keep their keys and are aggregated per predicted shard."
      config_param :partition_key, :string, default: nil
      desc "Record field holding an explicit hash key (decimal 0..2^128-1); needs partition_key."
      config_param :explicit_hash_key, :string, default: nil
      desc "Deliver each partition key's records in the order fluentd hands them over, through retries: per shard, " \
           "one Kinesis record at a time, retried until it lands before the next. Needs partition_key or " \
           "fixed_partition_key, and flush_thread_count 1."
      config_param :keep_order, :bool, default: false
      desc "Largest aggregate in bytes (default: max_record_size)."
      config_param :aggregation_max_size, :size, default: nil
      desc "Per-shard rate limit, percent of 1 MiB/s and 1000 records/s (0: off)."
      config_param :rate_limit, :integer, default: 150
      desc "PutRecords calls in flight at once per chunk."
      config_param :max_concurrent_requests, :integer, default: 8
      desc "Seconds one chunk's delivery may take, retries included, before fluentd retries it."
      config_param :delivery_timeout, :time, default: 120
      desc "Seconds one HTTP request may take."
      config_param :request_timeout, :time, default: 30
      desc "Seconds to open a connection."
      config_param :connect_timeout, :time, default: 5
      desc "PEM file of extra certificate authorities to trust."
      config_param :ssl_ca_file, :string, default: nil
      desc "Check at start that the stream exists and is reachable (skipped when stream_name has placeholders)."
      config_param :check_stream_on_start, :bool, default: true
      desc "Seconds a stop may spend delivering what is buffered (with flush_at_shutdown) and in flight, " \
           "retrying as needed; default: delivery_timeout + request_timeout."
      config_param :shutdown_timeout, :time, default: nil
      desc "With a file buffer, keep each chunk's delivery progress beside it, so a restart after a crash " \
           "resends only what was in flight."
      config_param :persist_progress, :bool, default: true
      desc "Strings that are not valid UTF-8 in JSON output: replace each invalid sequence with U+FFFD " \
           "(as String#scrub does; counted as kinesis_scrubbed), or error: send the record to the error stream."
      config_param :invalid_utf8, :enum, list: %i[replace error], default: :replace

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

      # Suffix of the files keeping a chunk's delivery progress, beside the chunk.
      PROGRESS_SUFFIX = ".kinesis-progress"
      # How often a stop logs what it is still waiting for.
      DRAIN_LOG_INTERVAL = 5
      # The most a stop waits for the last CloudWatch upload.
      METRICS_FLUSH_TIMEOUT = 10
      # How often messages about failed CloudWatch uploads are looked for (each upload leaves at most one).
      METRICS_MESSAGE_POLL = 1

      def initialize
        super
        @delivered = {}
        @delivered_lock = Mutex.new
        # Deliveries whose wait was abandoned (the flush thread was killed or raised), by chunk
        # id: they run on, and the chunk's next write collects them before sending anything.
        @inflight = {}
        # Progress files of chunks delivered in full, removed once fluentd has purged the chunk.
        @finished_progress = {}
      end

      def multi_workers_ready?
        true
      end

      def configure(conf)
        super
        validate!
        warn_about_compatibility_options
        @formatter = formatter_create
        @format_options = fast_format_options
        @native_formatter = native_formatter
        @producer_options = producer_options
        @counter_metrics = COUNTERS.to_h do |name|
          [name, metrics_create(namespace: "fluentd", subsystem: "output", name: "kinesis_#{name}",
                                help_text: "Kinesis #{name.tr("_", " ")}")]
        end
        log.info "kinesis_streams_aggregated is #{IMPLEMENTATION}"
        warn_if_anchor_installed
      end

      def start
        super
        @producer = FluentPluginKinesisRs::Native::Producer.new(@producer_options)
        remove_orphan_progress_files
        check_stream if @check_stream_on_start
        return if @metrics_level == :none

        log.info "CloudWatch metrics: #{@metrics_level}, per #{@metrics_granularity}, namespace " \
                 "#{@metrics_namespace.inspect}, every #{@metrics_upload_interval}s"
        timer_execute(:kinesis_metrics_messages, METRICS_MESSAGE_POLL) do
          log_metrics_messages(@producer.metrics_messages)
        end
      end

      # A stop delivers what is buffered instead of failing it: from here on, deliveries retry
      # until the shutdown budget is spent (fluentd's force_flush stops at the first failed
      # flush, and a memory chunk still queued when the worker exits is gone).
      def before_shutdown
        if @producer
          @drain_deadline = Fluent::Clock.now + @shutdown_timeout
          @producer.begin_drain(@shutdown_timeout)
          if @buffer
            writing = @buffer.dequeued.size
            what = if @flush_at_shutdown
                     "of the #{writing} chunks being written and the #{@buffer.stage.size + @buffer.queue.size} buffered"
                   else
                     "of the #{writing} chunks being written (the file buffer keeps the rest)"
                   end
            log.info "stopping: delivering the records #{what} to Kinesis, for up to #{@shutdown_timeout}s (shutdown_timeout)"
          end
          start_drain_reporter
        end
        super
        drain_queue if @producer && @flush_at_shutdown && !@as_secondary
      end

      def after_shutdown
        super
      ensure
        stop_drain_reporter
      end

      # Every flush thread has stopped: the last CloudWatch upload carries what was measured
      # since the one before.
      def close
        super
        if @producer && !@producer.closed? && @metrics_level != :none
          log_metrics_messages(@producer.flush_metrics(METRICS_FLUSH_TIMEOUT))
        end
        @producer&.close
      end

      # fluentd purges a chunk here once its write returned (also after <secondary> took it): its
      # progress file goes with it.
      def commit_write(chunk_id, **options)
        super
        progress = @delivered_lock.synchronize { @finished_progress.delete(chunk_id) }
        remove_progress_file(dump_unique_id_hex(chunk_id), progress) if progress
      end

      def statistics
        stats = super
        stats["output"].merge!(kinesis_statistics)
        stats
      end

      # The Kinesis counters since start, as monitor_agent shows them.
      def kinesis_statistics
        stats = COUNTERS.to_h { |name| ["kinesis_#{name}", @counter_metrics[name].get] }
        uploads = @producer.metrics_counters if @producer && !@producer.closed?
        uploads&.each { |name, value| stats["kinesis_cloudwatch_#{name}"] = value }
        stats
      end

      def write(chunk)
        stream = extract_placeholders(@stream_name, chunk)
        chunk_id = dump_unique_id_hex(chunk.unique_id)
        tag = chunk.metadata.tag
        progress = progress_path(chunk)
        previously = recall(chunk, chunk_id, progress)
        if (earlier = @delivered_lock.synchronize { @inflight[chunk_id] })
          # An earlier write of this chunk stopped waiting while requests were in flight: what
          # they delivered is known only once they finish.
          log.info "chunk #{chunk_id}: collecting the outcome of its interrupted delivery first"
          begin
            previously = merge_bits(previously, handled_bits(collect(chunk, chunk_id, tag, earlier)))
          rescue FluentPluginKinesisRs::NeedsRubyFormattingError
            nil # it sent nothing
          end
        end
        result = deliver(chunk, chunk_id, stream, tag, previously, progress)
        failures = result["failures"]
        if failures.empty?
          forget(chunk.unique_id, chunk_id, progress)
          log_chunk(stream, chunk_id, result)
          return
        end
        # Refused records are in the error stream already: a retry of the chunk skips them too.
        # (The delivered bits already include what earlier attempts delivered or refused.)
        handled = handled_bits(result)
        remember(chunk, chunk_id, handled, progress)
        raise_undelivered(stream, chunk_id, result, handled)
      rescue FluentPluginKinesisRs::CorruptChunkError => e
        raise UnrecoverableDeliveryError, "chunk #{chunk_id} cannot be read: #{e.message}"
      end

      private

      def validate!
        if @fixed_partition_key && @partition_key
          raise Fluent::ConfigError, "fixed_partition_key and partition_key exclude each other: set one"
        end
        if @explicit_hash_key && !@partition_key
          raise Fluent::ConfigError, "explicit_hash_key needs partition_key (Kinesis requires a partition key on every record)"
        end
        unless (1..10 * 1024 * 1024).cover?(@max_record_size)
          raise Fluent::ConfigError, "max_record_size #{@max_record_size} must be between 1 byte and 10 MiB"
        end
        if @batch_request_max_count > PUT_RECORDS_MAX_ENTRIES
          log.warn "batch_request_max_count #{@batch_request_max_count} is above the PutRecords limit; using #{PUT_RECORDS_MAX_ENTRIES} (records are aggregated, so this counts aggregates, not log lines)"
          @batch_request_max_count = PUT_RECORDS_MAX_ENTRIES
        end
        max_request = [PUT_RECORDS_MAX_BYTES, @max_record_size].max
        if @batch_request_max_size > max_request
          log.warn "batch_request_max_size #{@batch_request_max_size} is above the PutRecords limit; using #{max_request}"
          @batch_request_max_size = max_request
        end
        @batch_request_max_size = [@batch_request_max_size, [@max_record_size, PUT_RECORDS_MAX_BYTES].min].max
        @aggregation_max_size ||= @max_record_size
        @shutdown_timeout ||= @delivery_timeout + @request_timeout
        raise Fluent::ConfigError, "shutdown_timeout must be positive" unless @shutdown_timeout.positive?
        if @aggregation_max_size > @max_record_size
          raise Fluent::ConfigError, "aggregation_max_size #{@aggregation_max_size} exceeds max_record_size #{@max_record_size}"
        end
        unless @ssl_verify_peer
          raise Fluent::ConfigError, "ssl_verify_peer false is not supported: TLS peers are always verified. " \
                                     "To trust a private CA, set ssl_ca_file to its PEM file"
        end
        if @inject_config&.tag_key && !@chunk_key_tag
          raise Fluent::ConfigError, "<inject> tag_key needs the tag: chunk the buffer by tag (<buffer tag>)"
        end
        if @web_identity_credentials && !(@web_identity_credentials.web_identity_token_file || ENV["AWS_WEB_IDENTITY_TOKEN_FILE"])
          raise Fluent::ConfigError, "<web_identity_credentials> needs web_identity_token_file (or AWS_WEB_IDENTITY_TOKEN_FILE)"
        end
        validate_metrics!
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

      def validate_metrics!
        ns = @metrics_namespace
        if ns.start_with?("AWS/")
          raise Fluent::ConfigError, "metrics_namespace #{ns.inspect}: names starting with AWS/ are reserved for AWS services; " \
                                     "use e.g. KinesisProducerLibrary"
        end
        unless (1..255).cover?(ns.bytesize) && ns.match?(/\A[[:print:]&&[\x20-\x7e]]+\z/)
          raise Fluent::ConfigError, "metrics_namespace #{ns.inspect} must be 1 to 255 printable ASCII characters"
        end
        if @metrics_upload_interval < 1
          raise Fluent::ConfigError, "metrics_upload_interval #{@metrics_upload_interval} is too short: at least 1 second"
        end
      end

      def warn_about_compatibility_options
        unless @drop_failed_records_after_batch_request_retries.nil?
          log.warn "drop_failed_records_after_batch_request_retries is ignored: records are never dropped. " \
                   "Undelivered records make the chunk fail, so fluentd retries it or hands it to <secondary>"
        end
        unless @monitor_num_of_batch_request_retries.nil?
          log.warn "monitor_num_of_batch_request_retries is ignored: retries are counted in monitor_agent (kinesis_retried_entries)"
        end
        if @assume_role_credentials&.sts_http_proxy
          log.warn "assume_role_credentials sts_http_proxy is ignored: all calls use http_proxy"
        end
        if @web_identity_credentials&.duration_seconds
          log.warn "web_identity_credentials duration_seconds is ignored: the STS default session length applies"
        end
      end

      def warn_if_anchor_installed
        anchor = Gem::Specification.find_all_by_name("fluent-plugin-kinesis").map(&:version).max
        return unless anchor

        log.warn "fluent-plugin-kinesis #{anchor} is installed too and registers the same @type; " \
                 "fluentd loads the gem with the higher version. The active implementation is the one " \
                 "logging 'kinesis_streams_aggregated is ...'. Uninstall one of them to be sure."
      rescue StandardError
        nil
      end

      # The formatting settings for the Rust fast path; nil when a formatter needs fluentd.
      def fast_format_options
        fmt = @formatter.class.name.to_s
        type = case fmt
               when "Fluent::Plugin::JSONFormatter" then "json"
               when "Fluent::Plugin::SingleValueFormatter" then "single_value"
               when "Fluent::Plugin::MessagePackFormatter" then "msgpack"
               end
        # CRLF newlines are left to fluentd's formatter.
        type = "#{fmt} with CRLF newlines" if type && @formatter.instance_variable_get(:@newline).to_s == "\r\n"
        opts = {
          "format" => type || fmt,
          "data_key" => @data_key,
          "chomp_record" => @chomp_record,
          "compression" => @compression&.to_s,
          "partition_key" => @partition_key,
          "explicit_hash_key" => @explicit_hash_key,
          "max_record_size" => @max_record_size,
          "invalid_utf8" => @invalid_utf8.to_s,
        }
        if @formatter.respond_to?(:add_newline) || @formatter.instance_variable_defined?(:@add_newline)
          opts["add_newline"] = @formatter.instance_variable_get(:@add_newline)
        end
        opts["message_key"] = @formatter.message_key if type == "single_value"
        opts["inject"] = inject_options if @_inject_enabled
        opts
      end

      def inject_options
        c = @inject_config
        # fluentd's order: timezone, then utc / localtime false, then local time.
        zone = if c.timezone then fixed_offset(c.timezone)
               elsif c.utc || c.localtime == false then "utc"
               else "local"
               end
        {
          "hostname_key" => c.hostname_key, "hostname" => (c.hostname_key && (c.hostname || Socket.gethostname)),
          "worker_id_key" => c.worker_id_key, "worker_id" => (c.worker_id_key && fluentd_worker_id),
          "tag_key" => c.tag_key, "time_key" => c.time_key, "time_type" => c.time_type.to_s,
          "time_format" => c.time_format, "zone" => zone,
        }
      end

      # "+09:00" → 32400; a named zone (Asia/Tokyo) stays a name, which fluentd formats.
      def fixed_offset(tz)
        m = /\A([+-])(\d\d):?(\d\d)\z/.match(tz)
        return tz unless m

        (m[1] == "-" ? -1 : 1) * (m[2].to_i * 3600 + m[3].to_i * 60)
      end

      def native_formatter
        FluentPluginKinesisRs::Native::Formatter.new(@format_options)
      rescue FluentPluginKinesisRs::NeedsRubyFormattingError => e
        log.info "records are formatted by fluentd (slower path): #{e.message}"
        nil
      rescue FluentPluginKinesisRs::ConfigurationError => e
        raise Fluent::ConfigError, e.message
      end

      def credentials_options
        # An empty aws_key_id (a template's unset variable) means no static keys, as in the AWS SDKs.
        if present?(@aws_key_id) && present?(@aws_sec_key)
          base = { "type" => "static", "access_key_id" => @aws_key_id, "secret_access_key" => @aws_sec_key,
                   "session_token" => (@aws_ses_token if present?(@aws_ses_token)) }
        end
        if (c = @assume_role_credentials)
          return { "type" => "assume_role", "role_arn" => c.role_arn, "role_session_name" => c.role_session_name,
                   "policy" => c.policy, "duration_seconds" => c.duration_seconds, "external_id" => c.external_id,
                   "sts_endpoint_url" => c.sts_endpoint_url, "sts_region" => c.sts_region, "source" => base }
        end
        if (c = @web_identity_credentials)
          return { "type" => "web_identity", "role_arn" => c.role_arn, "role_session_name" => c.role_session_name,
                   "web_identity_token_file" => c.web_identity_token_file || ENV["AWS_WEB_IDENTITY_TOKEN_FILE"], "policy" => c.policy }
        end
        if (c = @instance_profile_credentials)
          endpoint = c.ip_address || c.port ? "http://#{c.ip_address || "169.254.169.254"}:#{c.port || 80}" : nil
          return { "type" => "instance_profile", "endpoint" => endpoint, "retries" => c.retries,
                   "http_open_timeout" => c.http_open_timeout, "http_read_timeout" => c.http_read_timeout }
        end
        if (c = @shared_credentials)
          return { "type" => "shared", "path" => c.path, "profile_name" => c.profile_name }
        end
        return { "type" => "process", "process" => @process_credentials.process } if @process_credentials

        base || { "type" => "default" }
      end

      def producer_options
        key_mode = if @partition_key then "per_record"
                   elsif @fixed_partition_key then "fixed"
                   else "random"
                   end
        {
          "region" => @region, "endpoint" => @endpoint, "http_proxy" => @http_proxy, "ca_file" => @ssl_ca_file,
          "connect_timeout" => @connect_timeout.to_f, "request_timeout" => @request_timeout.to_f,
          "credentials" => credentials_options, "max_record_size" => @max_record_size,
          "aggregation_max_size" => @aggregation_max_size, "batch_request_max_count" => @batch_request_max_count,
          "batch_request_max_size" => @batch_request_max_size, "concurrency" => @max_concurrent_requests,
          "rate_limit" => @rate_limit, "retries" => @retries_on_batch_request,
          "reset_backoff_if_success" => @reset_backoff_if_success, "deadline" => @delivery_timeout.to_f,
          "key_mode" => key_mode, "fixed_partition_key" => @fixed_partition_key, "keep_order" => @keep_order,
          "user_agent" => "fluentd/#{Fluent::VERSION}", "metrics" => metrics_options
        }
      end

      def present?(value)
        !value.nil? && !value.to_s.strip.empty?
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

      def check_stream
        if @stream_name.include?("${")
          log.info "stream_name has placeholders; streams are checked on first write"
          return
        end
        shards = @producer.check_stream(@stream_name)
        log.info "stream #{@stream_name.inspect} is reachable with #{shards} open shard(s)"
      rescue FluentPluginKinesisRs::StreamError => e
        # Not fatal: the stream may be created later; chunks wait in the buffer meanwhile.
        log.error "kinesis_streams_aggregated cannot use its stream yet; records stay buffered and are retried", error: e.message
      end

      def deliver(chunk, chunk_id, stream, tag, previously, progress)
        uid = chunk.unique_id
        created = chunk.created_at.to_f
        if @native_formatter
          begin
            delivery = @producer.start_chunk(stream, @native_formatter, chunk.read, tag, previously, progress, uid,
                                             created)
            return collect(chunk, chunk_id, tag, delivery)
          rescue FluentPluginKinesisRs::NeedsRubyFormattingError => e
            log.debug { "chunk #{chunk_id} formatted by fluentd: #{e.message}" }
          end
        end
        records, event_count, refused, scrubbed = format_in_ruby(chunk, tag, previously)
        delivery = @producer.start_records(stream, records, event_count, previously, progress, uid, created)
        result = collect(chunk, chunk_id, tag, delivery, refused)
        @counter_metrics["scrubbed"].add(scrubbed) if scrubbed.positive?
        result
      end

      # Waits for a delivery and accounts for it (counters, error stream). If the wait is
      # interrupted by an exception (Thread#raise, #kill), the delivery stays registered under
      # the chunk id and goes on: the chunk's next write collects it.
      def collect(chunk, chunk_id, tag, delivery, refused_in_ruby = [])
        @delivered_lock.synchronize { @inflight[chunk_id] = delivery }
        result = delivery.wait
        unregister(chunk_id, delivery)
        result["refused"] = (result["refused"] + refused_in_ruby).sort_by(&:first) unless refused_in_ruby.empty?
        account(result)
        emit_refused(chunk, tag, result["refused"]) unless result["refused"].empty?
        if (err = result["progress_file_error"])
          log.warn "chunk #{chunk_id}: cannot keep its delivery progress on disk (a crash now would resend the whole chunk)", error: err
        end
        result
      rescue FluentPluginKinesisRs::Error
        # The delivery itself failed (it cannot be collected again). Any other exception is an
        # interrupt of the wait (Thread#raise, Timeout): the delivery stays registered.
        unregister(chunk_id, delivery)
        raise
      end

      def unregister(chunk_id, delivery)
        @delivered_lock.synchronize { @inflight.delete(chunk_id) if @inflight[chunk_id].equal?(delivery) }
      end

      # The slow path: fluentd's formatter, then the extension delivers.
      def format_in_ruby(chunk, tag, previously)
        records = []
        refused = []
        scrubbed = [0]
        index = -1
        chunk.each do |time, record|
          index += 1
          next if previously && delivered_bit?(previously, index)

          begin
            records << [index, format_record(tag, time, record, scrubbed), *record_keys(record)]
          rescue RecordRefusedError => e
            refused << [index, e.message]
          end
        end
        [records, index + 1, refused, scrubbed[0]]
      end

      # `scrubbed`: a one-element Array counting records whose invalid UTF-8 was replaced.
      def format_record(tag, time, record, scrubbed)
        raise RecordRefusedError, "Invalid type of record (not a hash)" unless record.is_a?(Hash)

        data = if @data_key
                 value = record[@data_key]
                 raise RecordRefusedError, "Key '#{@data_key}' doesn't exist" if value.nil?

                 value.to_s.b
               else
                 text = format_json_safely(tag, time, inject_values_to_record(tag, time, record), scrubbed)
                 (@chomp_record ? text.chomp : text).b
               end
        case @compression
        when :zlib then Zlib::Deflate.deflate(data)
        when :gzip then Zlib.gzip(data)
        else data
        end
      end

      # fluentd's JSON formatters write invalid UTF-8 bytes through, which a consumer's JSON
      # parser rejects: scrub (or refuse) such records, as the Rust formatter does.
      def format_json_safely(tag, time, record, scrubbed)
        text = @formatter.format(tag, time, record)
        return text unless @formatter.is_a?(Fluent::Plugin::JSONFormatter)
        return text if utf8?(text)

        raise RecordRefusedError, FluentPluginKinesisRs::Scrub.refusal(record) if @invalid_utf8 == :error

        record, changed = FluentPluginKinesisRs::Scrub.record(record)
        scrubbed[0] += 1 if changed
        @formatter.format(tag, time, record)
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

      def utf8?(text)
        (text.encoding == Encoding::UTF_8 ? text : text.dup.force_encoding(Encoding::UTF_8)).valid_encoding?
      end

      def delivered_bit?(bits, index)
        byte = bits.getbyte(index / 8)
        byte && byte[index % 8] == 1
      end

      # The bits of the events delivered (by any attempt) or refused: what a retry must skip.
      def handled_bits(result)
        bits = result["delivered"].b
        result["refused"].each do |index, _reason|
          byte = index / 8
          bits << ("\0" * (byte + 1 - bits.bytesize)) if bits.bytesize <= byte
          bits.setbyte(byte, bits.getbyte(byte) | (1 << (index % 8)))
        end
        bits
      end

      # What earlier attempts delivered or refused: this process's memory, else (file buffer,
      # after a restart) the progress file. An unreadable file means "send everything".
      def recall(chunk, chunk_id, progress)
        known = @delivered_lock.synchronize { @delivered[chunk_id] }
        return known if known || progress.nil?

        bits = FluentPluginKinesisRs::Native.read_progress(progress, chunk.unique_id)
        if bits
          log.info "chunk #{chunk_id}: #{bits.unpack1("B*").count("1")} records were delivered before the restart; sending the rest"
        end
        bits
      rescue FluentPluginKinesisRs::ProgressError => e
        log.warn "chunk #{chunk_id}: its delivery progress cannot be read; sending every record again (duplicates possible)", error: e.message
        nil
      end

      def remember(chunk, chunk_id, handled, progress)
        @delivered_lock.synchronize do
          @delivered.delete(chunk_id)
          @delivered.shift while @delivered.size >= MAX_REMEMBERED_CHUNKS
          @delivered[chunk_id] = handled
        end
        # The refused records are in the error stream now: persist them as handled too.
        FluentPluginKinesisRs::Native.write_progress(progress, chunk.unique_id, handled) if progress
      rescue FluentPluginKinesisRs::ProgressError => e
        log.warn "chunk #{chunk_id}: cannot keep its delivery progress on disk", error: e.message
      end

      # The chunk is delivered. Its progress file stays until fluentd has purged the chunk (see
      # commit_write): a crash in between must not make a restart send the whole chunk again.
      def forget(uid, chunk_id, progress)
        @delivered_lock.synchronize do
          @delivered.delete(chunk_id)
          @finished_progress[uid] = progress if progress
        end
      end

      def remove_progress_file(chunk_id, progress)
        FluentPluginKinesisRs::Native.remove_progress(progress)
      rescue FluentPluginKinesisRs::ProgressError => e
        log.warn "chunk #{chunk_id}: cannot remove its progress file", error: e.message
      end

      def merge_bits(a, b)
        return b unless a
        return a unless b

        long, short = a.bytesize >= b.bytesize ? [a.b, b] : [b.b, a]
        short.each_byte.with_index { |byte, i| long.setbyte(i, long.getbyte(i) | byte) }
        long
      end

      # Beside the chunk file, for file buffers: buffer.b<id>.log → buffer.p<id>.log.kinesis-progress
      # (not matched by the buffer's own `*.log` pattern, and the same whether the chunk is
      # staged or queued).
      def progress_path(chunk)
        return nil unless @persist_progress && @buffer.persistent? && chunk.respond_to?(:path)

        "#{chunk.path.sub(/\.[bq]([0-9a-f]+)\.(?=[^\/]*\z)/, '.p\1.')}#{PROGRESS_SUFFIX}"
      end

      # Progress files whose chunk is gone (delivered, or handed to <secondary>/backup just
      # before a stop) are removed at start.
      def remove_orphan_progress_files
        return unless @persist_progress && @buffer&.persistent? && @buffer.respond_to?(:path)

        pattern = @buffer.path.to_s
        return unless pattern.include?(".*.")

        live = (@buffer.stage.values + @buffer.queue).map { |c| dump_unique_id_hex(c.unique_id) }
        Dir.glob("#{pattern.sub(".*.", ".p*.")}#{PROGRESS_SUFFIX}").each do |file|
          id = file[/\.p([0-9a-f]+)\.[^\/]*\z/, 1]
          next if id.nil? || live.include?(id)

          File.delete(file)
          log.debug { "removed the progress file of a finished chunk: #{file}" }
        rescue SystemCallError => e
          log.warn "cannot remove #{file}", error: e.message
        end
      end

      # After fluentd's force_flush: it stops at the first failed flush and never starts while a
      # retry is pending, so queued chunks are written here until the budget is spent.
      def drain_queue
        while @buffer.queued? && Fluent::Clock.now < @drain_deadline
          before = @buffer.queue.size
          begin
            try_flush
          rescue StandardError => e # re-raised by fluentd's test driver; the chunk is back in the queue
            log.warn "delivery failed while shutting down; retrying within the shutdown budget", error: e
          end
          sleep [1.0, @drain_deadline - Fluent::Clock.now].min.clamp(0, 1.0) if @buffer.queue.size >= before
        end
        return unless @buffer.queued?

        lost = @buffer.persistent? ? "they stay in the buffer for the next start" : "a memory buffer loses them at exit"
        log.error "shutdown budget (shutdown_timeout #{@shutdown_timeout}s) spent with #{@buffer.queue.size} chunks " \
                  "(#{@buffer.queued_records} records) still queued: #{lost}"
      end

      # Logs, while a stop waits, what it waits for.
      def start_drain_reporter
        @drain_reporter = Thread.new do
          Thread.current.name = "kinesis-drain-report" if Thread.current.respond_to?(:name=)
          loop do
            sleep DRAIN_LOG_INTERVAL
            inflight = @delivered_lock.synchronize { @inflight.size }
            queued = @buffering && @buffer ? @buffer.queue.size : 0
            dequeued = @buffer ? @buffer.dequeued.size : 0
            next if queued.zero? && dequeued.zero? && inflight.zero?

            left = [@drain_deadline - Fluent::Clock.now, 0].max.round
            log.info "shutting down: waiting for Kinesis deliveries (#{dequeued} chunks being written, #{queued} queued, " \
                     "#{inflight} interrupted deliveries still running); " \
                     "#{left}s of the shutdown budget left"
          end
        end
      end

      def stop_drain_reporter
        @drain_reporter&.kill
        @drain_reporter = nil
      end

      def account(result)
        # The extension counts only the records its producer refused; this adds those its
        # formatter (or fluentd's) refused.
        counters = result["counters"].merge("refused" => result["refused"].size)
        COUNTERS.each do |name|
          value = counters[name]
          @counter_metrics[name].add(value) if value&.positive?
        end
      end

      def emit_refused(chunk, tag, refused)
        wanted = refused.to_h
        index = -1
        chunk.each do |time, record|
          index += 1
          reason = wanted[index] or next
          log.warn "record refused, sent to the error stream: #{truncate(reason)}", record: truncate(record.to_s)
          router.emit_error_event(tag || "kinesis_streams_aggregated", time, record, RecordRefusedError.new(reason))
        end
      end

      def truncate(text)
        text = text.to_s
        @log_truncate_max_size.zero? || text.size <= @log_truncate_max_size ? text : text[0...@log_truncate_max_size]
      end

      # Fluent::Log has no debug?: the block form builds the message only at debug level.
      def log_chunk(stream, chunk_id, result)
        c = result["counters"]
        message = lambda do
          "chunk #{chunk_id} -> #{stream}: #{c["delivered"]} records in #{c["kinesis_records"]} Kinesis records, " \
            "#{c["requests"]} PutRecords calls, #{c["retried_entries"]} retried, #{c["throttled_entries"]} throttled"
        end
        @debug ? log.info(message.call) : log.debug(&message)
      end

      def raise_undelivered(stream, chunk_id, result, handled)
        failures = result["failures"]
        undelivered = failures.sum { |f| f[3] }
        reasons = failures.map { |kind, code, message, n| "#{n} x #{code} (#{kind}): #{message}" }.join("; ")
        message = "#{undelivered} of #{result["events"]} records of chunk #{chunk_id} not delivered to stream " \
                  "#{stream.inspect}: #{reasons}. #{handled.unpack1("B*").count("1")} records delivered or refused so far will not be sent again"
        raise UnrecoverableDeliveryError, message if failures.all? { |f| f[0] == "invalid" }

        raise DeliveryError, "#{message}; fluentd retries the chunk"
      end
    end
  end
end

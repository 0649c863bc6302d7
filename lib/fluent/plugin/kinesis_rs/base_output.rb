# frozen_string_literal: true

require "socket"
require "fluent/version"
require "fluent/plugin/output"
require_relative "../../../fluent_plugin_kinesis_rs"

module Fluent
  module Plugin
    module KinesisRs
      # What the three outputs (kinesis_streams_aggregated, kinesis_streams, kinesis_firehose)
      # share: each buffer chunk goes to the Rust extension as one byte string (formatting, then
      # delivery with retries on the extension's runtime, without the GVL), and this class does the
      # fluentd side: settings, credentials, chunk progress, the error stream, counters, stopping.
      #
      # What happens to records:
      # - delivered: counted, remembered per chunk so a retry of the chunk does not resend them;
      # - can never be sent (not a hash, missing data_key or partition_key, invalid explicit hash
      #   key, too large): emitted to fluentd's error stream (`@ERROR` label) with the reason;
      # - not delivered after retries: the write raises, so fluentd retries the chunk or hands it
      #   to `<secondary>`. Only request validation errors are unrecoverable (straight to
      #   `<secondary>`); missing streams and denied access are retried until fixed.
      #
      # A subclass registers its @type and defines PLUGIN_TYPE (its @type, also the destination the
      # extension delivers to), COUNTERS (monitor_agent name => extension counter), SERVICE, CALL
      # and NOUN (for messages: "Kinesis", "PutRecords", "stream"), BATCH_MAX_COUNT / BATCH_MAX_BYTES / MAX_RECORD_SIZE_LIMIT (the
      # service's limits), and #target_name_template (the stream name setting).
      class BaseOutput < Fluent::Plugin::Output
        helpers :formatter, :inject, :metrics, :event_emitter, :timer

        IMPLEMENTATION = "fluent-plugin-kinesis-rs #{FluentPluginKinesisRs::VERSION} (Rust extension)"
        DEFAULT_MAX_RECORD_SIZE = 1024 * 1024
        # Chunks whose partial delivery is remembered at most (oldest forgotten first).
        MAX_REMEMBERED_CHUNKS = 4096

        # Raised when records were not delivered; fluentd retries the chunk.
        class DeliveryError < FluentPluginKinesisRs::Error; end
        # Raised when retrying cannot help (invalid requests, unreadable chunks).
        class UnrecoverableDeliveryError < Fluent::UnrecoverableError; end
        # The error attached to records sent to the error stream.
        class RecordRefusedError < FluentPluginKinesisRs::Error; end

        # --- fluent-plugin-kinesis parameters (same names and meanings) ---
        desc "AWS region (else AWS_REGION / the shared config)."
        config_param :region, :string, default: nil
        desc "Service endpoint URL (local servers, VPC endpoints)."
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
        desc "Send record[data_key].to_s instead of the formatted record."
        config_param :data_key, :string, default: nil
        desc "Truncate log lines about refused records to this many characters (0: no limit)."
        config_param :log_truncate_max_size, :integer, default: 1024
        desc "Compress each record: zlib or gzip."
        config_param :compression, :enum, list: %i[zlib gzip], default: nil
        desc "Remove the trailing newline of each formatted record."
        config_param :chomp_record, :bool, default: false
        desc "The record size limit: Kinesis 1 MiB (data plus partition key) unless the stream was raised, up to 10 MiB; " \
             "Firehose 1,024,000 bytes. Larger records go to the error stream."
        config_param :max_record_size, :size, default: DEFAULT_MAX_RECORD_SIZE
        desc "Records per batch call (at most 500)."
        config_param :batch_request_max_count, :integer, default: 500
        desc "Bytes per batch call (PutRecords at most 5 MiB, PutRecordBatch 4 MiB)."
        config_param :batch_request_max_size, :size, default: 5 * 1024 * 1024
        desc "Retries of failed entries of a batch call before the chunk is handed back to fluentd."
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
          # fluentd waits this long between two flushes while chunks are queued (1 s by default),
          # made for a write that returns when the chunk is delivered. With delayed commit,
          # try_write returns as soon as the delivery starts, and max_chunks_in_flight is what
          # holds the next one back: at 1 s, a backlog (after in_tail catches up, an outage, a
          # restart) would drain at one chunk per second per flush thread.
          config_set_default :flush_thread_burst_interval, 0.05
        end

        # --- new parameters ---
        desc "Batch calls (PutRecords, PutRecordBatch) in flight at once (shared by the chunks being delivered)."
        config_param :max_concurrent_requests, :integer, default: 8
        desc "Seconds the last, partial batch call of a chunk may wait for the next chunk's records to fill it " \
             "(as the KPL's RecordMaxBufferedTime). Chunks are then acknowledged to fluentd once all their records " \
             "are delivered (delayed commit), so several are delivered at once. It bounds only that last call's wait: " \
             "a full call goes at once, and a stop sends a waiting call at once. 0: each chunk on its own, written synchronously. " \
             "auto (the default): 1.5 times the recent interval between chunks when that is at most 10 s, else 1 s, " \
             "counted from the last chunk that added records to the call and at most 10 s from its first " \
             "(and 1 s from its first while shards are at their limit: entries waited for their shard or were throttled in the last 10 s)."
        config_param :record_max_buffered_time, :string, default: "auto"
        desc "Chunks being delivered at once with record_max_buffered_time (default: flush_thread_count + 2: " \
             "a partial call can hold the tail of one chunk and all of the next while the third fills it)."
        config_param :max_chunks_in_flight, :integer, default: nil
        desc "Seconds one chunk's delivery may take, retries included, before fluentd retries it."
        config_param :delivery_timeout, :time, default: 120
        desc "Seconds one HTTP request may take."
        config_param :request_timeout, :time, default: 30
        desc "Seconds to open a connection."
        config_param :connect_timeout, :time, default: 5
        desc "PEM file of extra certificate authorities to trust."
        config_param :ssl_ca_file, :string, default: nil
        desc "Check at start that the (delivery) stream exists and is reachable (skipped when its name has placeholders)."
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

        # Suffix of the files keeping a chunk's delivery progress, beside the chunk.
        PROGRESS_SUFFIX = ".kinesis-progress"
        # How often a stop logs what it is still waiting for.
        DRAIN_LOG_INTERVAL = 5

        def initialize
          super
          @delivered = {}
          @delivered_lock = Mutex.new
          # Chunks handed over by #try_write and being delivered in the background: id => thread.
          @flights = {}
          @flights_changed = ConditionVariable.new
          # Deliveries whose wait was abandoned (the flush thread was killed or raised), by chunk
          # id: they run on, and the chunk's next write collects them before sending anything.
          @inflight = {}
          # Progress files of chunks delivered in full, removed once fluentd has purged the chunk.
          @finished_progress = {}
        end

        def multi_workers_ready?
          true
        end

        # record_max_buffered_time auto: a partial call waits at least this long, and follows the
        # interval between chunks up to LINGER_AUTO_MAX.
        LINGER_AUTO_MIN = 1.0
        LINGER_AUTO_MAX = 10.0

        def configure(conf)
          super
          @linger, @linger_max = parse_record_max_buffered_time(@record_max_buffered_time)
          validate!
          warn_about_compatibility_options
          @formatter = formatter_create
          @format_options = fast_format_options
          @native_formatter = native_formatter
          @producer_options = producer_options
          @counter_metrics = self.class::COUNTERS.keys.to_h do |name|
            [name, metrics_create(namespace: "fluentd", subsystem: "output", name: "#{counter_prefix}_#{name}",
                                  help_text: "#{self.class::SERVICE} #{name.tr("_", " ")}")]
          end
          log.info "#{self.class::PLUGIN_TYPE} is #{IMPLEMENTATION}"
          @max_chunks_in_flight ||= @buffer_config.flush_thread_count + 2
          raise Fluent::ConfigError, "max_chunks_in_flight must be at least 1" if @max_chunks_in_flight < 1
          warn_if_anchor_installed
        end

        # Delayed commit (see #try_write) when partial calls may wait for the next chunk; never
        # with keep_order, whose chunks must go one after the other.
        def prefer_delayed_commit
          @linger.positive? && !ordered?
        end

        # [linger, linger_max] in seconds: "auto", or a fixed time (linger_max 0).
        def parse_record_max_buffered_time(value)
          value = value.to_s.strip
          return [LINGER_AUTO_MIN, LINGER_AUTO_MAX] if value == "auto"
          unless value.match?(/\A\d+(\.\d+)?[smhd]?\z/)
            raise Fluent::ConfigError, "record_max_buffered_time must be auto or a time (0, 0.5, 2s, 1m), not #{value.inspect}"
          end

          [Fluent::Config.time_value(value).to_f, 0.0]
        end

        def start
          super
          raise_delayed_commit_timeout if @delayed_commit
          @producer = FluentPluginKinesisRs::Native::Producer.new(@producer_options)
          remove_orphan_progress_files
          check_destination if @check_stream_on_start
        end

        # A stop delivers what is buffered instead of failing it: from here on, deliveries retry
        # until the shutdown budget is spent (fluentd's force_flush stops at the first failed
        # flush, and a memory chunk still queued when the worker exits is gone).
        def before_shutdown
          # From here on chunks are written synchronously: fluentd waits for its flush threads, but
          # not for background deliveries, and takes their chunks back (after_shutdown).
          @stopping = true
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
              log.info "stopping: delivering the records #{what} to #{self.class::SERVICE}, for up to #{@shutdown_timeout}s (shutdown_timeout)"
            end
            start_drain_reporter
          end
          super
          drain_queue if @producer && @flush_at_shutdown && !@as_secondary
          wait_for_flights(@drain_deadline) if @producer && @delayed_commit
        end

        def after_shutdown
          super
        ensure
          stop_drain_reporter
        end

        # Every flush thread has stopped: nothing delivers any more.
        def close
          super
          before_producer_close if @producer && !@producer.closed?
          @producer&.close
        end

        # fluentd purges a chunk here once its write returned (also after <secondary> took it): its
        # progress file goes with it. With delayed commit, a stop takes back (after_shutdown) the
        # chunks still being written: such a chunk is not purged, and its progress file stays, so
        # the next start sends nothing of it again.
        def commit_write(chunk_id, **options)
          super
          progress = @delivered_lock.synchronize { @finished_progress.delete(chunk_id) }
          return unless progress

          if @buffer.queue.any? { |c| c.unique_id == chunk_id }
            log.info "chunk #{dump_unique_id_hex(chunk_id)} was delivered after fluentd took it back at the stop; its progress file marks it delivered"
          else
            remove_progress_file(dump_unique_id_hex(chunk_id), progress)
          end
        end

        def statistics
          stats = super
          stats["output"].merge!(kinesis_statistics)
          stats
        end

        # The counters since start, as monitor_agent shows them.
        def kinesis_statistics
          self.class::COUNTERS.keys.to_h { |name| ["#{counter_prefix}_#{name}", @counter_metrics[name].get] }
        end

        # Delayed commit: the chunk's delivery runs in the background and this returns at once, so
        # the next chunk's records can fill the calls this one leaves partial. When every record is
        # delivered or refused, the chunk is acknowledged (commit_write); otherwise it is handed back
        # to fluentd (rollback_write), which retries it with backoff (or gives it to <secondary>),
        # and the retry sends only what was not delivered. At most max_chunks_in_flight at once:
        # this waits for a free place, and meanwhile has chunks in flight that wait on nothing but
        # their partial call send it.
        def try_write(chunk)
          return write_and_commit(chunk) if @stopping

          chunk_id = dump_unique_id_hex(chunk.unique_id)
          @delivered_lock.synchronize do
            if @flights.key?(chunk_id)
              # fluentd took the chunk back (delayed_commit_timeout) while it was still being delivered.
              log.warn "chunk #{chunk_id}: its earlier delivery is still running; it acknowledges or hands back the chunk"
              return
            end
            while @flights.size >= @max_chunks_in_flight
              # No next chunk comes until one of these is done: those waiting on nothing but the
              # partial call they hold for more records send it now, not after record_max_buffered_time.
              @producer.send_open_calls
              @flights_changed.wait(@delivered_lock, 1)
            end
            @flights[chunk_id] = Thread.new { deliver_in_background(chunk, chunk_id) }
          end
        end

        def write(chunk)
          stream = extract_placeholders(target_name_template, chunk)
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

        # Extension counters are named after Kinesis; a subclass may show them under another prefix.
        def counter_prefix
          "kinesis"
        end

        private

        # While stopping: as a synchronous write (a failure raises to fluentd's flush).
        def write_and_commit(chunk)
          write(chunk)
          commit_write(chunk.unique_id)
        end

        # The synchronous write's steps, then the chunk is acknowledged or handed back.
        def deliver_in_background(chunk, chunk_id)
          Thread.current.name = "kinesis-chunk" if Thread.current.respond_to?(:name=)
          begin
            write(chunk)
          rescue Fluent::UnrecoverableError => e
            give_up_chunk(chunk, e)
          rescue StandardError => e
            # As fluentd does for a failed synchronous write: the chunk goes back to the queue, and
            # the retry state logs "failed to flush the buffer" with the error and the next retry.
            update_retry_state(chunk.unique_id, @as_secondary, e) if rollback_write(chunk.unique_id, update_retry: false)
          else
            commit_write(chunk.unique_id)
          end
        rescue Exception => e # rubocop:disable Lint/RescueException
          # Acknowledging failed (the buffer is closing): fluentd's own rollback at shutdown keeps the chunk.
          log.error "chunk #{chunk_id}: cannot acknowledge its delivery to fluentd", error: e
        ensure
          @delivered_lock.synchronize do
            @flights.delete(chunk_id)
            @flights_changed.broadcast
          end
        end

        # What fluentd does with a chunk whose write cannot succeed: <secondary> (a synchronous one)
        # takes it, else it is backed up (see fluentd's backup_dir) and purged.
        def give_up_chunk(chunk, error)
          log.error "chunk #{dump_unique_id_hex(chunk.unique_id)} cannot be delivered; #{@secondary ? "<secondary> takes it" : "backing it up"}",
                    error: error.message
          if @secondary && !@secondary.delayed_commit
            begin
              @secondary.write(chunk)
              return commit_write(chunk.unique_id, secondary: true)
            rescue StandardError => e
              log.warn "<secondary> failed too; backing the chunk up", error: e
            end
          end
          backup_chunk(chunk, false, true)
        end

        # Waits (at most until `deadline`) for the chunks being delivered in the background, or
        # (`until_queued`) until one is handed back to the queue.
        def wait_for_flights(deadline, until_queued: false)
          @delivered_lock.synchronize do
            until @flights.empty? || (until_queued && @buffer.queued?) || Fluent::Clock.now >= deadline
              @flights_changed.wait(@delivered_lock, [deadline - Fluent::Clock.now, 1].min.clamp(0.01, 1))
            end
          end
        end

        def flights
          @delivered_lock.synchronize { @flights.size }
        end

        # A delivery may outlast its deadline by one call, and waits for its turn behind other
        # chunks' calls: fluentd must not take a chunk back (delayed_commit_timeout) meanwhile.
        # (fluentd sets @delayed_commit and @delayed_commit_timeout in #start.)
        def raise_delayed_commit_timeout
          needed = 2 * @delivery_timeout + @request_timeout + [@linger, @linger_max].max
          needed = [needed, @shutdown_timeout + @request_timeout].max.ceil
          return if @delayed_commit_timeout >= needed

          log.info "delayed_commit_timeout raised from #{@delayed_commit_timeout}s to #{needed}s: a chunk being delivered " \
                   "(delivery_timeout #{@delivery_timeout}s, shutdown_timeout #{@shutdown_timeout}s) must not be taken back"
          @delayed_commit_timeout = needed
        end

        # Whether chunks must be delivered one after the other (keep_order).
        def ordered?
          false
        end

        # The setting naming where chunks go (chunk placeholders allowed).
        def target_name_template
          raise NotImplementedError, "#{self.class} must define target_name_template"
        end

        # Called once every flush thread has stopped, before the producer is closed.
        def before_producer_close; end

        # Settings of the subclass's own for the extension's producer and formatter.
        def extra_producer_options
          {}
        end

        def extra_format_options
          {}
        end

        # The partition key and explicit hash key of a record formatted in Ruby: none by default.
        def record_keys(_record)
          [nil, nil]
        end

        # The formatted record's bytes before compression (kinesis_firehose adds its newline here).
        def finish_data(data)
          data
        end

        def validate!
          limit = self.class::MAX_RECORD_SIZE_LIMIT
          unless (1..limit).cover?(@max_record_size)
            raise Fluent::ConfigError, "max_record_size #{@max_record_size} must be between 1 byte and #{limit} bytes"
          end
          call = self.class::CALL
          if @batch_request_max_count > self.class::BATCH_MAX_COUNT
            log.warn "batch_request_max_count #{@batch_request_max_count} is above the #{call} limit; using #{self.class::BATCH_MAX_COUNT}"
            @batch_request_max_count = self.class::BATCH_MAX_COUNT
          end
          max_request = [self.class::BATCH_MAX_BYTES, @max_record_size].max
          if @batch_request_max_size > max_request
            log.warn "batch_request_max_size #{@batch_request_max_size} is above the #{call} limit; using #{max_request}"
            @batch_request_max_size = max_request
          end
          @batch_request_max_size = [@batch_request_max_size, [@max_record_size, self.class::BATCH_MAX_BYTES].min].max
          @shutdown_timeout ||= @delivery_timeout + @request_timeout
          raise Fluent::ConfigError, "shutdown_timeout must be positive" unless @shutdown_timeout.positive?
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
                   "logging '#{self.class::PLUGIN_TYPE} is ...'. Uninstall one of them to be sure."
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
            "max_record_size" => @max_record_size,
            "invalid_utf8" => @invalid_utf8.to_s,
          }.merge(extra_format_options)
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
          {
            "destination" => self.class::PLUGIN_TYPE,
            "region" => @region, "endpoint" => @endpoint, "http_proxy" => @http_proxy, "ca_file" => @ssl_ca_file,
            "connect_timeout" => @connect_timeout.to_f, "request_timeout" => @request_timeout.to_f,
            "credentials" => credentials_options, "max_record_size" => @max_record_size,
            "batch_request_max_count" => @batch_request_max_count, "batch_request_max_size" => @batch_request_max_size,
            "concurrency" => @max_concurrent_requests, "retries" => @retries_on_batch_request,
            "reset_backoff_if_success" => @reset_backoff_if_success, "deadline" => @delivery_timeout.to_f,
            "linger" => (prefer_delayed_commit ? @linger : 0.0),
            "linger_max" => (prefer_delayed_commit ? @linger_max : 0.0),
            "user_agent" => "fluentd/#{Fluent::VERSION}"
          }.merge(extra_producer_options)
        end

        def present?(value)
          !value.nil? && !value.to_s.strip.empty?
        end

        def check_destination
          name = target_name_template
          if name.include?("${")
            log.info "the #{self.class::NOUN} name has placeholders; #{self.class::NOUN}s are checked on first write"
            return
          end
          log.info "#{self.class::NOUN} #{name.inspect} #{@producer.check_destination(name)}"
        rescue FluentPluginKinesisRs::StreamError => e
          # Not fatal: the stream may be created later; chunks wait in the buffer meanwhile.
          log.error "#{self.class::PLUGIN_TYPE} cannot use its #{self.class::NOUN} yet; records stay buffered and are retried", error: e.message
        end

        def deliver(chunk, chunk_id, stream, tag, previously, progress)
          uid = chunk.unique_id
          created = chunk.created_at.to_f
          if @native_formatter
            begin
              data = chunk.read
              delivery = @producer.start_chunk(stream, @native_formatter, data, tag, previously, progress, uid, created)
              # The extension has formatted the bytes (in place). A file chunk's read is a fresh
              # copy: free it now, not at the next GC (a memory chunk's read is the chunk itself).
              data.clear if @buffer.persistent?
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
          data = finish_data(data)
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
          while (@buffer.queued? || flights.positive?) && Fluent::Clock.now < @drain_deadline
            # A chunk delivered in the background and handed back is in the queue again.
            unless @buffer.queued?
              wait_for_flights(@drain_deadline, until_queued: true)
              next
            end
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
              log.info "shutting down: waiting for #{self.class::SERVICE} deliveries (#{dequeued} chunks being written, #{queued} queued, " \
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
          self.class::COUNTERS.each do |name, source|
            value = counters[source]
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
            router.emit_error_event(tag || self.class::PLUGIN_TYPE, time, record, RecordRefusedError.new(reason))
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
            "chunk #{chunk_id} -> #{stream}: #{c["delivered"]} records in #{c["kinesis_records"]} #{self.class::SERVICE} records, " \
              "#{c["requests"]} #{self.class::CALL} calls, #{c["retried_entries"]} retried, #{c["throttled_entries"]} throttled"
          end
          @debug ? log.info(message.call) : log.debug(&message)
        end

        def raise_undelivered(stream, chunk_id, result, handled)
          failures = result["failures"]
          undelivered = failures.sum { |f| f[3] }
          reasons = failures.map { |kind, code, message, n| "#{n} x #{code} (#{kind}): #{message}" }.join("; ")
          message = "#{undelivered} of #{result["events"]} records of chunk #{chunk_id} not delivered to #{self.class::NOUN} " \
                    "#{stream.inspect}: #{reasons}. #{handled.unpack1("B*").count("1")} records delivered or refused so far will not be sent again"
          raise UnrecoverableDeliveryError, message if failures.all? { |f| f[0] == "invalid" }

          raise DeliveryError, "#{message}; fluentd retries the chunk"
        end
      end
    end
  end
end

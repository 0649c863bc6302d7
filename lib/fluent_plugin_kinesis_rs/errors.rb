# frozen_string_literal: true

module FluentPluginKinesisRs
  # Base of every error the gem raises. A StandardError, so fluentd retries it unless a
  # subclass says otherwise. The Rust extension raises these classes by name
  # (ext/kinesis_rs/src/errors.rs) and falls back to this one for a name not defined here.
  # Nothing here needs fluentd: the extension works without it.
  class Error < StandardError; end

  # A record that does not fit in an aggregate of the stream's maximum record size, even alone.
  class RecordTooLargeError < Error; end

  # A partition key or explicit hash key that Kinesis would refuse.
  class InvalidKeyError < Error; end

  # Raised by name from the producer/formatter bindings (ext/kinesis_rs/src/options.rs,
  # producer.rs); defined here so Ruby can rescue them before anything was raised.

  # Options the Rust side refuses.
  class ConfigurationError < Error; end

  # The record format needs Ruby to format this chunk (the Rust formatter cannot).
  class NeedsRubyFormattingError < Error; end

  # A buffer chunk that cannot be decoded.
  class CorruptChunkError < Error; end

  # A delivery failure reported by Kinesis or the network.
  class StreamError < Error; end

  # The work was interrupted (Thread#kill, shutdown) before it finished.
  class InterruptedError < Error; end

  # The producer was used after it was closed.
  class ClosedError < Error; end

  # A chunk's progress file cannot be read or written.
  class ProgressError < Error; end

  # A bug in the Rust extension (a caught panic); retryable.
  class InternalError < Error; end
end

module FluentPluginKinesisRs
  # Options the extension cannot use; the plugin turns it into Fluent::ConfigError.
  class ConfigurationError < Error; end

  # The fast path cannot render this chunk (or configuration) exactly as fluentd's formatter
  # would; the plugin formats it with fluentd's formatter instead.
  class NeedsRubyFormattingError < Error; end

  # A buffer chunk that is not fluentd's MessagePack: retrying cannot help.
  class CorruptChunkError < Error; end

  # The stream cannot be used: missing, access denied, unreachable. The message says why.
  class StreamError < Error; end

  # A bug in the extension (a Rust panic, caught). Retryable: the chunk is tried again.
  class InternalError < Error; end

  # The call was interrupted (thread killed, shutdown) before it could start.
  class InterruptedError < Error; end

  # The producer was closed.
  class ClosedError < Error; end
end

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

  # The producer was closed.
  class ClosedError < Error; end

  # A chunk's progress file cannot be read or written.
  class ProgressError < Error; end
end

# frozen_string_literal: true

module FluentPluginKinesisRs
  # Invalid UTF-8 in a record, replaced before fluentd's own JSON formatter sees it (the slow
  # path) exactly as the Rust fast path replaces it: each invalid sequence becomes U+FFFD, as
  # String#scrub does (the Rust side follows the same "maximal subpart" rule, byte for byte).
  # Without this, yajl/oj write the raw bytes inside "JSON" that consumers cannot parse.
  #
  #   record, changed = FluentPluginKinesisRs::Scrub.record(record)
  #   reason = FluentPluginKinesisRs::Scrub.refusal(record)  # invalid_utf8 error: nil or why
  #
  # Hash keys and values and Array elements are walked. A record without invalid UTF-8 comes
  # back as the very same object; otherwise only the Strings that needed a replacement and the
  # Hashes/Arrays on the way to them are new (a new Hash is a plain Hash: no default value or
  # compare_by_identity). The input, frozen or not, is never modified.
  #
  # The walk costs a few microseconds for a record of ten fields, more than fluentd's JSON
  # formatter itself: format first, and scrub only when the output is not valid UTF-8 (fluentd's
  # JSON formatters, oj, yajl and json alike, copy invalid bytes into their output as they are).
  #
  # A String in another encoding (ASCII-8BIT, as msgpack unpacks a bin value) is read as UTF-8
  # bytes, as the fast path reads it: left as it is when those bytes are valid UTF-8, else
  # replaced by a scrubbed UTF-8 copy. Two keys that become equal once scrubbed keep one entry
  # (the later value, at the earlier position); the fast path writes both keys.
  module Scrub
    UTF_8 = Encoding::UTF_8

    module_function

    # [obj with every String that is not valid UTF-8 scrubbed, whether a replacement was made]
    def record(obj)
      out = scrub_value(obj)
      [out, !out.equal?(obj)]
    end

    # obj itself when it holds no invalid UTF-8, else a scrubbed copy.
    def scrub_value(obj)
      case obj
      when String then scrub_string(obj)
      when Hash then scrub_hash(obj)
      when Array then scrub_array(obj)
      else obj
      end
    end

    def scrub_string(str)
      if str.encoding == UTF_8
        str.valid_encoding? ? str : str.scrub
      elsif str.ascii_only?
        str
      else
        utf8 = str.dup.force_encoding(UTF_8)
        utf8.valid_encoding? ? str : utf8.scrub
      end
    end

    def scrub_hash(hash)
      out = nil
      index = 0
      hash.each_pair do |key, value|
        new_key = scrub_value(key)
        new_value = scrub_value(value)
        if out
          out[new_key] = new_value
        elsif !new_key.equal?(key) || !new_value.equal?(value)
          out = hash.first(index).to_h
          out[new_key] = new_value
        end
        index += 1
      end
      out || hash
    end

    # With invalid_utf8 error: why `record` (a Hash) is refused, worded as the Rust formatter
    # words it (its first invalid String: a top-level key, a top-level value, or a String nested
    # in a value), or nil when it has no invalid UTF-8.
    def refusal(record)
      return nil unless record.is_a?(Hash)

      record.each_pair do |key, value|
        if (at = invalid_at(key))
          return refusal_text("in a field name (#{field_name(key)}: #{at})")
        end
        if value.is_a?(String)
          at = invalid_at(value) and return refusal_text("in field #{field_name(key)} (#{at})")
        elsif (at = first_nested_invalid(value))
          return refusal_text("in field #{field_name(key)} (a string nested in it: #{at})")
        end
      end
      nil
    end

    # "byte 0x.. at offset N" for a String that is not valid UTF-8, else nil.
    def invalid_at(obj)
      return nil unless obj.is_a?(String)

      str = obj.encoding == UTF_8 ? obj : obj.dup.force_encoding(UTF_8)
      return nil if str.valid_encoding?

      offset = 0
      str.each_char do |c|
        break unless c.valid_encoding?

        offset += c.bytesize
      end
      format("byte 0x%<byte>02x at offset %<offset>d", byte: str.getbyte(offset), offset: offset)
    end

    def first_nested_invalid(obj)
      case obj
      when String then invalid_at(obj)
      when Hash
        obj.each_pair do |k, v|
          at = first_nested_invalid(k) || first_nested_invalid(v)
          return at if at
        end
        nil
      when Array
        obj.each do |e|
          at = first_nested_invalid(e)
          return at if at
        end
        nil
      end
    end

    def field_name(key)
      name = key.is_a?(String) ? scrub_string(key).dup.force_encoding(UTF_8) : key.to_s
      name = "#{name.byteslice(0, 100).scrub("")}..." if name.bytesize > 100
      name.inspect
    end

    def refusal_text(place)
      "record has invalid UTF-8 #{place}; sent to the error stream because invalid_utf8 is error"
    end

    def scrub_array(array)
      out = nil
      array.each_with_index do |element, index|
        new_element = scrub_value(element)
        if out
          out << new_element
        elsif !new_element.equal?(element)
          out = array[0, index].to_a
          out << new_element
        end
      end
      out || array
    end
  end
end

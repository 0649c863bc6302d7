# frozen_string_literal: true

# Shared setup for the Ruby tests.
#
# The extension is loaded from lib/ (build it with `rake compile`). fluentd is optional: the
# tests of the extension never need it, and the plugin tests skip, loudly, without it.
#
# Where fluentd comes from, first match wins:
#   FLUENTD_LIB=dir:dir   directories prepended to $LOAD_PATH (fluentd's and serverengine's lib)
#   /opt/serverengine/lib:/opt/fluentd/lib   when FLUENTD_LIB is unset and both exist
#   an installed fluentd gem
# FLUENTD_REQUIRED=1 turns a missing fluentd into a failure instead of a skip.

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
$LOAD_PATH.unshift(__dir__)

require "test/unit"
require "fluent_plugin_kinesis_rs"

module TestHelper
  ROOT = File.expand_path("..", __dir__)
  DEFAULT_FLUENTD_LIB = %w[/opt/serverengine/lib /opt/fluentd/lib].freeze

  # [available?, where it came from or what is missing]
  def self.locate_fluentd
    if ENV.key?("FLUENTD_LIB")
      dirs = ENV["FLUENTD_LIB"].split(File::PATH_SEPARATOR).reject(&:empty?)
      $LOAD_PATH.unshift(*dirs)
      source = "FLUENTD_LIB=#{ENV["FLUENTD_LIB"]}"
    elsif DEFAULT_FLUENTD_LIB.all? { |d| File.directory?(d) }
      $LOAD_PATH.unshift(*DEFAULT_FLUENTD_LIB)
      source = DEFAULT_FLUENTD_LIB.join(File::PATH_SEPARATOR)
    else
      begin
        gem "fluentd"
        return [true, "fluentd gem #{Gem.loaded_specs["fluentd"].version}"]
      rescue Gem::LoadError
        return [false, "no fluentd: FLUENTD_LIB is unset, #{DEFAULT_FLUENTD_LIB.join(" and ")} " \
                       "are not both there, and no fluentd gem is installed"]
      end
    end
    missing = %w[fluent/engine serverengine].reject { |f| $LOAD_PATH.resolve_feature_path(f) }
    return [true, source] if missing.empty?

    [false, "#{source} does not provide #{missing.join(" and ")}"]
  end

  FLUENTD_AVAILABLE, FLUENTD_SOURCE = locate_fluentd

  @fluentd_loaded = false
  @skipped = []

  # For a test file that needs fluentd, at its top:
  #   return unless TestHelper.fluentd!("out_kinesis_streams_aggregated tests")
  # Loads fluentd's test drivers and returns true; without fluentd, returns false (or aborts
  # when FLUENTD_REQUIRED=1), and ONE loud line naming what is missing and every suite skipped
  # is printed before the tests run.
  def self.fluentd!(what)
    if FLUENTD_AVAILABLE
      unless @fluentd_loaded
        require "fluent/engine"
        require "fluent/test"
        require "fluent/test/helpers"
        require "fluent/test/driver/output"
        @fluentd_loaded = true
      end
      return true
    end
    abort("FAILED (FLUENTD_REQUIRED=1): #{what} need fluentd; #{FLUENTD_SOURCE}") if ENV["FLUENTD_REQUIRED"] == "1"
    if @skipped.empty?
      # Runs before test-unit's own at_exit (registered earlier, so run later): the line comes
      # before the tests and the summary stays last.
      at_exit do
        warn("*** SKIPPED #{@skipped.join(", ")}: #{FLUENTD_SOURCE}; " \
             "set FLUENTD_LIB=<serverengine>/lib:<fluentd>/lib to run them ***")
      end
    end
    @skipped << what
    false
  end

  # Runs a Python snippet with JSON in and JSON out; raises with the install command when the
  # consumer library is missing.
  def self.python_json(script, input)
    require "json"
    require "open3"
    python = ENV.fetch("PYTHON", "python3")
    out, err, status = Open3.capture3(python, "-c", script, stdin_data: JSON.generate(input))
    if !status.success? && err.match?(/ModuleNotFoundError|No module named/)
      raise "#{err.lines.last&.strip}: install the test consumer library with " \
            "`pip install -r #{File.join(ROOT, "test/support/requirements.txt")}` (or run script/setup)"
    end
    raise "#{python} failed (#{status}):\n#{err}" unless status.success?

    JSON.parse(out)
  end
end

FLUENTD_AVAILABLE = TestHelper::FLUENTD_AVAILABLE

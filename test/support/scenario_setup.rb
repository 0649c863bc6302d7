# frozen_string_literal: true

require "tmpdir"
require_relative "fault_proxy"

# What the load scenarios (restart_scenario.rb, multi_worker_scenario.rb) set up alike: a
# temporary directory with an empty Apache log, a stream, and the fault proxy in front of the
# local Kinesis with the scenario's faults applied.
module ScenarioSetup
  private

  def prepare_stream_and_proxy(name, shards, faults)
    @dir = Dir.mktmpdir("kinesis-#{name}")
    @log = File.join(@dir, "access.log")
    File.write(@log, "")
    @stream = @kinesis.create_stream(@kinesis.unique_stream(name), shards)
    @proxy = FaultProxy.new(@kinesis.endpoint)
    faults.each { |f| @proxy.command_line(f) }
  end
end

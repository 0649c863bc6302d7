# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("fluentd launcher tests")

require "stringio"
require "tmpdir"
require_relative "support/fluentd_process"

# The launcher itself (test/support/fluentd_process.rb), on a plain fluentd pipeline without this
# plugin (in_forward -> out_file), so that what restart, crash and multi-worker tests rely on is
# checked on its own: worker pids, a worker crash and its restart, stop, kill!, the escalation.
class FluentdProcessTest < Test::Unit::TestCase
  setup do
    @dir = Dir.mktmpdir("fluentd-process")
  end

  teardown do
    @fluentd&.stop(timeout: 10)
    FileUtils.rm_rf(@dir)
  end

  def config(workers: nil)
    <<~CONF
      #{workers ? "<system>\n  workers #{workers}\n</system>" : ""}
      <source>
        @type monitor_agent
        bind 127.0.0.1
        port #{FluentdProcess.free_port(workers || 1)}
      </source>
      <source>
        @type forward
        bind 127.0.0.1
        port #{FluentdProcess.free_port}
      </source>
      <match test.**>
        @type file
        path #{@dir}/out.jsonl
        append true
        add_path_suffix false
        <format>
          @type json
        </format>
        <buffer []>
          @type memory
          flush_mode immediate
        </buffer>
      </match>
    CONF
  end

  def out_records
    FluentdProcess.read_json_lines(File.join(@dir, "out.jsonl"))
  end

  test "supervisor with 2 workers: running, worker pids, a worker crash and restart, a clean stop" do
    @fluentd = FluentdProcess.new(dir: @dir, config: config(workers: 2)).start
    assert_equal 2, @fluentd.workers
    @fluentd.wait_until_running(60)
    workers = @fluentd.worker_pids
    assert_equal 2, workers.size
    assert_equal [@fluentd.pid, *workers].sort, @fluentd.group_pids
    assert_equal 2, (0..1).map { |w| @fluentd.monitor_plugin("forward", worker: w) }.compact.size

    @fluentd.forward("test.a", [{ "n" => 1 }, { "n" => 2 }])
    @fluentd.wait_until(10, "2 records in out.jsonl") { out_records.size == 2 }

    mark = @fluentd.log_mark
    assert_equal workers, @fluentd.kill_workers(:KILL)
    @fluentd.wait_until_running(60, since: mark)
    assert_empty @fluentd.worker_pids & workers
    assert_equal 2, @fluentd.worker_pids.size
    assert @fluentd.alive?

    stop = @fluentd.stop(timeout: 30)
    assert_false stop.escalated
    assert_equal 0, stop.exitstatus
    assert_operator stop.seconds, :<, 30
    assert_false @fluentd.alive?
    assert_empty @fluentd.group_pids
  end

  test "kill! takes supervisor and workers down at once; start again is a restart" do
    @fluentd = FluentdProcess.new(dir: @dir, config: config).start.wait_until_running(60)
    pids = @fluentd.group_pids
    assert_equal 2, pids.size
    crash = @fluentd.kill!
    assert_equal 9, crash.termsig
    assert_empty @fluentd.group_pids
    assert_true pids.none? { |p| File.exist?("/proc/#{p}") && File.read("/proc/#{p}/stat").split(") ").last.split[0] != "Z" }

    @fluentd.start.wait_until_running(60)
    assert_not_equal pids.first, @fluentd.pid
    @fluentd.forward("test.b", [{ "n" => 3 }])
    @fluentd.wait_until(10, "the record in out.jsonl") { out_records.size == 1 }
    assert_match(/fluentd worker is now running/, @fluentd.wait_for_log(/fluentd worker is now running/, 1)[0])
  end

  test "stop escalates to SIGKILL of the group only after its timeout, and says so" do
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false).start.wait_until_running(60)
    assert_equal [@fluentd.pid], @fluentd.worker_pids
    @fluentd.signal(:STOP)
    stop = nil
    _, err = capture_stderr { stop = @fluentd.stop(timeout: 2) }
    assert_true stop.escalated
    assert_equal [@fluentd.pid], stop.lingering
    assert_equal 9, stop.termsig
    assert_operator stop.seconds, :>=, 2
    assert_match(/still running 2 s after SIGTERM .*sending SIGKILL to its process group #{@fluentd.pgid}/, err)
    assert_empty @fluentd.group_pids
  end

  test "a bad config fails wait_until_running at once, with the log" do
    @fluentd = FluentdProcess.new(dir: @dir, config: "<match **>\n  @type no_such_output_xyz\n</match>\n", supervisor: false).start
    error = assert_raise(FluentdProcess::Error) { @fluentd.wait_until_running(60) }
    assert_match(/exited .* before 'fluentd worker is now running'/, error.message)
    assert_match(/no_such_output_xyz/, error.message)
  end

  def capture_stderr
    old = $stderr
    $stderr = StringIO.new
    result = yield
    [result, $stderr.string]
  ensure
    $stderr = old
  end
end

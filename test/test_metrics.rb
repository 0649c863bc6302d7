# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("CloudWatch metrics tests (real fluentd)")

require "tmpdir"
require "securerandom"
require_relative "support/local_kinesis"
require_relative "support/fault_proxy"
require_relative "support/fluentd_process"
require_relative "support/apache_log"
require_relative "support/moto_server"

# The KPL's CloudWatch metrics, sent by a real fluentd process to a real CloudWatch API
# implementation (moto's server mode) while the fault proxy throttles entries and fails whole
# requests: what CloudWatch ends up holding must equal the plugin's own counters (monitor_agent),
# the fault proxy's and what the stream holds.
class MetricsTest < Test::Unit::TestCase
  LINES = 3000
  SUMMARY = %w[UserRecordsPut KinesisRecordsPut ErrorsByCode AllErrors BufferingTime].freeze

  # Sums CloudWatch statistics with GetMetricData (exact dimension match in moto when dimensions
  # are given; without dimensions moto matches every datum of the name).
  QUERY = <<~PY
    import json, sys, datetime, boto3
    q = json.load(sys.stdin)
    cw = boto3.client("cloudwatch", endpoint_url=q["endpoint"], region_name="ap-northeast-1",
                      aws_access_key_id="AKIDREADER", aws_secret_access_key="reader")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = []
    for i, (name, dims) in enumerate(q["queries"]):
        got = {}
        for stat in ["Sum", "SampleCount", "Minimum", "Maximum"]:
            r = cw.get_metric_data(StartTime=now - datetime.timedelta(minutes=30), EndTime=now + datetime.timedelta(minutes=5),
                MetricDataQueries=[{"Id": "q%d" % i, "MetricStat": {"Metric": {"Namespace": q["namespace"], "MetricName": name,
                    "Dimensions": [{"Name": k, "Value": v} for k, v in dims]}, "Period": 60, "Stat": stat}}])
            values = r["MetricDataResults"][0]["Values"]
            if not values:
                got = None
                break
            got[stat] = {"Sum": sum, "SampleCount": sum, "Minimum": min, "Maximum": max}[stat](values)
        out.append(got)
    listed = [[m["MetricName"], sorted([d["Name"], d["Value"]] for d in m["Dimensions"])]
              for page in cw.get_paginator("list_metrics").paginate(Namespace=q["namespace"]) for m in page["Metrics"]]
    json.dump({"stats": out, "listed": listed}, sys.stdout)
  PY

  setup do
    omit("CloudWatch metrics tests need moto: #{MotoServer.missing}") if MotoServer.missing
    @moto = MotoServer.shared
    @kinesis = LocalKinesis.shared
    @dir = Dir.mktmpdir("metrics")
    @namespace = "KPLTest/#{SecureRandom.hex(4)}"
  end

  teardown do
    @fluentd&.stop(timeout: 30)
    @proxy&.stop
    @private_moto&.stop
    FileUtils.rm_rf(@dir)
  end

  def metrics_lines(level:, granularity:, endpoint: @moto.endpoint, interval: 2)
    ["metrics_level #{level}", "metrics_granularity #{granularity}", "metrics_namespace #{@namespace}",
     "metrics_upload_interval #{interval}", "metrics_endpoint #{endpoint}", "metrics_request_compression false"]
  end

  def run_fluentd(stream, plugin, endpoint:, **options)
    log = File.join(@dir, "access.log")
    File.write(log, "")
    config = FluentdProcess.pipeline_config(dir: @dir, log: log, stream: stream, endpoint: endpoint, plugin: plugin,
                                            buffer: { flush_interval: "1s", chunk_limit_size: "64k" },
                                            monitor_port: FluentdProcess.free_port, **options)
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false).start
    @fluentd.wait_until_running(60)
    ApacheLog.append(log, LINES, flush_every: 500, host: ApacheLog::SPREAD_HOST)
  end

  def wait_for_stream(stream, count)
    @kinesis.wait_for_records(stream, count, timeout: 120) { "fluentd log:\n#{@fluentd.diagnostics}" }
  end

  # Statistic sets for each [name, {dimension => value}], and every metric listed.
  def cloudwatch(queries)
    TestHelper.python_json(QUERY, { "endpoint" => @moto.endpoint, "namespace" => @namespace,
                                    "queries" => queries.map { |name, dims| [name, dims.to_a] } })
  end

  test "detailed, per shard: CloudWatch's sums equal the plugin's counters, the fault proxy's and the stream" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("metrics"), 2)
    @proxy = FaultProxy.new(@kinesis.endpoint)
    @proxy.push(2, "status 500")
    @proxy.sometimes(0.3, "partial_throttle 0.4")
    plugin = ["aggregation_max_size 4096", "batch_request_max_count 10", "retries_on_batch_request 30",
              "reset_backoff_if_success true", *metrics_lines(level: "detailed", granularity: "shard")]
    run_fluentd(stream, plugin, endpoint: @proxy.endpoint)
    got = wait_for_stream(stream, LINES)
    counters = @fluentd.wait_until(30, "an upload") do
      c = @fluentd.monitor_plugin
      c if c["kinesis_cloudwatch_requests"].to_i.positive?
    end
    stop = @fluentd.stop(timeout: 60)
    assert_true stop.success?, @fluentd.diagnostics
    proxy = @proxy.stats
    log = @fluentd.log_text
    assert_not_match(/metrics upload .* failed/, log)
    assert_equal LINES, counters["kinesis_delivered"]
    assert_equal 0, counters["kinesis_failed"]
    assert_operator counters["kinesis_throttled_entries"], :>, 0, "the fault proxy throttled nothing: #{proxy}"
    assert_operator counters["kinesis_request_errors"], :>=, 2

    shards = got["records"].group_by { |r| r["shard"] }
    assert_equal 2, shards.size
    s = { "StreamName" => stream }
    queries = [
      ["UserRecordsReceived", s], ["UserRecordsPut", s], ["UserRecordsDataPut", s], ["KinesisRecordsPut", s],
      ["AllErrors", s], ["RequestTime", s], ["KinesisRecordsPerPutRecordsRequest", s], ["UserRecordsPerPutRecordsRequest", s],
      ["BufferingTime", s], ["RetriesPerRecord", s], ["UserRecordsPending", s],
      ["ErrorsByCode", { "ErrorCode" => "ProvisionedThroughputExceededException", "StreamName" => stream }],
      *shards.keys.sort.flat_map do |id|
        [["UserRecordsPut", s.merge("ShardId" => id)], ["KinesisRecordsPut", s.merge("ShardId" => id)]]
      end,
    ]
    result = cloudwatch(queries)
    stats = queries.zip(result["stats"]).to_h { |(name, dims), v| [[name, dims], v] }
    stat = ->(name, dims = s) { stats.fetch([name, dims]) || flunk("no #{name} #{dims} in CloudWatch: #{result["listed"]}") }

    # Every user record once: received, put (Average 1 = all succeeded), with its bytes.
    assert_equal LINES, stat["UserRecordsReceived"]["Sum"]
    assert_equal({ "Sum" => LINES, "SampleCount" => LINES }, stat["UserRecordsPut"].slice("Sum", "SampleCount"))
    assert_equal got["records"].sum { |r| r["data"].bytesize }, stat["UserRecordsDataPut"]["Sum"]
    # Per shard, what the stream holds on that shard.
    shards.each do |id, records|
      assert_equal records.size, stat["UserRecordsPut", s.merge("ShardId" => id)]["Sum"], id
    end
    # Kinesis records: each success counts 1, each throttled entry 0.
    kinesis_put = stat["KinesisRecordsPut"]
    assert_equal got["kinesis_records"], kinesis_put["Sum"]
    assert_equal counters["kinesis_throttled_entries"], kinesis_put["SampleCount"] - kinesis_put["Sum"]
    assert_equal got["kinesis_records"],
                 shards.keys.sum { |id| stat["KinesisRecordsPut", s.merge("ShardId" => id)]["Sum"] }
    # Errors: every throttled entry by its code, plus each failed request.
    throttles = stat["ErrorsByCode", { "ErrorCode" => "ProvisionedThroughputExceededException", "StreamName" => stream }]
    assert_equal counters["kinesis_throttled_entries"], throttles["Sum"]
    assert_equal counters["kinesis_throttled_entries"] + counters["kinesis_request_errors"], stat["AllErrors"]["Sum"]
    # One RequestTime sample per PutRecords call, failed ones included.
    assert_equal counters["kinesis_requests"], stat["RequestTime"]["SampleCount"]
    assert_equal proxy.dig("requests", "PutRecords"), stat["RequestTime"]["SampleCount"]
    assert_equal counters["kinesis_requests"], stat["KinesisRecordsPerPutRecordsRequest"]["SampleCount"]
    assert_operator stat["KinesisRecordsPerPutRecordsRequest"]["Maximum"], :<=, 10
    # Retries: throttled records were retried, and one sample per record.
    assert_equal LINES, stat["RetriesPerRecord"]["SampleCount"]
    assert_operator stat["RetriesPerRecord"]["Maximum"], :>=, 1
    # Buffering: from the chunk's creation to delivery, a few seconds here.
    buffering = stat["BufferingTime"]
    assert_equal LINES, buffering["SampleCount"]
    assert_operator buffering["Minimum"], :>=, 0
    assert_operator buffering["Maximum"], :<, 60_000
    assert_operator stat["UserRecordsPending"]["SampleCount"], :>=, 1

    # The KPL's tree: every metric also without ShardId and without any dimension.
    listed = result["listed"]
    %w[UserRecordsPut KinesisRecordsPut AllErrors UserRecordsPerKinesisRecord].each do |name|
      assert_include listed, [name, []]
      assert_include listed, [name, [["StreamName", stream]]]
    end
    assert_include listed, ["ErrorsByCode", [["ErrorCode", "ProvisionedThroughputExceededException"]]]
    assert_include listed, ["ErrorsByCode", []]
    assert_empty listed.map(&:first) - %w[UserRecordsReceived UserRecordsPending UserRecordsPut UserRecordsDataPut
                                          KinesisRecordsPut KinesisRecordsDataPut ErrorsByCode AllErrors RetriesPerRecord
                                          BufferingTime RequestTime UserRecordsPerKinesisRecord
                                          KinesisRecordsPerPutRecordsRequest UserRecordsPerPutRecordsRequest]
  end

  test "summary, global: only the summary metrics, without dimensions; the last upload happens at stop" do
    stream = @kinesis.create_stream(@kinesis.unique_stream("metrics"), 1)
    # An interval far beyond the run: everything CloudWatch gets comes with the stop.
    run_fluentd(stream, metrics_lines(level: "summary", granularity: "global", interval: 3600), endpoint: @kinesis.endpoint)
    wait_for_stream(stream, LINES)
    assert_empty cloudwatch([])["listed"], "nothing is uploaded before the interval"
    assert_true @fluentd.stop(timeout: 60).success?, @fluentd.diagnostics
    result = cloudwatch([["UserRecordsPut", {}], ["KinesisRecordsPut", {}], ["AllErrors", {}]])
    assert_equal SUMMARY.sort - ["ErrorsByCode"], result["listed"].map(&:first).sort
    assert result["listed"].all? { |_, dims| dims.empty? }, result["listed"].inspect
    put, kinesis_put, errors = result["stats"]
    assert_equal({ "Sum" => LINES, "SampleCount" => LINES }, put.slice("Sum", "SampleCount"))
    assert_equal kinesis_put["SampleCount"], kinesis_put["Sum"]
    assert_equal 0, errors["Sum"]
  end

  test "AccessDenied from CloudWatch is logged once per upload with what to grant, and delivery goes on" do
    # A moto checking signatures and IAM policies: a user allowed Kinesis only.
    @private_moto = MotoServer.new
    keys = TestHelper.python_json(<<~PY, { "endpoint" => @private_moto.endpoint })
      import json, sys, boto3
      q = json.load(sys.stdin)
      iam = boto3.client("iam", endpoint_url=q["endpoint"], region_name="us-east-1",
                         aws_access_key_id="AKIDADMIN", aws_secret_access_key="admin")
      iam.create_user(UserName="shipper")
      iam.put_user_policy(UserName="shipper", PolicyName="kinesis-only", PolicyDocument=json.dumps(
          {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kinesis:*", "Resource": "*"}]}))
      k = iam.create_access_key(UserName="shipper")["AccessKey"]
      json.dump({"id": k["AccessKeyId"], "secret": k["SecretAccessKey"]}, sys.stdout)
    PY
    @private_moto.reset_auth(0)
    stream = @kinesis.create_stream(@kinesis.unique_stream("metrics"), 1)
    run_fluentd(stream, metrics_lines(level: "summary", granularity: "shard", endpoint: @private_moto.endpoint, interval: 1),
                endpoint: @kinesis.endpoint, aws_key_id: keys["id"], aws_sec_key: keys["secret"])
    got = wait_for_stream(stream, LINES)
    assert_equal LINES, got["records"].size
    @fluentd.wait_for_log(/CloudWatch metrics upload .* failed/, 30)
    counters = @fluentd.monitor_plugin
    assert_true @fluentd.stop(timeout: 60).success?, @fluentd.diagnostics
    warnings = @fluentd.log_text.lines.grep(/CloudWatch metrics upload/)
    assert_match(/AccessDenied.*Grant cloudwatch:PutMetricData/, warnings.first)
    assert_not_include warnings.join, keys["secret"]
    # One line per failed upload, not per request or per metric.
    assert_operator warnings.size, :<=, counters["kinesis_cloudwatch_failed_requests"] + 1
    assert_equal 0, counters["kinesis_cloudwatch_requests"]
    assert_operator counters["kinesis_cloudwatch_data_dropped"], :>, 0
    assert_equal LINES, counters["kinesis_delivered"]
  end
end

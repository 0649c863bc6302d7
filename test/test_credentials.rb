# frozen_string_literal: true

require_relative "helper"
return unless TestHelper.fluentd!("credentials tests (real fluentd)")

require "tmpdir"
require "uri"
require_relative "support/local_kinesis"
require_relative "support/fault_proxy"
require_relative "support/fluentd_process"
require_relative "support/apache_log"
require_relative "support/moto_server"

# Every way the plugin gets credentials, end to end: a real fluentd at trace level (-vv) tails a
# log into kinesis_streams_aggregated, whose calls reach kinesalite through the fault proxy, which
# records the access key id of each call's SigV4 signature. STS, IAM and the instance metadata
# service are moto's. Each test checks that every Kinesis call was signed by the key the
# mechanism yields (and no other), that every line arrived byte for byte, and that no secret
# reached fluentd's log or stderr.
class CredentialsTest < Test::Unit::TestCase
  LINES = 200
  REGION = "us-east-1"
  ACCOUNT = "123456789012"
  # What moto's instance metadata service hands out, always.
  IMDS_KEY = "test-key"
  IMDS_SECRETS = %w[test-secret-key test-session-token].freeze
  IMDS_TOKEN = "fake-imdsv2-token"
  # Credentials and settings of the environment the tests run in, none of which the fluentd
  # processes here may see (each test sets what it needs).
  AMBIENT = %w[AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_SECURITY_TOKEN AWS_PROFILE
               AWS_DEFAULT_PROFILE AWS_ROLE_ARN AWS_ROLE_SESSION_NAME AWS_WEB_IDENTITY_TOKEN_FILE
               AWS_CONTAINER_CREDENTIALS_RELATIVE_URI AWS_CONTAINER_CREDENTIALS_FULL_URI
               AWS_CONTAINER_AUTHORIZATION_TOKEN AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
               AWS_EC2_METADATA_SERVICE_ENDPOINT AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE AWS_ENDPOINT_URL
               AWS_ENDPOINT_URL_STS AWS_ENDPOINT_URL_KINESIS AWS_IGNORE_CONFIGURED_ENDPOINT_URLS AWS_REGION
               AWS_DEFAULT_REGION].freeze
  # CloudWatch metrics on, so PutMetricData is signed by the same credentials (at least the
  # upload at stop).
  METRICS = lambda do |endpoint|
    ["metrics_level summary", "metrics_upload_interval 1", "metrics_endpoint #{endpoint}",
     "metrics_request_compression false"]
  end
  # A credential_process program: prints Version 1 credentials with a new key each call (calls
  # counted in the file ARGV[0]); with ARGV[1], they expire that many seconds from now.
  PROCESS_SCRIPT = <<~'RUBY'
    require "json"
    require "time"
    n = File.exist?(ARGV[0]) ? File.read(ARGV[0]).to_i + 1 : 1
    File.write(ARGV[0], n.to_s)
    out = { "Version" => 1, "AccessKeyId" => format("AKIDPROC%04d", n),
            "SecretAccessKey" => "procSecret#{n}Xq7", "SessionToken" => "procToken#{n}Zr9" }
    out["Expiration"] = (Time.now.utc + Integer(ARGV[1])).iso8601 if ARGV[1]
    puts JSON.generate(out)
  RUBY

  # A <process_credentials> section running PROCESS_SCRIPT, which counts its runs in `counter`.
  def process_credentials(counter, expires_in: nil)
    script = File.join(@dir, "credential_process.rb")
    File.write(script, PROCESS_SCRIPT)
    section("process_credentials", ["process #{[RbConfig.ruby, "--disable-gems", script, counter, expires_in].compact.join(" ")}"])
  end

  setup do
    omit("credentials tests need moto: #{MotoServer.missing}") if MotoServer.missing
    @kinesis = LocalKinesis.shared
    @moto = MotoServer.shared.reset
    @proxy = FaultProxy.new(@kinesis.endpoint)
    # CloudWatch (moto) behind a proxy of its own, which records the key of each PutMetricData.
    @metrics_proxy = FaultProxy.new(@moto.endpoint)
    @dir = Dir.mktmpdir("fluentd-credentials")
    @stream = @kinesis.create_stream(@kinesis.unique_stream("credentials"), 1)
    @input = File.join(@dir, "input.log")
    File.write(@input, "")
    @written = 0
  end

  teardown do
    @fluentd&.stop(timeout: 30)
    @proxy&.stop
    @metrics_proxy&.stop
    @moto&.reset_auth(nil) if @auth_checks
    FileUtils.rm_rf(@dir) if @dir
  end

  # ---- the pipeline -----------------------------------------------------------------------

  # in_tail of the input (each line as it is) -> the plugin (single_value: the line and its
  # newline, byte for byte) -> the proxy -> kinesalite. `plugin`: the plugin's credential
  # settings (lines); static keys only when given.
  def start_fluentd(plugin, env: {}, aws_key_id: nil, aws_sec_key: nil)
    source = <<~CONF
      <source>
        @type tail
        path #{@input}
        pos_file #{@input}.pos
        tag credentials
        read_from_head true
        <parse>
          @type none
        </parse>
      </source>
    CONF
    config = FluentdProcess.pipeline_config(
      dir: @dir, stream: @stream, endpoint: @proxy.endpoint, region: REGION, tag: "credentials", tail: false,
      aws_key_id: aws_key_id, aws_sec_key: aws_sec_key, monitor_port: FluentdProcess.free_port,
      plugin: ["<format>\n  @type single_value\n</format>", *METRICS.call(@metrics_proxy.endpoint), plugin], extra: source
    )
    @fluentd = FluentdProcess.new(dir: @dir, config: config, supervisor: false, args: ["-vv"],
                                  env: clean_env.merge(env)).start
    @fluentd.wait_until_running(60)
  end

  # No credentials, profiles, roles or endpoints from the environment the tests run in; empty
  # shared files instead of ~/.aws; no instance metadata service unless a test says where.
  def clean_env
    empty = File.join(@dir, "empty")
    File.write(empty, "")
    AMBIENT.to_h { |name| [name, nil] }.merge(
      "AWS_SHARED_CREDENTIALS_FILE" => empty, "AWS_CONFIG_FILE" => empty, "AWS_EC2_METADATA_DISABLED" => "true"
    )
  end

  def write_lines(count)
    ApacheLog.append(@input, @written...(@written + count), flush_every: 50)
    @written += count
  end

  def expected_data
    Array.new(@written) { |i| "#{ApacheLog.line(i)}\n" }
  end

  # Waits until the plugin reports every line written delivered, then stops fluentd.
  def deliver_and_stop(timeout: 60)
    @fluentd.wait_until(timeout, "#{@written} lines delivered", interval: 0.5) do
      @fluentd.monitor_plugin["kinesis_delivered"] == @written
    end
    stop = @fluentd.stop(timeout: 30)
    assert stop.success?, "fluentd did not stop cleanly: #{stop.inspect}\n#{@fluentd.diagnostics}"
  end

  # Runs the pipeline with `plugin` settings over LINES lines and stops it.
  def run_pipeline(plugin, **options)
    start_fluentd(plugin, **options)
    write_lines(LINES)
    deliver_and_stop
  end

  def section(name, lines)
    "<#{name}>\n#{lines.map { |l| "  #{l}\n" }.join}</#{name}>"
  end

  # ---- what is checked --------------------------------------------------------------------

  # {access key id => {operation => calls}} of every call the plugin made to Kinesis.
  def kinesis_signers
    @proxy.stats["access_keys"]
  end

  # The same for CloudWatch (every call there is a PutMetricData).
  def cloudwatch_signers
    @metrics_proxy.stats["access_keys"]
  end

  def assert_signed_only_by(key)
    signers = kinesis_signers
    assert_equal [key], signers.keys, "every Kinesis call must be signed by #{key}: #{signers}"
    assert_operator signers[key]["PutRecords"].to_i, :>=, 1, signers.inspect
    metrics = cloudwatch_signers
    assert_equal [key], metrics.keys, "every PutMetricData must be signed by #{key}: #{metrics}"
    assert_not_match(/CloudWatch metrics upload .* failed/, @fluentd.log_text)
  end

  def assert_every_line_arrived
    got = @kinesis.read(@stream)["records"].map { |r| r["data"].force_encoding(Encoding::UTF_8) }
    expected = expected_data
    assert_equal expected.size, got.size, "records in the stream"
    assert_equal expected.sort, got.sort, "every line, byte for byte"
  end

  # None of `secrets` in fluentd's log (trace level) or stderr.
  def assert_no_secrets(secrets)
    log = @fluentd.log_text
    assert_match(/\[trace\]/, log, "fluentd ran at trace level")
    stderr = File.exist?(@fluentd.log + ".stderr") ? File.read(@fluentd.log + ".stderr") : ""
    secrets.each do |secret|
      { "log" => log, "stderr" => stderr }.each do |where, text|
        line = text.lines.find { |l| l.include?(secret) }
        assert_nil line, "a secret (#{secret[0, 4]}...) in fluentd's #{where}: #{line}"
      end
    end
  end

  # The session moto's STS issued for `access_key_id` ({"arn", "secret_access_key",
  # "session_token", ...}), nil for a key it never issued.
  def issued_session(access_key_id)
    @moto.data.dig("sts", "AssumedRole").to_a.find { |r| r["access_key_id"] == access_key_id }
  end

  def header(request, name)
    request["headers"].find { |k, _| k.casecmp?(name) }&.last
  end

  # The STS query-protocol calls among moto's recorded requests, as {param => value}.
  def sts_calls(requests, action)
    requests.filter_map do |r|
      next unless r["method"] == "POST" && r["body"].include?("Action=#{action}")

      URI.decode_www_form(r["body"]).to_h
    end
  end

  # The instance metadata calls among moto's recorded requests: the token first (PUT, with a TTL),
  # then the credentials (GET, with that token).
  def assert_imdsv2(requests)
    imds = requests.select { |r| URI(r["url"]).path.start_with?("/latest/") }
    assert_not_empty imds, "instance metadata calls"
    assert_equal ["PUT", "/latest/api/token"], [imds.first["method"], URI(imds.first["url"]).path], imds.inspect
    assert_not_nil header(imds.first, "X-aws-ec2-metadata-token-ttl-seconds")
    gets = imds.select { |r| r["method"] == "GET" }
    assert_include gets.map { |r| URI(r["url"]).path }, "/latest/meta-data/iam/security-credentials/default-role"
    gets.each { |r| assert_equal IMDS_TOKEN, header(r, "X-aws-ec2-metadata-token"), r["url"] }
  end

  # A port nothing listens on.
  def dead_endpoint
    "http://127.0.0.1:#{FluentdProcess.free_port}"
  end

  # ---- the mechanisms ---------------------------------------------------------------------

  test "instance profile through the default chain: IMDSv2 at AWS_EC2_METADATA_SERVICE_ENDPOINT" do
    requests = @moto.record do
      run_pipeline(nil, env: { "AWS_EC2_METADATA_DISABLED" => nil, "AWS_EC2_METADATA_SERVICE_ENDPOINT" => @moto.endpoint })
    end
    assert_signed_only_by IMDS_KEY
    assert_imdsv2(requests)
    assert_every_line_arrived
    assert_no_secrets(IMDS_SECRETS)
  end

  test "<instance_profile_credentials> ip_address and port win over AWS_EC2_METADATA_SERVICE_ENDPOINT" do
    credentials = section("instance_profile_credentials",
                          ["ip_address 127.0.0.1", "port #{@moto.port}", "retries 2", "http_open_timeout 2",
                           "http_read_timeout 2"])
    requests = @moto.record do
      run_pipeline(credentials, env: { "AWS_EC2_METADATA_DISABLED" => nil, "AWS_EC2_METADATA_SERVICE_ENDPOINT" => dead_endpoint })
    end
    assert_signed_only_by IMDS_KEY
    assert_imdsv2(requests)
    assert_every_line_arrived
    assert_no_secrets(IMDS_SECRETS)
  end

  test "ECS container credentials through the default chain (AWS_CONTAINER_CREDENTIALS_FULL_URI)" do
    # moto's metadata path answers with the JSON shape the ECS endpoint uses.
    token = "ecsAuthToken5Ty8"
    requests = @moto.record do
      run_pipeline(nil, env: {
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI" => "#{@moto.endpoint}/latest/meta-data/iam/security-credentials/default-role",
                     "AWS_CONTAINER_AUTHORIZATION_TOKEN" => token
                   })
    end
    assert_signed_only_by IMDS_KEY
    ecs = requests.select { |r| URI(r["url"]).path.start_with?("/latest/") }
    assert_equal [["GET", token]], ecs.map { |r| [r["method"], header(r, "Authorization")] }.uniq
    assert_every_line_arrived
    assert_no_secrets(IMDS_SECRETS + [token])
  end

  test "<assume_role_credentials> on static keys, STS at sts_endpoint_url, signatures checked by moto" do
    # Five unchecked actions set up a user, its key and a role; from then on moto checks the SigV4
    # signature (and IAM policy) of every action, so AssumeRole succeeds only when signed with
    # that user's secret.
    @auth_checks = true
    @moto.reset_auth(5)
    iam = TestHelper.python_json(<<~PY, { "endpoint" => @moto.endpoint })
      import json, sys, boto3, botocore
      a = json.load(sys.stdin)
      def client(service, key, secret):
          return boto3.client(service, endpoint_url=a["endpoint"], region_name="#{REGION}",
                              aws_access_key_id=key, aws_secret_access_key=secret)
      iam = client("iam", "AKIDBOOTSTRAP", "bootstrap")
      iam.create_user(UserName="fluentd")
      key = iam.create_access_key(UserName="fluentd")["AccessKey"]
      allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}
      iam.put_user_policy(UserName="fluentd", PolicyName="assume", PolicyDocument=json.dumps(allow))
      trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
               "Principal": {"AWS": "arn:aws:iam::#{ACCOUNT}:user/fluentd"}}]}
      role = iam.create_role(RoleName="fluentd-kinesis", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
      # moto names CloudWatch's IAM actions monitoring:*, AWS cloudwatch:*.
      metrics = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*",
                 "Action": ["cloudwatch:PutMetricData", "monitoring:PutMetricData"]}]}
      iam.put_role_policy(RoleName="fluentd-kinesis", PolicyName="metrics", PolicyDocument=json.dumps(metrics))
      try:
          client("sts", key["AccessKeyId"], "wrong-secret").assume_role(RoleArn=role, RoleSessionName="probe")
          wrong = "accepted"
      except botocore.exceptions.ClientError as e:
          wrong = e.response["Error"]["Code"]
      print(json.dumps({"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "role": role, "wrong": wrong}))
    PY
    assert_equal "SignatureDoesNotMatch", iam["wrong"], "moto checks signatures"
    credentials = section("assume_role_credentials",
                          ["role_arn #{iam["role"]}", "role_session_name fluentd-session", "duration_seconds 900",
                           "sts_endpoint_url #{@moto.endpoint}", "sts_region #{REGION}"])
    requests = @moto.record do
      # sts_endpoint_url wins over the environment's STS endpoint.
      run_pipeline(credentials, aws_key_id: iam["key"], aws_sec_key: iam["secret"],
                                env: { "AWS_ENDPOINT_URL_STS" => dead_endpoint })
    end

    assume = requests.select { |r| r["body"].match?(/(?:\A|&)Action=AssumeRole(?:&|\z)/) }
    assert_equal 1, assume.size, "one AssumeRole call"
    assert_match(%r{\AAWS4-HMAC-SHA256 Credential=#{iam["key"]}/}, header(assume[0], "Authorization"))
    assumed = kinesis_signers.keys.first
    assert_signed_only_by assumed
    session = issued_session(assumed)
    assert_not_nil session, "#{assumed} was issued by moto's STS"
    assert_equal "arn:aws:sts::#{ACCOUNT}:assumed-role/fluentd-kinesis/fluentd-session", session["arn"]
    assert_every_line_arrived
    assert_no_secrets([iam["secret"], iam["key"], *session.values_at("secret_access_key", "session_token")])
  end

  test "<web_identity_credentials>: the token file's token, STS at AWS_ENDPOINT_URL_STS" do
    token = "eyJhbGciOiJSUzI1NiJ9.webIdentity3Nb6.c2ln"
    token_file = File.join(@dir, "web-identity-token")
    File.write(token_file, token)
    role = "arn:aws:iam::#{ACCOUNT}:role/fluentd-web-identity"
    credentials = section("web_identity_credentials",
                          ["role_arn #{role}", "role_session_name fluentd-wi", "web_identity_token_file #{token_file}"])
    requests = @moto.record do
      run_pipeline(credentials, env: { "AWS_ENDPOINT_URL_STS" => @moto.endpoint })
    end

    calls = sts_calls(requests, "AssumeRoleWithWebIdentity")
    assert_equal 1, calls.size, "one AssumeRoleWithWebIdentity call"
    assert_equal [role, "fluentd-wi", token], calls[0].values_at("RoleArn", "RoleSessionName", "WebIdentityToken")
    assumed = kinesis_signers.keys.first
    assert_signed_only_by assumed
    session = issued_session(assumed)
    assert_not_nil session, "#{assumed} was issued by moto's STS"
    assert_equal "arn:aws:sts::#{ACCOUNT}:assumed-role/fluentd-web-identity/fluentd-wi", session["arn"]
    assert_every_line_arrived
    assert_no_secrets([token, *session.values_at("secret_access_key", "session_token")])
  end

  test "<process_credentials>: the program's key, the program run once" do
    counter = File.join(@dir, "process-calls")
    run_pipeline(process_credentials(counter))
    assert_signed_only_by "AKIDPROC0001"
    assert_equal "1", File.read(counter)
    assert_every_line_arrived
    assert_no_secrets(%w[procSecret1Xq7 procToken1Zr9])
  end

  test "<shared_credentials>: profile_name of the file at path, over AWS_PROFILE and AWS_SHARED_CREDENTIALS_FILE" do
    file = File.join(@dir, "credentials")
    File.write(file, <<~INI)
      [default]
      aws_access_key_id = AKIDSHAREDDEFAULT
      aws_secret_access_key = sharedDefaultSecret4Kp

      [fluentd]
      aws_access_key_id = AKIDSHAREDFLUENTD
      aws_secret_access_key = sharedFluentdSecret8Wm
      aws_session_token = sharedFluentdToken2Hv
    INI
    run_pipeline(section("shared_credentials", ["path #{file}", "profile_name fluentd"]),
                 env: { "AWS_PROFILE" => "default" })
    assert_signed_only_by "AKIDSHAREDFLUENTD"
    assert_every_line_arrived
    assert_no_secrets(%w[sharedFluentdSecret8Wm sharedFluentdToken2Hv sharedDefaultSecret4Kp])
  end

  # Error messages carry each cause's Display form only: the SDK's Debug forms (which
  # DisplayErrorContext appends) hold raw HTTP answers, such as the IMDSv2 session token of a
  # token answer the SDK refused.
  test "a credentials failure logs no secret: the IMDSv2 token of a refused token answer" do
    imds = MotoServer.new(imds_token_ttl: false)
    start_fluentd("shutdown_timeout 2",
                  env: { "AWS_EC2_METADATA_DISABLED" => nil, "AWS_EC2_METADATA_SERVICE_ENDPOINT" => imds.endpoint })
    @fluentd.wait_for_log(/cannot use its stream yet.*did not contain a TTL header/, 30)
    assert @fluentd.stop(timeout: 30).success?
    assert_empty kinesis_signers, "no call without credentials"
    assert_no_secrets([IMDS_TOKEN])
  ensure
    imds&.stop
  end

  # The SDK's identity cache (aws-smithy-runtime's lazy cache) treats credentials as expired 10 s
  # before their Expiration, plus a random 0-5 s: a key that lives 20 s is replaced 10-15 s after
  # it was fetched, at the first call after that, and is never used after it expires. 30 s of
  # steady input thus sees two keys at least (usually three), and the program runs once per key,
  # not once per call.
  test "process credentials that expire every 20 s are refreshed during a 30 s run, nothing lost" do
    counter = File.join(@dir, "process-calls")
    start_fluentd(process_credentials(counter, expires_in: 20))
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    while Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0 < 30
      write_lines(10)
      sleep 0.25
    end
    deliver_and_stop

    calls = File.read(counter).to_i
    issued = (1..calls).map { |n| format("AKIDPROC%04d", n) }
    put_signers = kinesis_signers.select { |_, ops| ops["PutRecords"].to_i.positive? }.keys
    assert_operator put_signers.size, :>=, 2, "PutRecords signed by successive keys: #{kinesis_signers}"
    assert_empty kinesis_signers.keys - issued, "only keys the program issued"
    assert_not_empty cloudwatch_signers, "PutMetricData calls"
    assert_empty cloudwatch_signers.keys - issued, "PutMetricData signed by keys the program issued: #{cloudwatch_signers}"
    assert_operator calls, :<=, 6, "the program runs when the key is about to expire, not per call"
    assert_every_line_arrived
    assert_no_secrets(issued.each_index.flat_map { |i| ["procSecret#{i + 1}Xq7", "procToken#{i + 1}Zr9"] })
  end
end

# frozen_string_literal: true

require_relative "helper"
require "tmpdir"
require_relative "../script/packaging"

# The checks script/package and script/install-check apply to every extension they ship: they
# must reject what would not load on Amazon Linux 2. The end-to-end build and install run in
# script/test (script/package + script/install-check).
class TestPackaging < Test::Unit::TestCase
  DEV_BUILD = File.expand_path("../lib/fluent_plugin_kinesis_rs/kinesis_rs.so", __dir__)

  test "an extension built against this machine's glibc is refused: its symbols need more than 2.17" do
    omit("no development build at #{DEV_BUILD} (rake compile)") unless File.exist?(DEV_BUILD)
    facts = Packaging.extension_facts(DEV_BUILD)
    assert_operator Gem::Version.new(facts.max_glibc), :>, Gem::Version.new(Packaging::GLIBC_FLOOR)
    assert_include facts.needed, "libc.so.6"
    error = assert_raise(RuntimeError) { Packaging.verify_extension!(DEV_BUILD, Packaging.host_arch) }
    assert_match(/needs GLIBC_#{Regexp.escape(facts.max_glibc)}, above 2\.17/, error.message)
    other = Packaging::ARCHES.values.find { |a| a != Packaging.host_arch }
    error = assert_raise(RuntimeError) { Packaging.verify_extension!(DEV_BUILD, other) }
    assert_match(/is built for .*, not #{other.name}/, error.message)
  end

  test "only glibc's libraries, libgcc_s and libm may be linked" do
    allowed = %w[libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libgcc_s.so.1
                 ld-linux-x86-64.so.2 ld-linux-aarch64.so.1]
    refused = %w[libruby.so.3.1 libruby-2.7.so.2.7 libssl.so.3 libcrypto.so.1.1 libstdc++.so.6 libz.so.1]
    allowed.each { |lib| assert_match(Packaging::ALLOWED_NEEDED, lib) }
    refused.each { |lib| assert_not_match(Packaging::ALLOWED_NEEDED, lib) }
  end

  test "a target Ruby's rbconfig.rb loads into another Ruby once its version check is removed" do
    Dir.mktmpdir("rbconfig") do |dir|
      path = File.join(dir, "usr/lib/x86_64-linux-gnu/ruby/2.7.0/rbconfig.rb")
      FileUtils.mkdir_p(File.dirname(path))
      File.write(path, <<~RB)
        module RbConfig
          RUBY_VERSION.start_with?("2.7.") or
            raise "ruby lib version (2.7.4) doesn't match executable version (\#{RUBY_VERSION})"
          TOPDIR = File.dirname(__FILE__).chomp!("/lib/x86_64-linux-gnu/ruby/2.7.0")
          CONFIG = { "rubyhdrdir" => "\#{TOPDIR}/include/ruby-2.7.0" }
        end
      RB
      Packaging.unpin_rbconfig(path)
      Packaging.unpin_rbconfig(path) # idempotent
      out = IO.popen([RbConfig.ruby, "--disable-gems", "-I", File.dirname(path), "-rrbconfig", "-e",
                      "print RbConfig::CONFIG['rubyhdrdir']"], &:read)
      assert_true $?.success?
      assert_equal File.join(dir, "usr/include/ruby-2.7.0"), out
    end
  end
end

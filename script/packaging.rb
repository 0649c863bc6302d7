# frozen_string_literal: true

# What script/package and script/install-check share: the Ruby minors and architectures the
# platform gems cover, where their headers and interpreters come from, Debian chroots, and the
# checks every built extension must pass (glibc symbol floor, libraries it links, size).
#
# Nothing here is fetched from outside the package registries: Ruby headers, interpreters and
# chroots are Debian packages (a private apt configuration, never the machine's own), and
# Ruby 3.2, which no Debian suite has, is built from the release source in ../shared/ruby.

require "fileutils"
require "open3"
require "rbconfig"
require "shellwords"

module Packaging
  ROOT = File.expand_path("..", __dir__)
  CACHE = ENV.fetch("PACKAGE_CACHE", "/var/cache/fluent-plugin-kinesis-rs/package")
  GLIBC_FLOOR = "2.17"
  # Each extension stripped, and each platform gem.
  EXTENSION_BUDGET = 10_000_000
  GEM_BUDGET = 40_000_000

  # elf_machine: how readelf names the machine.
  Arch = Struct.new(:name, :deb, :triple, :gem_platform, :multiarch, :elf_machine, keyword_init: true)
  ARCHES = {
    "x86_64" => Arch.new(name: "x86_64", deb: "amd64", triple: "x86_64-unknown-linux-gnu",
                         gem_platform: "x86_64-linux", multiarch: "x86_64-linux-gnu", elf_machine: "X86-64"),
    "aarch64" => Arch.new(name: "aarch64", deb: "arm64", triple: "aarch64-unknown-linux-gnu",
                          gem_platform: "aarch64-linux", multiarch: "aarch64-linux-gnu", elf_machine: "AArch64")
  }.freeze

  # suite: the Debian suite whose ruby<minor>-dev/libruby<minor> give headers and rbconfig,
  # and whose chroot runs that Ruby for the install check. Ruby 3.2 is in no suite.
  # versioned: not the suite's default Ruby, so only package ruby<minor> and the commands
  # ruby<minor>/gem<minor> have it (and no Debian package of fluentd's C extensions).
  RubyMinor = Struct.new(:minor, :suite, :extra_suites, :versioned, keyword_init: true) do
    def debian? = !suite.nil?
  end
  RUBIES = {
    "2.7" => RubyMinor.new(minor: "2.7", suite: "bullseye"),  # td-agent 4
    "3.1" => RubyMinor.new(minor: "3.1", suite: "bookworm"),
    "3.2" => RubyMinor.new(minor: "3.2", suite: nil),         # fluent-package 5
    "3.3" => RubyMinor.new(minor: "3.3", suite: "trixie"),
    # ruby3.4 is only in experimental, which holds just what differs from sid.
    "3.4" => RubyMinor.new(minor: "3.4", suite: "experimental", extra_suites: ["sid"], versioned: true)
  }.freeze

  RUBY32_SOURCE = ENV.fetch("RUBY32_SOURCE", File.expand_path("../shared/ruby/ruby-3.2.2.tar.gz", ROOT))
  DEBIAN_MIRROR = ENV.fetch("DEBIAN_MIRROR", "http://deb.debian.org/debian")
  KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

  module_function

  def say(msg)
    $stdout.puts("package: #{msg}")
    $stdout.flush
  end

  def run!(*cmd, env: {}, chdir: nil, quiet: false)
    opts = {}
    opts[:chdir] = chdir if chdir
    say("$ #{cmd.shelljoin}") unless quiet
    ok = if quiet
           out, status = Open3.capture2e(env, *cmd, **opts)
           warn(out) unless status.success?
           status.success?
         else
           system(env, *cmd, **opts)
         end
    raise "command failed: #{cmd.shelljoin}" unless ok
  end

  def capture!(*cmd, env: {})
    out, err, status = Open3.capture3(env, *cmd)
    raise "command failed: #{cmd.shelljoin}\n#{err}" unless status.success?
    out
  end

  def need_root!(why)
    return if Process.uid.zero?

    abort "package: must run as root to #{why}"
  end

  # --- A private apt: its own sources, lists and cache under CACHE/apt; the machine's apt
  # configuration and package state are never touched.
  module Apt
    module_function

    def dir = File.join(CACHE, "apt")

    def options
      %W[
        -o Dir::Etc::SourceList=#{dir}/sources.list -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
        -o Dir::State::Lists=#{dir}/lists -o Dir::State::status=/dev/null
        -o Dir::Cache=#{dir} -o Dir::Cache::archives=#{dir}/archives
        -o APT::Architectures::=amd64 -o APT::Architectures::=arm64
        -o APT::Sandbox::User=root -o Debug::NoLocking=1 -o Acquire::Check-Valid-Until=false -q
      ]
    end

    def update
      sources = %w[bullseye bookworm trixie sid experimental].map do |suite|
        "deb [signed-by=#{KEYRING}] #{DEBIAN_MIRROR} #{suite} main\n"
      end.join
      FileUtils.mkdir_p(["#{dir}/lists/partial", "#{dir}/archives/partial", "#{dir}/debs"])
      list = File.join(dir, "sources.list")
      fresh = File.exist?(list) && File.read(list) == sources &&
              Dir["#{dir}/lists/*Packages*"].any? &&
              Time.now - File.mtime("#{dir}/lists") < 24 * 3600
      return if fresh

      File.write(list, sources)
      Packaging.run!("apt-get", *options, "update", quiet: true)
      FileUtils.touch("#{dir}/lists")
    end

    # Downloads name:arch from suite (once) and returns the .deb's path.
    def download(name, arch, suite)
      update
      debs = File.join(dir, "debs", suite)
      FileUtils.mkdir_p(debs)
      found = Dir[File.join(debs, "#{name}_*_#{arch}.deb")] + Dir[File.join(debs, "#{name}_*_all.deb")]
      return found.first unless found.empty?

      Packaging.run!("apt-get", *options, "download", "#{name}:#{arch}/#{suite}", chdir: debs, quiet: true)
      found = Dir[File.join(debs, "#{name}_*_{#{arch},all}.deb")]
      raise "apt-get download #{name}:#{arch}/#{suite} left no .deb in #{debs}" if found.empty?

      found.first
    end
  end

  # --- Ruby headers and rbconfig for one minor and architecture, as the extension build needs
  # them. Returns the directory holding that Ruby's rbconfig.rb, patched to load into any Ruby.
  def ruby_headers(minor, arch)
    ruby = RUBIES.fetch(minor)
    dir = File.join(CACHE, "rubies", "#{minor}-#{arch.name}")
    if ruby.debian?
      find = -> { Dir[File.join(dir, "usr/lib/#{arch.multiarch}/ruby/#{minor}.0/rbconfig.rb")].first }
      unless (rbconfig = find.call)
        FileUtils.mkdir_p(dir)
        %W[ruby#{minor}-dev libruby#{minor}].each do |pkg|
          run!("dpkg-deb", "-x", Apt.download(pkg, arch.deb, ruby.suite), dir, quiet: true)
        end
        rbconfig = find.call or raise "libruby#{minor} (#{arch.deb}) has no rbconfig.rb under #{dir}"
      end
    else
      rbconfig = ruby32(arch)
    end
    unpin_rbconfig(rbconfig)
    File.dirname(rbconfig)
  end

  # rbconfig.rb refuses to load into another Ruby version; the build only reads its values.
  # TOPDIR is computed from the file's own location, so paths point into the extracted tree.
  def unpin_rbconfig(path)
    text = File.read(path)
    unpinned = text.sub(/^\s*raise "ruby lib version .*$/, "  nil # version check removed for cross builds")
    File.write(path, unpinned) unless unpinned == text
  end

  # A `ruby` for rb-sys-build: the running host Ruby, but `-rrbconfig` loads the target's.
  def ruby_wrapper(minor, arch, rbconfig_dir)
    dir = File.join(CACHE, "wrappers", "#{minor}-#{arch.name}")
    FileUtils.mkdir_p(dir)
    path = File.join(dir, "ruby")
    script = "#!/bin/sh\nexec ruby -I #{rbconfig_dir.shellescape} \"$@\"\n"
    unless File.exist?(path) && File.read(path) == script
      File.write(path, script)
      File.chmod(0o755, path)
    end
    path
  end

  # Ruby 3.2 from the release source (no Debian suite has it). x86_64 is a full install, used
  # for headers and as the install check's interpreter; aarch64 is configured for a cross build
  # and installs only headers and rbconfig.rb.
  def ruby32(arch)
    prefix = File.join(CACHE, "rubies", "3.2-#{arch.name}")
    find = -> { Dir[File.join(prefix, "lib/ruby/3.2.0/*/rbconfig.rb")].first }
    rbconfig = find.call
    return rbconfig if rbconfig

    src = unpack_ruby32("ruby-3.2-#{arch.name}")
    common = %W[--prefix=#{prefix} --disable-install-doc --enable-shared --with-baseruby=#{RbConfig.ruby}]
    if arch == host_arch
      run!("./configure", *common, chdir: src, quiet: true)
      make_install_ruby32(src)
    else
      run!("./configure", *common, "--host=#{arch.multiarch}", "--disable-jit-support",
           *zig_cross_tools(arch, GLIBC_FLOOR), chdir: src, quiet: true)
      run!("make", "rbconfig.rb", chdir: src, quiet: true)
      # Laid out as `make install` would: the source's include/ plus the configured config.h,
      # and rbconfig.rb where its TOPDIR computation expects it.
      hdr = File.join(prefix, "include/ruby-3.2.0")
      FileUtils.mkdir_p(File.join(hdr, "#{arch.name}-linux/ruby"))
      FileUtils.cp_r(Dir[File.join(src, "include/*")], hdr)
      FileUtils.cp(File.join(src, ".ext/include/#{arch.name}-linux/ruby/config.h"), File.join(hdr, "#{arch.name}-linux/ruby"))
      libdir = File.join(prefix, "lib/ruby/3.2.0", "#{arch.name}-linux")
      FileUtils.mkdir_p(libdir)
      FileUtils.cp(File.join(src, "rbconfig.rb"), libdir)
    end
    find.call or raise "the Ruby 3.2 build left no rbconfig.rb under #{prefix}"
  end

  # The Ruby 3.2 release source, freshly unpacked under CACHE/src/name, with configure made.
  def unpack_ruby32(name)
    File.file?(RUBY32_SOURCE) or
      raise "Ruby 3.2 source not found at #{RUBY32_SOURCE} (set RUBY32_SOURCE to the ruby-3.2.2 release tarball)"
    src = File.join(CACHE, "src", name)
    FileUtils.rm_rf(src)
    FileUtils.mkdir_p(src)
    run!("tar", "-xzf", RUBY32_SOURCE, "-C", src, "--strip-components=1", quiet: true)
    run!("./autogen.sh", chdir: src, quiet: true) unless File.exist?(File.join(src, "configure"))
    src
  end

  def make_install_ruby32(src)
    run!("make", "-j#{jobs}", chdir: src, quiet: true)
    # A plain `make install` tries to download the bundled gems.
    run!("make", "install-nodoc", "HAVE_BASERUBY=no", chdir: src, quiet: true)
  end

  # configure's compiler variables for a cross build with zig, against glibc version glibc.
  def zig_cross_tools(arch, glibc)
    zig = File.join(zig_dir, "zig")
    target = "-target #{arch.name}-linux-gnu.#{glibc}"
    ["CC=#{zig} cc #{target}", "CXX=#{zig} c++ #{target}", "AR=#{zig} ar", "RANLIB=#{zig} ranlib"]
  end

  # A runnable Ruby 3.2 for another architecture, for the install check only (the extension is
  # built from ruby32's headers, configured for glibc 2.17). It runs in the bookworm chroot of
  # that architecture, so it targets bookworm's glibc and links the zlib, libyaml and libffi of
  # bookworm's arm64 packages, unpacked into a sysroot. bigdecimal is left out: its extconf
  # misdetects functions when cross compiling, and nothing here needs it.
  def ruby32_runtime(arch)
    prefix = File.join(CACHE, "rubies", "3.2-#{arch.name}-run")
    ruby = File.join(prefix, "bin", "ruby")
    return prefix if File.executable?(ruby)

    sysroot = File.join(CACHE, "sysroots", arch.name)
    %w[zlib1g zlib1g-dev libyaml-0-2 libyaml-dev libffi8 libffi-dev].each do |pkg|
      run!("dpkg-deb", "-x", Apt.download(pkg, arch.deb, "bookworm"), sysroot, quiet: true)
    end
    # Absolute symlinks (libz.so -> /lib/...) would point at this machine's files.
    Dir.glob(File.join(sysroot, "**", "*")).each do |link|
      next unless File.symlink?(link) && File.readlink(link).start_with?("/")

      target = File.join(sysroot, File.readlink(link))
      File.unlink(link)
      File.symlink(target, link)
    end
    src = unpack_ruby32("ruby-3.2-#{arch.name}-run")
    run!("./configure", "--prefix=#{prefix}", "--disable-install-doc", "--enable-shared",
         "--with-baseruby=#{RbConfig.ruby}", "--host=#{arch.multiarch}", "--disable-jit-support",
         "--with-out-ext=bigdecimal", *zig_cross_tools(arch, "2.36"),
         "CPPFLAGS=-I#{sysroot}/usr/include -I#{sysroot}/usr/include/#{arch.multiarch}",
         "LDFLAGS=-L#{sysroot}/usr/lib/#{arch.multiarch} -L#{sysroot}/lib/#{arch.multiarch}",
         "rb_cv_stack_grow_dir_#{arch.name}=-1", chdir: src, quiet: true)
    make_install_ruby32(src)
    File.executable?(ruby) or raise "the Ruby 3.2 cross build left no #{ruby}"
    prefix
  end

  def host_arch
    ARCHES.values.find { |a| RbConfig::CONFIG["host_cpu"] == a.name } or
      raise "unsupported build host #{RbConfig::CONFIG['host_cpu']}"
  end

  def jobs
    Integer(ENV.fetch("JOBS", "2"))
  end

  # The zig compiler that PyPI's ziglang wheel carries (cargo-zigbuild drives it).
  def zig_dir
    return ENV["ZIG_DIR"] if ENV["ZIG_DIR"]

    out = capture!("python3", "-c", "import ziglang, os; print(os.path.dirname(ziglang.__file__))")
    dir = out.strip
    File.executable?(File.join(dir, "zig")) or raise "no zig binary in #{dir}"
    dir
  rescue RuntimeError
    raise "zig not found: pip install ziglang (script/setup installs it)"
  end

  # --- Checks on a built extension.
  ALLOWED_NEEDED = /\A(libc|libm|libdl|libpthread|librt|libgcc_s)\.so\.\d+\z|\Ald-linux-(x86-64|aarch64)\.so\.\d+\z/

  ExtensionFacts = Struct.new(:path, :size, :max_glibc, :needed, :machine, keyword_init: true)

  def extension_facts(path)
    versions = capture!("readelf", "--version-info", "--wide", path).scan(/GLIBC_(\d+(?:\.\d+)+)/).flatten.uniq
    needed = capture!("readelf", "-d", "--wide", path).scan(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/).flatten
    machine = capture!("readelf", "-h", path)[/Machine:\s+(.+)$/, 1].to_s.strip
    ExtensionFacts.new(path: path, size: File.size(path), needed: needed, machine: machine,
                       max_glibc: versions.max_by { |v| Gem::Version.new(v) })
  end

  # Raises unless the extension loads on glibc GLIBC_FLOOR, links nothing but glibc, libgcc_s
  # and libm (no libruby, libssl, libstdc++), is built for arch and fits the size budget.
  def verify_extension!(path, arch)
    f = extension_facts(path)
    problems = []
    problems << "needs GLIBC_#{f.max_glibc}, above #{GLIBC_FLOOR}" if f.max_glibc && Gem::Version.new(f.max_glibc) > Gem::Version.new(GLIBC_FLOOR)
    extra = f.needed.grep_v(ALLOWED_NEEDED)
    problems << "links #{extra.join(', ')}" unless extra.empty?
    problems << "is #{f.size} bytes, over the #{EXTENSION_BUDGET}-byte budget" if f.size > EXTENSION_BUDGET
    problems << "is built for #{f.machine}, not #{arch.name}" unless f.machine.include?(arch.elf_machine)
    raise "#{path}: #{problems.join('; ')}" unless problems.empty?

    f
  end

  # A Debian chroot under CACHE/chroots, made by debootstrap and kept between runs; it is
  # rebuilt when the package list asked for changes. Foreign architectures (arm64) run under
  # qemu-user through binfmt_misc.
  class Chroot
    attr_reader :name, :path, :arch

    def initialize(name, suite:, arch:, packages:, extra_suites: [], foreign_arches: [])
      @name = name
      @suite = suite
      @arch = arch
      @packages = packages
      @extra_suites = extra_suites
      @foreign_arches = foreign_arches
      @path = File.join(CACHE, "chroots", name)
    end

    def marker = File.join(@path, ".fluent-plugin-kinesis-rs-ready")

    def wanted
      "#{@suite} #{@extra_suites.join(',')} #{@foreign_arches.join(',')} #{@packages.sort.join(' ')}\n"
    end

    def ensure!
      return self if File.exist?(marker) && File.read(marker) == wanted

      Packaging.need_root!("build the #{@name} chroot")
      Packaging.ensure_binfmt!(@arch) unless @arch == Packaging.host_arch
      base = @suite == "experimental" ? "sid" : @suite
      unless File.exist?(File.join(@path, "usr/bin/apt-get"))
        FileUtils.rm_rf(@path)
        FileUtils.mkdir_p(File.dirname(@path))
        Packaging.say("debootstrap #{base} (#{@arch.deb}) into #{@path}")
        Packaging.run!("debootstrap", "--variant=minbase", "--arch=#{@arch.deb}", base, @path,
                       DEBIAN_MIRROR, quiet: true)
      end
      FileUtils.cp("/etc/resolv.conf", File.join(@path, "etc/resolv.conf"))
      suites = ([base, @suite] + @extra_suites).uniq
      File.write(File.join(@path, "etc/apt/sources.list"),
                 suites.map { |s| "deb #{DEBIAN_MIRROR} #{s} main\n" }.join)
      # The mirror may serve suites whose Release files have passed their Valid-Until date.
      File.write(File.join(@path, "etc/apt/apt.conf.d/99no-valid-until"), "Acquire::Check-Valid-Until \"false\";\n")
      @foreign_arches.each { |a| run!("dpkg", "--add-architecture", a) }
      with_mounts([]) do
        run!("apt-get", "update", "-qq")
        run!("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
             "--no-install-recommends", *@packages)
        run!("apt-get", "clean")
      end
      File.write(marker, wanted)
      self
    end

    def run!(*cmd)
      Packaging.run!("chroot", @path, *cmd)
    end

    # /proc, /dev and each host directory in paths bind-mounted at the same path inside, for
    # the block's duration.
    def with_mounts(paths)
      mounted = []
      mount = lambda do |args, target|
        FileUtils.mkdir_p(target)
        Packaging.run!("mount", *args, target, quiet: true)
        mounted << target
      end
      mount.call(%w[-t proc proc], File.join(@path, "proc"))
      mount.call(%w[--bind /dev], File.join(@path, "dev"))
      paths.uniq.each { |p| mount.call(["--bind", p], File.join(@path, p)) }
      yield
    ensure
      mounted.reverse_each { |t| system("umount", "-l", t) }
    end
  end

  # Registers qemu-user for arch with binfmt_misc (fix-binary mode, so it works in chroots).
  def self.ensure_binfmt!(arch)
    qemu_name = "qemu-#{arch.name}"
    misc = "/proc/sys/fs/binfmt_misc"
    system("mount", "-t", "binfmt_misc", "binfmt_misc", misc) unless File.exist?(File.join(misc, "register"))
    return if File.exist?(File.join(misc, qemu_name))

    conf = "/usr/lib/binfmt.d/#{qemu_name}.conf"
    File.exist?(conf) or raise "#{conf} missing: apt-get install qemu-user-static (script/setup installs it)"
    File.write(File.join(misc, "register"), File.read(conf).strip)
  end
end

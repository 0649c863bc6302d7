# frozen_string_literal: true

# Builds the Rust extension as fluent_plugin_kinesis_rs/kinesis_rs.so (the cdylib of this crate,
# exporting Init_kinesis_rs). The crate is a member of the Cargo workspace two directories up,
# whose Cargo.toml and Cargo.lock the gem ships.
require "mkmf"
require "rb_sys/mkmf"

create_rust_makefile("fluent_plugin_kinesis_rs/kinesis_rs") do |r|
  # release unless told otherwise (`RB_SYS_CARGO_PROFILE=dev rake compile` for a quick build);
  # a gem install always builds release.
  r.profile = ENV.fetch("RB_SYS_CARGO_PROFILE", "release").to_sym
  # After a gem install rb_sys deletes its target directory; never do that to a shared one
  # the caller passed in (RB_SYS_CARGO_TARGET_DIR), which other builds reuse.
  r.clean_after_install = false if ENV["RB_SYS_CARGO_TARGET_DIR"]
  # rake-compiler and RubyGems point sitearchdir/sitelibdir at the checkout (or a temp dir).
  # rb_sys would export them to cargo as RBCONFIG_*, and rb-sys's build script reruns when
  # they change, rebuilding rb-sys, magnus and this crate (minutes, with LTO) whenever another
  # checkout shares the target dir. The build does not use them: leave them out.
  r.env = { "RBCONFIG_sitearchdir" => nil, "RBCONFIG_sitelibdir" => nil }
end

# frozen_string_literal: true

module FluentPluginKinesisRs
  # Kept equal to the Cargo workspace version (test/test_native.rb checks it).
  VERSION = "0.1.0"
end

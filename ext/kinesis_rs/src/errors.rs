//! Rust errors → Ruby exceptions, in one place.
//!
//! The exception classes are defined in Ruby (lib/fluent_plugin_kinesis_rs/errors.rb), so they
//! can carry Ruby-side behaviour and be rescued before the extension is loaded. Rust looks them
//! up by name under `FluentPluginKinesisRs` when it raises one; errors are rare, so there is
//! no cache to keep in step with Ruby.
//!
//! Every error raised from here is a `FluentPluginKinesisRs::Error` (a StandardError): never a
//! TypeError or ArgumentError, which fluentd treats as unrecoverable.

use magnus::{prelude::*, Error, ExceptionClass, RModule, Ruby};

/// The Ruby module every exception class lives in.
pub const ROOT_MODULE: &str = "FluentPluginKinesisRs";
/// The base class of all of the gem's errors.
pub const BASE_ERROR: &str = "Error";

/// A Rust error that knows which Ruby exception class it becomes.
pub trait RubyErrorClass: std::fmt::Display {
    /// The class name under `FluentPluginKinesisRs`, e.g. `"RecordTooLargeError"`.
    fn ruby_class_name(&self) -> &'static str;
}

/// The exception class `FluentPluginKinesisRs::<name>`; falls back to
/// `FluentPluginKinesisRs::Error`, then StandardError, when errors.rb was not loaded (the .so
/// required on its own), so a failure never turns into a NameError.
pub fn error_class(ruby: &Ruby, name: &str) -> ExceptionClass {
    let root = match ruby.class_object().const_get::<_, RModule>(ROOT_MODULE) {
        Ok(root) => root,
        Err(_) => return ruby.exception_standard_error(),
    };
    root.const_get::<_, ExceptionClass>(name)
        .or_else(|_| root.const_get::<_, ExceptionClass>(BASE_ERROR))
        .unwrap_or_else(|_| ruby.exception_standard_error())
}

/// Turns a Rust error into the Ruby exception its enum variant names.
pub fn to_ruby_error<E: RubyErrorClass>(ruby: &Ruby, error: &E) -> Error {
    Error::new(
        error_class(ruby, error.ruby_class_name()),
        error.to_string(),
    )
}

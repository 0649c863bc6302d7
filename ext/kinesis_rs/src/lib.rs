//! Ruby binding of kinesis_core: `FluentPluginKinesisRs::Native`.
//!
//! Thin on purpose: each module converts Ruby values to Rust data, calls the core and converts
//! the result back. One module per Ruby concept, plus `errors` for the exception mapping and
//! `alloc` for how the extension's large buffers are allocated next to Ruby's heap.

use magnus::{function, prelude::*, Error, Ruby};

mod aggregation;
#[cfg(target_os = "linux")]
mod alloc;
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;
mod errors;
mod nogvl;
mod options;
mod producer;

/// The version of this crate, which the workspace shares with kinesis_core and the gem.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of the Rust core (one workspace version for all crates).
fn core_version() -> &'static str {
    VERSION
}

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let root = ruby.define_module(errors::ROOT_MODULE)?;
    let native = root.define_module("Native")?;
    native.const_set("VERSION", VERSION)?;
    native.define_module_function("core_version", function!(core_version, 0))?;
    aggregation::init(ruby, native)?;
    producer::init(ruby, native)?;
    Ok(())
}

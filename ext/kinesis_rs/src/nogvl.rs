//! Running Rust work without Ruby's GVL, cancellable by Ruby's interrupts.
//!
//! The work runs inside `rb_thread_call_without_gvl` so other Ruby threads (fluentd's input and
//! router threads) keep running. Ruby calls the unblock function when the thread is killed or
//! interrupted (Thread#kill, shutdown); it fires a [`CancelToken`] that the work watches. A panic
//! in the work is caught here and returned as an error, never unwinding into Ruby's C frames.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use kinesis_core::cancel::CancelToken;

struct Call<F, R> {
    work: Option<F>,
    result: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn run_call<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
    // SAFETY: `data` is the `&mut Call<F, R>` that `without_gvl` passed, alive for the whole
    // call, and only this function touches it while Ruby runs it.
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(work) = call.work.take() {
        call.result = Some(catch_unwind(AssertUnwindSafe(work)));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` is the `&CancelToken` passed to `without_gvl`, which outlives the call;
    // `cancel` only touches an atomic and a tokio Notify, both thread-safe.
    let token = unsafe { &*(data as *const CancelToken) };
    token.cancel();
}

/// Why the work did not produce a value.
pub enum Interrupted {
    /// Ruby had an interrupt pending and never started the work.
    NotStarted,
    /// The work panicked; the message, if it had one.
    Panicked(String),
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `work` without the GVL. `work` must not touch any Ruby value.
pub fn without_gvl<F, R>(cancel: &CancelToken, work: F) -> Result<R, Interrupted>
where
    F: FnOnce() -> R,
{
    let mut call = Call {
        work: Some(work),
        result: None,
    };
    // SAFETY: `call` and `cancel` live on this stack frame until rb_thread_call_without_gvl
    // returns, which is after both callbacks can run. `run_call::<F, R>` matches `call`'s type.
    unsafe {
        rb_sys::rb_thread_call_without_gvl(
            Some(run_call::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            Some(unblock),
            cancel as *const CancelToken as *mut c_void,
        );
    }
    match call.result {
        None => Err(Interrupted::NotStarted),
        Some(Ok(r)) => Ok(r),
        Some(Err(p)) => Err(Interrupted::Panicked(panic_message(p))),
    }
}

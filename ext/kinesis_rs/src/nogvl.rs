//! Waiting for work on the runtime without Ruby's GVL, and letting Ruby handle its interrupts.
//!
//! The work itself (aggregation, network) runs on the process-wide tokio runtime; the calling
//! Ruby thread only waits for it, inside `rb_thread_call_without_gvl2`, so fluentd's other
//! threads keep running. (Formatting a chunk runs on the calling thread itself, also without
//! the GVL: see [`compute`].) Ruby calls the unblock function for many reasons: a signal, a
//! `Thread#wakeup` (fluentd's stop sequence does that to every sleeping plugin thread),
//! `Thread#raise`, `Thread#kill`. None of them is a cancellation: the unblock function only ends
//! the *wait*, the interrupt is processed with the GVL held (`rb_thread_check_ints` under
//! `rb_protect`), and unless it raised, the same work is waited on again, untouched. Only a real
//! raise or kill abandons the wait, and the caller decides what that means for the work.
//!
//! `rb_thread_call_without_gvl2` (not the plain variant) is used because it neither processes
//! interrupts before nor after the call: the plain one can raise from there, unwinding through
//! our Rust frame and losing the work's result. A panic in the waiting code is caught here and
//! returned as an error, never unwinding into Ruby's C frames.

use std::any::Any;
use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use magnus::{Error, Ruby};
use tokio::runtime::Runtime;

use kinesis_core::cancel::{on_drop, CancelToken};

struct Call<F> {
    work: Option<F>,
    panic: Option<String>,
}

unsafe extern "C" fn run_call<F: FnOnce()>(data: *mut c_void) -> *mut c_void {
    // SAFETY: `data` is the `&mut Call<F>` that `call_without_gvl` passed, alive for the whole
    // call, and only this function touches it while Ruby runs it.
    let call = unsafe { &mut *(data as *mut Call<F>) };
    if let Some(work) = call.work.take() {
        if let Err(p) = catch_unwind(AssertUnwindSafe(work)) {
            call.panic = Some(panic_message(p));
        }
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` is the `&CancelToken` passed to `call_without_gvl`, which outlives the
    // call; `cancel` only touches an atomic and a tokio Notify, both thread-safe.
    let wake = unsafe { &*(data as *const CancelToken) };
    wake.cancel();
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `work` without the GVL; Ruby fires `wake` when it wants the thread back. Returns
/// the panic message if `work` panicked. If Ruby had an interrupt pending, `work` may not run.
fn call_without_gvl<F: FnOnce()>(wake: &CancelToken, work: F) -> Result<(), String> {
    let mut call = Call {
        work: Some(work),
        panic: None,
    };
    // SAFETY: `call` and `wake` live on this stack frame until rb_thread_call_without_gvl2
    // returns, which is after both callbacks can run. `run_call::<F>` matches `call`'s type.
    // The gvl2 variant never raises (no interrupt check before or after the call).
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(run_call::<F>),
            &mut call as *mut Call<F> as *mut c_void,
            Some(unblock),
            wake as *const CancelToken as *mut c_void,
        );
    }
    call.panic.map_or(Ok(()), Err)
}

pub fn internal_error(ruby: &Ruby, what: &str) -> Error {
    Error::new(
        crate::errors::error_class(ruby, "InternalError"),
        format!("internal error in the Rust extension ({what}); the chunk will be retried. Please report this."),
    )
}

/// Blocks this Ruby thread, without the GVL, until `finished` fires. Ruby's interrupts are
/// processed as they come; if one raises, `on_abandon` runs and the exception is returned.
pub fn wait(
    ruby: &Ruby,
    rt: &Runtime,
    finished: &CancelToken,
    on_abandon: impl FnOnce(),
) -> Result<(), Error> {
    loop {
        if finished.is_cancelled() {
            return Ok(());
        }
        let wake = CancelToken::new();
        call_without_gvl(&wake, || {
            rt.block_on(async {
                tokio::select! {
                    _ = finished.cancelled() => {}
                    _ = wake.cancelled() => {}
                }
            })
        })
        .map_err(|m| internal_error(ruby, &m))?;
        if finished.is_cancelled() {
            return Ok(());
        }
        // Woken by Ruby: let it run the interrupt (trap handlers, Thread#raise, kill). A plain
        // wakeup raises nothing and the wait goes on.
        if let Err(e) = ruby.thread_check_ints() {
            on_abandon();
            return Err(e);
        }
    }
}

/// Runs CPU-bound `work` on this thread without the GVL, so fluentd's other threads run
/// meanwhile. `work` is not interruptible: an interrupt arriving during it is processed by Ruby
/// after it returns. One already pending is processed first; if it raises, `work` does not run.
pub fn compute<T>(ruby: &Ruby, work: impl FnOnce() -> T) -> Result<T, Error> {
    let mut work = Some(work);
    let mut out = None;
    loop {
        let wake = CancelToken::new();
        call_without_gvl(&wake, || out = work.take().map(|w| w()))
            .map_err(|m| internal_error(ruby, &m))?;
        if let Some(value) = out.take() {
            return Ok(value);
        }
        ruby.thread_check_ints()?;
    }
}

/// Runs `future` on the runtime and waits for it as [`wait`] does; if Ruby raises meanwhile,
/// the future is dropped (for work that may be abandoned, such as a read-only check).
pub fn run<T: Send + 'static>(
    ruby: &Ruby,
    rt: &Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T, Error> {
    let finished = Arc::new(CancelToken::new());
    let result: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
    let (f, r) = (finished.clone(), result.clone());
    let task = rt.spawn(async move {
        let _finished = on_drop(|| f.cancel());
        let value = future.await;
        *r.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    });
    wait(ruby, rt, &finished, || task.abort())?;
    let value = result.lock().unwrap_or_else(|p| p.into_inner()).take();
    value.ok_or_else(|| {
        internal_error(
            ruby,
            "a task on the runtime ended without a result (it panicked)",
        )
    })
}

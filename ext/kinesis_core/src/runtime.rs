//! The process-wide tokio runtime: created on first use, re-created in a forked child (a runtime's
//! threads do not survive fork), never dropped.

use std::sync::{Arc, Mutex};

use once_cell::sync::Lazy;
use tokio::runtime::Runtime;

/// The runtime and the pid of the process that created it.
type OwnedRuntime = (u32, Arc<Runtime>);

static RUNTIME: Lazy<Mutex<Option<OwnedRuntime>>> = Lazy::new(|| Mutex::new(None));

/// Worker threads of the runtime: network waits dominate, so a couple are plenty.
fn worker_threads() -> usize {
    std::env::var("KINESIS_RS_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// The runtime of this process.
pub fn runtime() -> Result<Arc<Runtime>, std::io::Error> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(rt.clone());
        }
    }
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("kinesis-rs")
            .enable_all()
            .build()?,
    );
    // A runtime inherited through fork has no threads in this process: dropping it would wait
    // for them forever, so it is leaked on purpose.
    if let Some(old) = slot.replace((pid, rt.clone())) {
        std::mem::forget(old);
    }
    Ok(rt)
}

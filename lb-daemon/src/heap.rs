//! Gives the allocator's free memory back to the kernel now and then.
//!
//! glibc's malloc returns freed memory to the kernel only from the top of a heap. The daemon's
//! periodic walks of the eBPF maps (a vector of every conntrack or SNAT entry, megabytes on a
//! busy host) and the proxy's bursts of sessions free large blocks in the middle of the
//! heaps, which then stay resident: in a 30-minute soak the resident size crept up by a fifth
//! before it levelled off. `malloc_trim` hands such free pages back (`madvise`), so the
//! resident size follows what is in use.

use std::time::Duration;

/// How often the heaps are trimmed.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Trims the heaps every [`TRIM_EVERY`] until the task is aborted, on tokio's blocking pool
/// (a trim walks every arena: milliseconds, not for the control plane's one thread).
pub async fn trim_periodically() {
    let mut ticker = tokio::time::interval(TRIM_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let _ = tokio::task::spawn_blocking(|| {
            crate::privileges::follow();
            trim();
        })
        .await;
    }
}

/// Returns the free memory of every heap to the kernel (glibc); nothing elsewhere.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own state.
    unsafe {
        libc::malloc_trim(0);
    }
}

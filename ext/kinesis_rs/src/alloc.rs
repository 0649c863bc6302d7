//! The extension's allocator: large buffers are mapped from the kernel, and a few freed ones
//! are kept mapped for the next large allocation; everything else goes to the system allocator
//! (glibc's malloc, shared with Ruby).
//!
//! A delivery's big buffers (the chunk's copy, its formatted records, 1 MiB aggregates,
//! multi-megabyte request bodies) are made and freed on several threads (the chunk thread, the
//! runtime's workers), and live for very different times. In glibc's malloc, once the first
//! such buffer is freed its size becomes the threshold below which later ones are carved from
//! per-thread arenas, where freed space is given back only from the top of a heap. Mapped
//! directly, RSS follows what is in flight: in the bench's real-fluentd run, peak RSS fell from
//! 147.1 to 110.6 MiB, at the same CPU per record.
//!
//! A fresh mapping costs a page fault and the kernel's zeroing of every page when first
//! written, and unmapping costs a TLB flush on every thread that ran in the process: in a
//! profile of the write path the kernel took 39 % of the extension threads' samples, most of it
//! that. So up to `WARM_BYTES` of freed mappings
//! (at most `WARM_BLOCKS` of them) stay mapped, with their pages, and later large allocations
//! take them: the smallest one that fits (its tail split off and kept if it is large itself),
//! or else the largest, grown in place or moved by the kernel without copying. What does not fit
//! under the bound is unmapped at once. Every large allocation takes a kept block when there is
//! one, so a fresh mapping is made only when none is kept. A kept block's pages are all resident
//! even where its next use writes fewer of them (a fresh mapping's unwritten pages are not), so
//! peak RSS can grow: in one real-fluentd bench round it was 122.6 MiB against 110.6 without
//! kept blocks (fluent-plugin-kinesis: 116.4 to 120.6). A kept block not taken again for one to
//! two `IDLE` periods is unmapped by a task on the runtime (`release_idle_blocks`), so an idle
//! fluentd holds none.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Allocations of at least this many bytes are mapped directly.
const DIRECT: usize = 1 << 20;
const PAGE: usize = 4096;
/// Freed mappings kept for reuse: at most this many bytes in all ...
const WARM_BYTES: usize = 64 << 20;
/// ... in at most this many blocks.
const WARM_BLOCKS: usize = 32;
/// How often kept blocks are checked for idleness.
const IDLE: Duration = Duration::from_secs(10);

extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> *mut u8;
    fn munmap(addr: *mut u8, len: usize) -> i32;
    fn mremap(old: *mut u8, old_len: usize, new_len: usize, flags: i32, ...) -> *mut u8;
}

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_PRIVATE: i32 = 0x02;
const MAP_ANONYMOUS: i32 = 0x20;
const MREMAP_MAYMOVE: i32 = 1;
const MAP_FAILED: *mut u8 = !0usize as *mut u8;

pub struct Allocator;

fn direct(layout: &Layout) -> bool {
    layout.size() >= DIRECT && layout.align() <= PAGE
}

fn pages(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

/// A freed mapping: its address, its length in bytes (a multiple of PAGE), and the idle check
/// it was kept in.
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    len: usize,
    kept_in: u64,
}

/// Freed mappings kept for reuse.
struct Warm {
    blocks: [Block; WARM_BLOCKS],
    count: usize,
    bytes: usize,
}

impl Warm {
    fn remove(&mut self, i: usize) -> (usize, usize) {
        let block = self.blocks[i];
        self.count -= 1;
        self.blocks[i] = self.blocks[self.count];
        self.bytes -= block.len;
        (block.addr, block.len)
    }

    /// Keeps a block if it fits under the bound; false: the caller unmaps it.
    fn keep(&mut self, addr: usize, len: usize) -> bool {
        if self.count == WARM_BLOCKS || self.bytes + len > WARM_BYTES {
            return false;
        }
        self.blocks[self.count] = Block {
            addr,
            len,
            kept_in: CHECKS.load(Ordering::Relaxed),
        };
        self.count += 1;
        self.bytes += len;
        true
    }

    /// The smallest block of at least `len` bytes, else the largest smaller one.
    fn take(&mut self, len: usize) -> Option<(usize, usize)> {
        let blocks = &self.blocks[..self.count];
        let fit = (0..blocks.len())
            .filter(|&i| blocks[i].len >= len)
            .min_by_key(|&i| blocks[i].len);
        let i = fit.or_else(|| (0..blocks.len()).max_by_key(|&i| blocks[i].len))?;
        Some(self.remove(i))
    }
}

// The allocator's own state: a std Mutex is a futex and never allocates.
static WARM: Mutex<Warm> = Mutex::new(Warm {
    blocks: [Block {
        addr: 0,
        len: 0,
        kept_in: 0,
    }; WARM_BLOCKS],
    count: 0,
    bytes: 0,
});

/// Idle checks so far: a block kept before the previous check and not taken since is idle.
static CHECKS: AtomicU64 = AtomicU64::new(0);

/// Unmaps the kept blocks no allocation has taken since the previous call.
fn release_idle_blocks() {
    let check = CHECKS.fetch_add(1, Ordering::Relaxed);
    let mut idle = [(0usize, 0usize); WARM_BLOCKS];
    let mut n = 0;
    {
        let mut w = warm();
        let mut i = 0;
        while i < w.count {
            if w.blocks[i].kept_in < check {
                idle[n] = w.remove(i);
                n += 1;
            } else {
                i += 1;
            }
        }
    }
    for &(addr, len) in &idle[..n] {
        // SAFETY: a removed block is a whole mapping that nothing else uses.
        unsafe { munmap(addr as *mut u8, len) };
    }
}

/// The pid whose runtime runs the idle check (a forked child starts its own).
static CHECKED_BY: AtomicU32 = AtomicU32::new(0);

/// Starts the idle check on `rt`, once per process.
pub fn release_idle_blocks_on(rt: &tokio::runtime::Runtime) {
    let pid = std::process::id();
    if CHECKED_BY.swap(pid, Ordering::Relaxed) == pid {
        return;
    }
    rt.spawn(async {
        let mut every = tokio::time::interval(IDLE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            release_idle_blocks();
        }
    });
}

fn warm() -> std::sync::MutexGuard<'static, Warm> {
    WARM.lock().unwrap_or_else(|p| p.into_inner())
}

unsafe fn map(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory.
    let p = unsafe {
        mmap(
            ptr::null_mut(),
            len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == MAP_FAILED {
        ptr::null_mut()
    } else {
        p
    }
}

/// A mapping of exactly `len` bytes (a multiple of PAGE), warm if one was kept.
unsafe fn map_warm(len: usize) -> *mut u8 {
    let Some((addr, have)) = warm().take(len) else {
        return unsafe { map(len) };
    };
    let p = addr as *mut u8;
    if have == len {
        return p;
    }
    if have > len {
        // Split: the head is handed out.
        unsafe { release_tail((addr + len) as *mut u8, have - len) };
        return p;
    }
    // SAFETY: the block is a whole mapping of `have` bytes that nothing else uses.
    let q = unsafe { mremap(p, have, len, MREMAP_MAYMOVE) };
    if q == MAP_FAILED {
        unsafe { munmap(p, have) };
        return unsafe { map(len) };
    }
    q
}

unsafe fn unmap_or_keep(p: *mut u8, len: usize) {
    if !warm().keep(p as usize, len) {
        unsafe { munmap(p, len) };
    }
}

/// Releases the tail of a mapping whose head stays in use: kept if it is large, else unmapped.
unsafe fn release_tail(p: *mut u8, len: usize) {
    if len >= DIRECT {
        unsafe { unmap_or_keep(p, len) };
    } else {
        unsafe { munmap(p, len) };
    }
}

// SAFETY: each method hands out memory valid for the layout (page-aligned mappings for large,
// aligned to at most a page; the system allocator otherwise) and releases only what it handed
// out, with the size the layout says, as GlobalAlloc's callers guarantee. A kept mapping is
// owned by the warm list alone until it is handed out again.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            unsafe { map_warm(pages(layout.size())) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            // Fresh anonymous pages are zero; warm ones are not.
            unsafe { map(pages(layout.size())) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if direct(&layout) {
            unsafe { unmap_or_keep(p, pages(layout.size())) };
        } else {
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (direct(&layout), direct(&new_layout)) {
            (false, false) => unsafe { System.realloc(p, layout, new_size) },
            (true, true) => {
                let (old, new) = (pages(layout.size()), pages(new_size));
                if new < old {
                    // Shrinking: the freed tail may serve a later allocation.
                    unsafe { release_tail(p.add(new), old - new) };
                    return p;
                }
                let q = unsafe { mremap(p, old, new, MREMAP_MAYMOVE) };
                if q == MAP_FAILED {
                    ptr::null_mut()
                } else {
                    q
                }
            }
            _ => {
                let q = unsafe { self.alloc(new_layout) };
                if !q.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    /// Writes a tag over the whole block, then checks it where it matters: the block is really
    /// mapped and writable for its whole length, and distinct from the others checked with it.
    unsafe fn fill(p: *mut u8, size: usize, tag: u8) {
        unsafe { ptr::write_bytes(p, tag, size) };
    }

    unsafe fn check(p: *mut u8, size: usize, tag: u8) {
        for i in (0..size).step_by(PAGE / 2).chain([size - 1]) {
            assert_eq!(unsafe { *p.add(i) }, tag, "byte {i} of {size}");
        }
    }

    #[test]
    fn large_blocks_are_reused_split_grown_and_bounded() {
        let a = Allocator;
        unsafe {
            // Sizes the extension makes: aggregates, bodies, formatted chunks; not page multiples.
            let sizes = [
                (1 << 20) + 16,
                6 << 20,
                (10 << 20) + 5,
                (1 << 20) + 16,
                3 << 20,
            ];
            for round in 0..20u8 {
                let blocks: Vec<(*mut u8, usize)> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        let s = s + usize::from(round) * 3 * PAGE;
                        let p = a.alloc(layout(s));
                        assert!(!p.is_null());
                        assert_eq!(p as usize % PAGE, 0);
                        fill(p, s, round ^ i as u8);
                        (p, s)
                    })
                    .collect();
                for (i, &(p, s)) in blocks.iter().enumerate() {
                    check(p, s, round ^ i as u8);
                }
                // Grow one, shrink another; contents up to the smaller size survive.
                let (p, s) = blocks[0];
                let g = a.realloc(p, layout(s), s * 3);
                check(g, s, round);
                fill(g, s * 3, round);
                let (p2, s2) = blocks[2];
                let h = a.realloc(p2, layout(s2), s2 / 4);
                check(h, s2 / 4, round ^ 2);
                a.dealloc(g, layout(s * 3));
                a.dealloc(h, layout(s2 / 4));
                for &(p, s) in &blocks[1..] {
                    if p != p2 {
                        a.dealloc(p, layout(s));
                    }
                }
                let w = warm();
                assert!(w.bytes <= WARM_BYTES && w.count <= WARM_BLOCKS);
                assert_eq!(
                    w.bytes,
                    w.blocks[..w.count].iter().map(|b| b.len).sum::<usize>()
                );
                assert!(w.blocks[..w.count].iter().all(|b| b.len % PAGE == 0));
            }
            // Zeroed allocations are zero even when warm blocks are there.
            let z = a.alloc_zeroed(layout(2 << 20));
            assert!((0..2 << 20).step_by(PAGE / 2).all(|i| *z.add(i) == 0));
            a.dealloc(z, layout(2 << 20));
            // Blocks kept before the previous check are released by the next one (blocks
            // other tests free meanwhile are kept in a later check).
            let before = CHECKS.load(Ordering::Relaxed);
            release_idle_blocks();
            release_idle_blocks();
            let w = warm();
            assert!(w.blocks[..w.count].iter().all(|b| b.kept_in > before));
        }
    }
}

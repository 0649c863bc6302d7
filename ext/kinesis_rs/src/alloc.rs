//! The extension's allocator: large buffers are mapped from the kernel and unmapped when freed;
//! everything else goes to the system allocator (glibc's malloc, shared with Ruby).
//!
//! A delivery's big buffers (the chunk's copy, its formatted records, 1 MiB aggregates,
//! multi-megabyte request bodies) are made and freed on several threads (the chunk thread, the
//! runtime's workers), and live for very different times. In glibc's malloc, once the first
//! such buffer is freed its size becomes the threshold below which later ones are carved from
//! per-thread arenas, where freed space is given back only from the top of a heap. Mapped
//! directly, a freed buffer's pages go back to the kernel at once, and RSS follows what is in
//! flight: in the bench's real-fluentd run, peak RSS fell from 147.1 to 110.6 MiB, at the same
//! CPU per record.
//!
//! Pages of a fresh mapping are faulted in and zeroed by the kernel when first written, and freed
//! when it is unmapped: about 1.4 µs of CPU per 4 KiB page on the 2-core bench VM. The write
//! path bench's write phase faults about 0.19 pages per record, and a third of its CPU samples
//! are the kernel's. But a buffer reserved larger than it ends up (a 1 MiB aggregate that closes
//! early, the formatted records' estimate) costs no memory for the part never written.
//! Transparent huge pages would make faulting a tenth as costly (0.024 against 0.39 ns per byte
//! written, measured), but Ruby turns them off for its whole process (`PR_SET_THP_DISABLE` in
//! `ruby_setup`), and `MADV_HUGEPAGE` on a mapping does not override that (the bench process
//! got no huge page with it). Two ways of saving that CPU were measured and dropped for
//! the memory they cost in the real-fluentd bench (peak RSS, 3 rounds each; fluent-plugin-kinesis
//! 114.8 to 120.4 in the same runs): keeping up to 12 MiB of freed mappings for reuse (median
//! 125.1 MiB against 112.9 without; a kept block is resident in full, whatever its next use
//! writes), and `MAP_POPULATE` (123.4 MiB).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// Allocations of at least this many bytes are mapped directly.
const DIRECT: usize = 1 << 20;
const PAGE: usize = 4096;

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

unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory.
    let p = unsafe {
        mmap(
            ptr::null_mut(),
            pages(size),
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

// SAFETY: each method hands out memory valid for the layout (page-aligned mappings for large,
// aligned to at most a page; the system allocator otherwise) and releases only what it handed
// out, with the size the layout says, as GlobalAlloc's callers guarantee.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            unsafe { map(layout.size()) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if direct(&layout) {
            // Fresh anonymous pages are zero.
            unsafe { map(layout.size()) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if direct(&layout) {
            unsafe { munmap(p, pages(layout.size())) };
        } else {
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (direct(&layout), direct(&new_layout)) {
            (false, false) => unsafe { System.realloc(p, layout, new_size) },
            (true, true) => {
                let q = unsafe { mremap(p, pages(layout.size()), pages(new_size), MREMAP_MAYMOVE) };
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

    unsafe fn fill(p: *mut u8, size: usize, tag: u8) {
        unsafe { ptr::write_bytes(p, tag, size) };
    }

    /// Every half page and the last byte hold `tag`: the block is mapped and written in full.
    unsafe fn check(p: *mut u8, size: usize, tag: u8) {
        for i in (0..size).step_by(PAGE / 2).chain([size - 1]) {
            assert_eq!(unsafe { *p.add(i) }, tag, "byte {i} of {size}");
        }
    }

    #[test]
    fn large_blocks_are_mapped_grown_shrunk_and_zeroed() {
        let a = Allocator;
        unsafe {
            // Sizes the extension makes (aggregates, bodies, formatted chunks): not page multiples.
            for (i, &s) in [(1 << 20) + 16, 6 << 20, (10 << 20) + 5, 3 << 20]
                .iter()
                .enumerate()
            {
                let tag = i as u8 + 1;
                let p = a.alloc(layout(s));
                assert!(!p.is_null());
                assert_eq!(p as usize % PAGE, 0);
                fill(p, s, tag);
                // Grown (by the kernel, without copying) and shrunk back, even below the
                // threshold (into the system allocator): contents up to the smaller size survive.
                let g = a.realloc(p, layout(s), s * 3);
                check(g, s, tag);
                fill(g, s * 3, tag);
                let h = a.realloc(g, layout(s * 3), s / 2);
                check(h, s / 2, tag);
                let k = a.realloc(h, layout(s / 2), DIRECT - 1);
                check(k, (s / 2).min(DIRECT - 1), tag);
                a.dealloc(k, layout(DIRECT - 1));
                let z = a.alloc_zeroed(layout(s));
                check(z, s, 0);
                a.dealloc(z, layout(s));
            }
            // Small ones and over-aligned ones go to the system allocator.
            let small = a.alloc(layout(64));
            fill(small, 64, 7);
            let big = a.realloc(small, layout(64), 2 << 20);
            check(big, 64, 7);
            a.dealloc(big, layout(2 << 20));
        }
    }
}

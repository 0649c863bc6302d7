//! MD5 of several messages at once: the digests that end a chunk's aggregates.
//!
//! MD5 is one chain of 64 dependent 32-bit steps per 64-byte block, so one message goes no faster
//! than that chain (AWS-LC's assembly, [`crate::kpl::md5`], is at that limit). The digests of
//! different aggregates are independent: with AVX2, eight messages go through the chain together,
//! one per 32-bit lane of each vector. A lane whose message is done takes the next one; the last
//! message left alone finishes on the scalar path, where one lane would be slower. Without AVX2
//! (or with one message) each digest is AWS-LC's.

use crate::kpl::{md5, DIGEST_LEN};

/// Messages hashed together.
pub const LANES: usize = 8;

const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// Left rotations, four per round.
const S: [[u32; 4]; 4] = [
    [7, 12, 17, 22],
    [5, 9, 14, 20],
    [4, 11, 16, 23],
    [6, 10, 15, 21],
];

const IV: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

/// Which message word step `i` adds.
const fn word(i: usize) -> usize {
    match i / 16 {
        0 => i,
        1 => (5 * i + 1) % 16,
        2 => (3 * i + 5) % 16,
        _ => (7 * i) % 16,
    }
}

/// The MD5 of each of `messages`, in order.
pub fn md5_many(messages: &[&[u8]]) -> Vec<[u8; DIGEST_LEN]> {
    let mut out = vec![[0u8; DIGEST_LEN]; messages.len()];
    #[cfg(target_arch = "x86_64")]
    if messages.len() > 1 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { avx2::md5_many(messages, &mut out) };
        return out;
    }
    for (m, o) in messages.iter().zip(&mut out) {
        *o = md5(m);
    }
    out
}

/// Where a message is: its whole blocks are read where they are; the last one or two blocks
/// (the rest of the message, 0x80, zeros, the length in bits) are written out here.
struct Message<'a> {
    data: &'a [u8],
    whole: usize,
    blocks: usize,
    tail: [u8; 128],
}

impl<'a> Message<'a> {
    fn new(data: &'a [u8]) -> Self {
        let whole = data.len() / 64;
        let rest = &data[whole * 64..];
        let tail_blocks = if rest.len() < 56 { 1 } else { 2 };
        let mut tail = [0u8; 128];
        tail[..rest.len()].copy_from_slice(rest);
        tail[rest.len()] = 0x80;
        let end = tail_blocks * 64;
        tail[end - 8..end].copy_from_slice(&((data.len() as u64).wrapping_mul(8)).to_le_bytes());
        Message {
            data,
            whole,
            blocks: whole + tail_blocks,
            tail,
        }
    }

    fn block(&self, i: usize) -> &[u8] {
        if i < self.whole {
            &self.data[i * 64..i * 64 + 64]
        } else {
            let t = (i - self.whole) * 64;
            &self.tail[t..t + 64]
        }
    }
}

fn digest_of(state: [u32; 4]) -> [u8; DIGEST_LEN] {
    let mut d = [0u8; DIGEST_LEN];
    for (o, s) in d.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&s.to_le_bytes());
    }
    d
}

/// One block into one state, portably: the lone last message's remaining blocks.
fn compress(state: &mut [u32; 4], block: &[u8]) {
    let mut m = [0u32; 16];
    for (w, b) in m.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let [mut a, mut b, mut c, mut d] = *state;
    for i in 0..64 {
        let f = match i / 16 {
            0 => d ^ (b & (c ^ d)),
            1 => c ^ (d & (b ^ c)),
            2 => b ^ c ^ d,
            _ => c ^ (b | !d),
        };
        let f = f
            .wrapping_add(a)
            .wrapping_add(K[i])
            .wrapping_add(m[word(i)]);
        a = d;
        d = c;
        c = b;
        b = b.wrapping_add(f.rotate_left(S[i / 16][i % 4]));
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d]) {
        *s = s.wrapping_add(v);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{compress, digest_of, word, Message, DIGEST_LEN, IV, K, LANES};

    /// What an idle lane reads (its result is never used).
    static ZERO_BLOCK: [u8; 64] = [0; 64];

    #[derive(Clone, Copy)]
    struct Lane {
        /// The message in the lane, and its next block.
        message: usize,
        block: usize,
    }

    /// The state words of every lane: lane `l` of `v[0..4]` is message `l`'s a, b, c, d.
    struct State {
        v: [__m256i; 4],
    }

    /// Lane `l`'s a, b, c, d out of every lane's state words.
    fn lane_state(words: &[[u32; LANES]; 4], l: usize) -> [u32; 4] {
        [words[0][l], words[1][l], words[2][l], words[3][l]]
    }

    impl State {
        #[inline(always)]
        unsafe fn lanes(&self) -> [[u32; LANES]; 4] {
            let mut out = [[0u32; LANES]; 4];
            for (o, v) in out.iter_mut().zip(self.v) {
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
            }
            out
        }

        #[inline(always)]
        unsafe fn set_lanes(&mut self, words: &[[u32; LANES]; 4]) {
            for (v, w) in self.v.iter_mut().zip(words) {
                *v = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
            }
        }
    }

    /// Hashes `messages` into `out`, eight lanes at a time.
    #[target_feature(enable = "avx2")]
    pub unsafe fn md5_many(messages: &[&[u8]], out: &mut [[u8; DIGEST_LEN]]) {
        let prepared: Vec<Message> = messages.iter().map(|m| Message::new(m)).collect();
        let mut lanes: [Option<Lane>; LANES] = [None; LANES];
        let mut next = 0;
        let mut state = State {
            v: [_mm256_setzero_si256(); 4],
        };
        loop {
            if next < prepared.len() && lanes.iter().any(|l| l.is_none()) {
                let mut words = unsafe { state.lanes() };
                for (l, lane) in lanes.iter_mut().enumerate() {
                    if lane.is_none() && next < prepared.len() {
                        *lane = Some(Lane {
                            message: next,
                            block: 0,
                        });
                        for (w, iv) in words.iter_mut().zip(IV) {
                            w[l] = iv;
                        }
                        next += 1;
                    }
                }
                unsafe { state.set_lanes(&words) };
            }
            let busy = lanes.iter().filter(|l| l.is_some()).count();
            if busy == 0 {
                return;
            }
            if busy == 1 && next == prepared.len() {
                // Alone, the message goes faster through the portable steps than in a lane.
                let words = unsafe { state.lanes() };
                for (l, lane) in lanes.iter().enumerate() {
                    if let Some(lane) = lane {
                        let m = &prepared[lane.message];
                        let mut s = lane_state(&words, l);
                        for b in lane.block..m.blocks {
                            compress(&mut s, m.block(b));
                        }
                        out[lane.message] = digest_of(s);
                    }
                }
                return;
            }
            let mut blocks = [ZERO_BLOCK.as_ptr(); LANES];
            for (b, lane) in blocks.iter_mut().zip(&lanes) {
                if let Some(lane) = lane {
                    *b = prepared[lane.message].block(lane.block).as_ptr();
                }
            }
            unsafe { compress8(&mut state, &blocks) };
            let mut done = false;
            for lane in lanes.iter_mut().flatten() {
                lane.block += 1;
                done |= lane.block == prepared[lane.message].blocks;
            }
            if done {
                let words = unsafe { state.lanes() };
                for (l, slot) in lanes.iter_mut().enumerate() {
                    if let Some(lane) = slot {
                        if lane.block == prepared[lane.message].blocks {
                            out[lane.message] = digest_of(lane_state(&words, l));
                            *slot = None;
                        }
                    }
                }
            }
        }
    }

    /// Words `0..8` (`half` 0) or `8..16` (`half` 1) of the eight blocks, word `w` of every lane
    /// in vector `w`: an 8x8 transpose of 32-bit words.
    #[inline(always)]
    unsafe fn words(blocks: &[*const u8; LANES], half: usize) -> [__m256i; 8] {
        unsafe {
            let r: [__m256i; 8] =
                std::array::from_fn(|l| _mm256_loadu_si256(blocks[l].add(32 * half).cast()));
            let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
            let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
            let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
            let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
            let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            [
                _mm256_permute2x128_si256::<0x20>(u0, u4),
                _mm256_permute2x128_si256::<0x20>(u1, u5),
                _mm256_permute2x128_si256::<0x20>(u2, u6),
                _mm256_permute2x128_si256::<0x20>(u3, u7),
                _mm256_permute2x128_si256::<0x31>(u0, u4),
                _mm256_permute2x128_si256::<0x31>(u1, u5),
                _mm256_permute2x128_si256::<0x31>(u2, u6),
                _mm256_permute2x128_si256::<0x31>(u3, u7),
            ]
        }
    }

    // The four rounds' functions of b, c, d (`ones`: every bit set, for the NOT of round 4).
    #[inline(always)]
    unsafe fn f1(b: __m256i, c: __m256i, d: __m256i, _: __m256i) -> __m256i {
        unsafe { _mm256_xor_si256(d, _mm256_and_si256(b, _mm256_xor_si256(c, d))) }
    }

    #[inline(always)]
    unsafe fn f2(b: __m256i, c: __m256i, d: __m256i, _: __m256i) -> __m256i {
        unsafe { _mm256_xor_si256(c, _mm256_and_si256(d, _mm256_xor_si256(b, c))) }
    }

    #[inline(always)]
    unsafe fn f3(b: __m256i, c: __m256i, d: __m256i, _: __m256i) -> __m256i {
        unsafe { _mm256_xor_si256(_mm256_xor_si256(b, c), d) }
    }

    #[inline(always)]
    unsafe fn f4(b: __m256i, c: __m256i, d: __m256i, ones: __m256i) -> __m256i {
        unsafe { _mm256_xor_si256(c, _mm256_or_si256(b, _mm256_xor_si256(d, ones))) }
    }

    /// One 64-byte block of every lane, from `blocks`.
    #[target_feature(enable = "avx2")]
    unsafe fn compress8(state: &mut State, blocks: &[*const u8; LANES]) {
        unsafe {
            let (lo, hi) = (words(blocks, 0), words(blocks, 1));
            let m: [__m256i; 16] = std::array::from_fn(|w| if w < 8 { lo[w] } else { hi[w - 8] });
            let ones = _mm256_set1_epi32(-1);
            let [a0, b0, c0, d0] = state.v;
            let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
            // Step i: a = b + rotl(f(b, c, d) + a + K[i] + M[word(i)], s), the names turning
            // each step (d, a, b, c), as in RFC 1321.
            macro_rules! step {
                ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $i:expr, $l:literal, $r:literal) => {
                    let akm = _mm256_add_epi32(
                        $a,
                        _mm256_add_epi32(_mm256_set1_epi32(K[$i] as i32), m[word($i)]),
                    );
                    let f = _mm256_add_epi32($f($b, $c, $d, ones), akm);
                    $a = _mm256_add_epi32(
                        $b,
                        _mm256_or_si256(_mm256_slli_epi32::<$l>(f), _mm256_srli_epi32::<$r>(f)),
                    );
                };
            }
            step!(f1, a, b, c, d, 0, 7, 25);
            step!(f1, d, a, b, c, 1, 12, 20);
            step!(f1, c, d, a, b, 2, 17, 15);
            step!(f1, b, c, d, a, 3, 22, 10);
            step!(f1, a, b, c, d, 4, 7, 25);
            step!(f1, d, a, b, c, 5, 12, 20);
            step!(f1, c, d, a, b, 6, 17, 15);
            step!(f1, b, c, d, a, 7, 22, 10);
            step!(f1, a, b, c, d, 8, 7, 25);
            step!(f1, d, a, b, c, 9, 12, 20);
            step!(f1, c, d, a, b, 10, 17, 15);
            step!(f1, b, c, d, a, 11, 22, 10);
            step!(f1, a, b, c, d, 12, 7, 25);
            step!(f1, d, a, b, c, 13, 12, 20);
            step!(f1, c, d, a, b, 14, 17, 15);
            step!(f1, b, c, d, a, 15, 22, 10);
            step!(f2, a, b, c, d, 16, 5, 27);
            step!(f2, d, a, b, c, 17, 9, 23);
            step!(f2, c, d, a, b, 18, 14, 18);
            step!(f2, b, c, d, a, 19, 20, 12);
            step!(f2, a, b, c, d, 20, 5, 27);
            step!(f2, d, a, b, c, 21, 9, 23);
            step!(f2, c, d, a, b, 22, 14, 18);
            step!(f2, b, c, d, a, 23, 20, 12);
            step!(f2, a, b, c, d, 24, 5, 27);
            step!(f2, d, a, b, c, 25, 9, 23);
            step!(f2, c, d, a, b, 26, 14, 18);
            step!(f2, b, c, d, a, 27, 20, 12);
            step!(f2, a, b, c, d, 28, 5, 27);
            step!(f2, d, a, b, c, 29, 9, 23);
            step!(f2, c, d, a, b, 30, 14, 18);
            step!(f2, b, c, d, a, 31, 20, 12);
            step!(f3, a, b, c, d, 32, 4, 28);
            step!(f3, d, a, b, c, 33, 11, 21);
            step!(f3, c, d, a, b, 34, 16, 16);
            step!(f3, b, c, d, a, 35, 23, 9);
            step!(f3, a, b, c, d, 36, 4, 28);
            step!(f3, d, a, b, c, 37, 11, 21);
            step!(f3, c, d, a, b, 38, 16, 16);
            step!(f3, b, c, d, a, 39, 23, 9);
            step!(f3, a, b, c, d, 40, 4, 28);
            step!(f3, d, a, b, c, 41, 11, 21);
            step!(f3, c, d, a, b, 42, 16, 16);
            step!(f3, b, c, d, a, 43, 23, 9);
            step!(f3, a, b, c, d, 44, 4, 28);
            step!(f3, d, a, b, c, 45, 11, 21);
            step!(f3, c, d, a, b, 46, 16, 16);
            step!(f3, b, c, d, a, 47, 23, 9);
            step!(f4, a, b, c, d, 48, 6, 26);
            step!(f4, d, a, b, c, 49, 10, 22);
            step!(f4, c, d, a, b, 50, 15, 17);
            step!(f4, b, c, d, a, 51, 21, 11);
            step!(f4, a, b, c, d, 52, 6, 26);
            step!(f4, d, a, b, c, 53, 10, 22);
            step!(f4, c, d, a, b, 54, 15, 17);
            step!(f4, b, c, d, a, 55, 21, 11);
            step!(f4, a, b, c, d, 56, 6, 26);
            step!(f4, d, a, b, c, 57, 10, 22);
            step!(f4, c, d, a, b, 58, 15, 17);
            step!(f4, b, c, d, a, 59, 21, 11);
            step!(f4, a, b, c, d, 60, 6, 26);
            step!(f4, d, a, b, c, 61, 10, 22);
            step!(f4, c, d, a, b, 62, 15, 17);
            step!(f4, b, c, d, a, 63, 21, 11);
            state.v = [
                _mm256_add_epi32(a, a0),
                _mm256_add_epi32(b, b0),
                _mm256_add_epi32(c, c0),
                _mm256_add_epi32(d, d0),
            ];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn each(messages: &[Vec<u8>]) -> Vec<[u8; DIGEST_LEN]> {
        messages.iter().map(|m| md5(m)).collect()
    }

    #[test]
    fn known_digests_and_every_tail_length() {
        let v = md5_many(&[b"", b"abc", b"message digest"]);
        assert_eq!(hex(&v[0]), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(&v[1]), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(hex(&v[2]), "f96b697d7cb7938d525a2f31aaf161d0");
        // Every length across the one- and two-block tails, in lanes of different lengths.
        let messages: Vec<Vec<u8>> = (0..200)
            .map(|n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
        assert_eq!(md5_many(&refs), each(&messages));
        // The portable block function on its own.
        let mut s = IV;
        compress(&mut s, Message::new(b"abc").block(0));
        assert_eq!(digest_of(s), v[1]);
    }

    #[test]
    fn aggregate_sized_messages() {
        // A chunk's worth: eight near-1 MiB aggregates and a short last one, then one long
        // message left alone with short ones (it finishes on the scalar path).
        let mut messages: Vec<Vec<u8>> = (0..9u32)
            .map(|k| {
                (0..(1 << 20) - 1000 * k as usize)
                    .map(|i| (i as u32 ^ k.wrapping_mul(0x9e37_79b9)) as u8)
                    .collect()
            })
            .collect();
        messages[8].truncate(12_345);
        let refs: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
        assert_eq!(md5_many(&refs), each(&messages));
        let uneven = [vec![3u8; 3 << 20], vec![4u8; 100], vec![5u8; 70_000]];
        let refs: Vec<&[u8]> = uneven.iter().map(|m| m.as_slice()).collect();
        assert_eq!(md5_many(&refs), each(&uneven));
    }

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    proptest! {
        #[test]
        fn same_as_one_at_a_time(messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..20)) {
            let refs: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
            prop_assert_eq!(md5_many(&refs), each(&messages));
        }
    }
}

//! MD5 of two messages at once. MD5 is one long chain of dependent steps
//! (about 5 cycles a byte whatever the implementation), so a core runs
//! most of its units idle; two independent chains interleaved step by step
//! fill them: 1.3-1.7 against 2.6-2.7 ns a byte for `md-5` with its
//! assembly, two 50 KiB messages at a time, on this project's machines.
//! The aggregates of a request are sealed two at a time with it (see
//! `aggregation::seal_all`).

const INIT: [u32; 4] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476];

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

const S: [u32; 16] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];

fn words(block: &[u8; 64]) -> [u32; 16] {
    let mut m = [0u32; 16];
    for (w, chunk) in m.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
    }
    m
}

/// One 64-byte block into each of two states, the two computations
/// interleaved step by step.
#[inline(always)]
fn compress2(x: &mut [u32; 4], bx: &[u8; 64], y: &mut [u32; 4], by: &[u8; 64]) {
    let (mx, my) = (words(bx), words(by));
    let [mut a0, mut b0, mut c0, mut d0] = *x;
    let [mut a1, mut b1, mut c1, mut d1] = *y;
    macro_rules! step {
        ($i:expr) => {{
            const I: usize = $i;
            let (f0, f1, g) = match I / 16 {
                0 => ((b0 & c0) | (!b0 & d0), (b1 & c1) | (!b1 & d1), I),
                1 => (
                    (d0 & b0) | (!d0 & c0),
                    (d1 & b1) | (!d1 & c1),
                    (5 * I + 1) % 16,
                ),
                2 => (b0 ^ c0 ^ d0, b1 ^ c1 ^ d1, (3 * I + 5) % 16),
                _ => (c0 ^ (b0 | !d0), c1 ^ (b1 | !d1), (7 * I) % 16),
            };
            let s = S[(I / 16) * 4 + I % 4];
            let t0 = a0.wrapping_add(f0).wrapping_add(K[I]).wrapping_add(mx[g]);
            let t1 = a1.wrapping_add(f1).wrapping_add(K[I]).wrapping_add(my[g]);
            a0 = d0;
            d0 = c0;
            c0 = b0;
            b0 = b0.wrapping_add(t0.rotate_left(s));
            a1 = d1;
            d1 = c1;
            c1 = b1;
            b1 = b1.wrapping_add(t1.rotate_left(s));
        }};
    }
    macro_rules! steps16 {
        ($base:expr) => {
            step!($base);
            step!($base + 1);
            step!($base + 2);
            step!($base + 3);
            step!($base + 4);
            step!($base + 5);
            step!($base + 6);
            step!($base + 7);
            step!($base + 8);
            step!($base + 9);
            step!($base + 10);
            step!($base + 11);
            step!($base + 12);
            step!($base + 13);
            step!($base + 14);
            step!($base + 15);
        };
    }
    steps16!(0);
    steps16!(16);
    steps16!(32);
    steps16!(48);
    for (s, v) in x.iter_mut().zip([a0, b0, c0, d0]) {
        *s = s.wrapping_add(v);
    }
    for (s, v) in y.iter_mut().zip([a1, b1, c1, d1]) {
        *s = s.wrapping_add(v);
    }
}

/// A message as MD5 reads it: its full blocks, then one or two blocks of
/// its tail and padding.
struct Padded<'a> {
    full: &'a [u8],
    tail: [u8; 128],
    tail_blocks: usize,
}

impl<'a> Padded<'a> {
    fn new(message: &'a [u8]) -> Self {
        let full_len = message.len() / 64 * 64;
        let rest = &message[full_len..];
        let mut tail = [0u8; 128];
        tail[..rest.len()].copy_from_slice(rest);
        tail[rest.len()] = 0x80;
        let tail_blocks = if rest.len() < 56 { 1 } else { 2 };
        let end = tail_blocks * 64;
        tail[end - 8..end].copy_from_slice(&((message.len() as u64) * 8).to_le_bytes());
        Padded {
            full: &message[..full_len],
            tail,
            tail_blocks,
        }
    }

    fn blocks(&self) -> usize {
        self.full.len() / 64 + self.tail_blocks
    }

    fn block(&self, i: usize) -> &[u8; 64] {
        let full = self.full.len() / 64;
        let bytes = if i < full {
            &self.full[i * 64..i * 64 + 64]
        } else {
            &self.tail[(i - full) * 64..(i - full) * 64 + 64]
        };
        bytes.try_into().expect("64 bytes")
    }
}

fn digest(state: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// The MD5 digests of two messages.
pub fn digest_pair(x: &[u8], y: &[u8]) -> ([u8; 16], [u8; 16]) {
    let (px, py) = (Padded::new(x), Padded::new(y));
    let (mut sx, mut sy) = (INIT, INIT);
    let (nx, ny) = (px.blocks(), py.blocks());
    let both = nx.min(ny);
    for i in 0..both {
        compress2(&mut sx, px.block(i), &mut sy, py.block(i));
    }
    // The longer one goes on alone (its pair a dummy block into a dummy state).
    let (longer, state, n) = if nx > ny {
        (&px, &mut sx, nx)
    } else {
        (&py, &mut sy, ny)
    };
    let mut dummy = INIT;
    let zero = [0u8; 64];
    for i in both..n {
        compress2(state, longer.block(i), &mut dummy, &zero);
    }
    (digest(sx), digest(sy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};
    use proptest::prelude::*;

    #[test]
    fn every_padding_case() {
        // Tails of 0, 55, 56 (a second padding block) and 63 bytes, and
        // messages of unequal block counts either way round.
        let lengths = [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, 51_200];
        for lx in lengths {
            for ly in lengths {
                let x: Vec<u8> = (0..lx).map(|i| (i * 7 + 3) as u8).collect();
                let y: Vec<u8> = (0..ly).map(|i| (i * 13 + 1) as u8).collect();
                let (dx, dy) = digest_pair(&x, &y);
                assert_eq!(dx[..], Md5::digest(&x)[..], "{lx} bytes");
                assert_eq!(dy[..], Md5::digest(&y)[..], "{ly} bytes");
            }
        }
    }

    proptest! {
        #[test]
        fn any_pair_digests_as_md5(
            x in prop::collection::vec(any::<u8>(), 0..700),
            y in prop::collection::vec(any::<u8>(), 0..700),
        ) {
            let (dx, dy) = digest_pair(&x, &y);
            prop_assert_eq!(&dx[..], &Md5::digest(&x)[..]);
            prop_assert_eq!(&dy[..], &Md5::digest(&y)[..]);
        }
    }
}

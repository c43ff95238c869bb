//! Which producer lane a record travels in. Records of one partition key
//! always share a lane, and a lane sends one request at a time, which is what
//! keeps their order through retries.

/// FNV-1a over the key: cheap, stable across runs, good enough to spread keys
/// over a few lanes.
pub fn lane_of(key: &str, lanes: usize) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (hash % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_stable_and_spread() {
        assert_eq!(lane_of("device-1", 8), lane_of("device-1", 8));
        let mut used = [false; 8];
        for i in 0..1000 {
            used[lane_of(&format!("key-{i}"), 8)] = true;
        }
        assert!(used.iter().all(|u| *u));
        assert_eq!(lane_of("anything", 1), 0);
        assert_eq!(lane_of("anything", 0), 0);
    }
}

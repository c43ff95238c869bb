//! Kinesis sequence numbers: decimal strings without leading zeros, of up
//! to 129 digits, growing within a shard.

/// Whether sequence number `a` comes after `b`. Longer is greater; at equal
/// length the digits compare as text.
pub fn after(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_as_numbers_beyond_u128() {
        assert!(after("10", "9"));
        assert!(!after("9", "10"));
        assert!(!after("49680641", "49680641"));
        let big = "4".repeat(129);
        let bigger = format!("5{}", "4".repeat(128));
        assert!(after(&bigger, &big));
        assert!(!after(&big, &bigger));
    }
}

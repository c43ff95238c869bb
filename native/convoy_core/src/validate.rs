//! Checks on what a caller hands to `put`, against the Kinesis limits.

use crate::error::Error;

pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// A partition key is 1..256 Unicode characters.
pub fn partition_key(bytes: &[u8]) -> Result<&str, Error> {
    let key = std::str::from_utf8(bytes)
        .map_err(|_| Error::InvalidPartitionKey("must be valid UTF-8".into()))?;
    if key.is_empty() {
        return Err(Error::InvalidPartitionKey("must not be empty".into()));
    }
    // A key of at most 256 bytes has at most 256 characters: counting them
    // is only needed for longer ones.
    if key.len() <= MAX_PARTITION_KEY_CHARS {
        return Ok(key);
    }
    let chars = key.chars().count();
    if chars == 0 {
        return Err(Error::InvalidPartitionKey("must not be empty".into()));
    }
    if chars > MAX_PARTITION_KEY_CHARS {
        return Err(Error::InvalidPartitionKey(format!(
            "has {chars} characters, at most {MAX_PARTITION_KEY_CHARS} are allowed"
        )));
    }
    Ok(key)
}

/// An explicit hash key is a decimal integer in 0..2^128-1, written without
/// sign or leading zeros (the pattern Kinesis itself enforces).
pub fn explicit_hash_key(bytes: &[u8]) -> Result<&str, Error> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::InvalidExplicitHashKey("must be a decimal string".into()))?;
    let well_formed = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !well_formed {
        return Err(Error::InvalidExplicitHashKey(format!(
            "{text:?} is not a decimal integer"
        )));
    }
    text.parse::<u128>()
        .map_err(|_| Error::InvalidExplicitHashKey(format!("{text} is greater than 2^128-1")))?;
    Ok(text)
}

pub fn record_size(key: &str, data: &[u8], max: usize) -> Result<usize, Error> {
    // Kinesis counts the partition key against the record limit too.
    let size = key.len() + data.len();
    if size > max {
        Err(Error::RecordTooLarge { size, max })
    } else {
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_key_limits_count_characters_not_bytes() {
        assert!(partition_key(b"").is_err());
        assert!(partition_key("é".repeat(256).as_bytes()).is_ok());
        assert!(partition_key("é".repeat(257).as_bytes()).is_err());
        assert!(partition_key(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn explicit_hash_key_range() {
        let max = u128::MAX.to_string();
        assert_eq!(explicit_hash_key(b"0").unwrap(), "0");
        assert_eq!(explicit_hash_key(max.as_bytes()).unwrap(), max);
        assert!(explicit_hash_key(b"340282366920938463463374607431768211456").is_err());
        assert!(explicit_hash_key(b"-1").is_err());
        assert!(explicit_hash_key(b"01").is_err());
        assert!(explicit_hash_key(b"").is_err());
        assert!(explicit_hash_key(b"12a").is_err());
    }

    #[test]
    fn record_size_includes_the_key() {
        assert_eq!(record_size("ab", &[0; 8], 10).unwrap(), 10);
        assert!(matches!(
            record_size("abc", &[0; 8], 10),
            Err(Error::RecordTooLarge { size: 11, max: 10 })
        ));
    }
}

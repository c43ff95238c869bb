//! How a consumer's dispatcher takes a batch read: in chunks, so that its
//! heap holds one chunk's records at a time and most chunks are built within
//! a normal scheduler's time slice (about 0.3 µs a record of 100 bytes).

use crate::aggregation;

/// At most this many Kinesis records in a chunk.
pub const MAX_RECORDS: usize = 500;
/// At most this many bytes of data in a chunk, unless its only record is
/// larger.
pub const MAX_BYTES: usize = 1024 * 1024;

/// The next chunk of a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// How many of the batch's first records it holds.
    pub records: usize,
    /// Too much work for a normal scheduler: an aggregated record, which
    /// is checked by its digest and may unpack into thousands, or a record
    /// of more than `MAX_BYTES` (Kinesis takes records of up to 10 MiB).
    pub dirty: bool,
}

/// The chunk at the front of a batch whose records' data is `datas`.
pub fn next<'a>(datas: impl IntoIterator<Item = &'a [u8]>) -> Chunk {
    let mut chunk = Chunk {
        records: 0,
        dirty: false,
    };
    let mut bytes = 0;
    for data in datas.into_iter().take(MAX_RECORDS) {
        if chunk.records > 0 && bytes + data.len() > MAX_BYTES {
            break;
        }
        bytes += data.len();
        chunk.dirty |= aggregation::looks_aggregated(data);
        chunk.records += 1;
    }
    chunk.dirty |= bytes > MAX_BYTES;
    chunk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(records: usize, dirty: bool) -> Chunk {
        Chunk { records, dirty }
    }

    #[test]
    fn an_empty_batch_has_an_empty_chunk() {
        assert_eq!(next([]), chunk(0, false));
    }

    #[test]
    fn at_most_max_records() {
        let data = [0u8; 100];
        assert_eq!(next(vec![&data[..]; 1_200]), chunk(MAX_RECORDS, false));
        assert_eq!(next(vec![&data[..]; 499]), chunk(499, false));
    }

    #[test]
    fn at_most_max_bytes_unless_one_record_is_larger() {
        let quarter = vec![0u8; MAX_BYTES / 4];
        assert_eq!(next(vec![&quarter[..]; 6]), chunk(4, false));
        assert_eq!(next(vec![&quarter[..]; 4]), chunk(4, false));
        // A record larger than that is a chunk of its own, built dirty.
        let big = vec![0u8; MAX_BYTES + 1];
        assert_eq!(next([&big[..], &quarter[..]]), chunk(1, true));
        assert_eq!(next([&quarter[..], &big[..]]), chunk(1, false));
    }

    #[test]
    fn an_aggregated_record_makes_its_chunk_dirty() {
        let plain = [7u8; 40];
        let mut aggregator = aggregation::Aggregator::new();
        aggregator.add("k", None, b"v");
        let aggregated = aggregator.finish();
        assert!(aggregation::looks_aggregated(&aggregated));
        let mut batch = vec![&plain[..]; MAX_RECORDS];
        batch.push(&aggregated[..]);
        assert_eq!(next(batch.iter().copied()), chunk(MAX_RECORDS, false));
        assert_eq!(next(batch[1..].iter().copied()), chunk(MAX_RECORDS, true));
    }
}

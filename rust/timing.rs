//! Recorded pacing of a stream: when each chunk arrived, stored beside the entry so that a hit
//! can be replayed at the recorded pace (`CacheControl(replay="recorded")`).
//!
//! Format of a timing section (all varints unsigned LEB128, as in [`crate::codec`]):
//!
//! ```text
//! unit_us varint | count varint | delta_0 varint | ... | delta_{count-1} varint
//! ```
//!
//! Chunk `i` arrived `unit_us * (delta_0 + ... + delta_i)` microseconds after the request
//! started: `delta_0` is the time to first chunk, the others are the inter-chunk gaps. Times are
//! quantized *before* they are differenced (each arrival is rounded to the nearest unit of the
//! request's clock), so rounding never accumulates: every recorded offset is within half a
//! unit of the real one. At the default unit of 10 µs a gap under 1.28 ms takes one byte and a
//! gap under 164 ms two, so a model's stream (bursts of back-to-back chunks, 10-80 ms between
//! tokens) costs 1-2 bytes per chunk.
//!
//! Decoding is bounded like the codec: a count larger than the bytes that remain, a varint past
//! 64 bits, a unit outside 1 µs..1 s, trailing bytes, or a total above the caller's cap (so a
//! planted entry cannot make a replay sleep for hours) are [`CodecError`]s.

use crate::codec::{write_varint, CodecError, Reader, Result};

/// The default quantum of recorded times, microseconds.
pub const DEFAULT_UNIT_US: u64 = 10;
/// The largest unit a timing section may declare (1 s).
pub const MAX_UNIT_US: u64 = 1_000_000;

/// Records chunk arrival times as a timing section, one varint per chunk.
#[derive(Debug, Clone)]
pub struct PaceRecorder {
    unit_us: u64,
    unit_ns: u64,
    /// The last recorded arrival, in units since the start.
    last: u64,
    count: u64,
    deltas: Vec<u8>,
    max_bytes: usize,
    /// More than `max_bytes` of deltas: recording stopped, no section is produced.
    full: bool,
}

impl PaceRecorder {
    /// A recorder quantizing to `unit_us` microseconds (clamped to 1..=[`MAX_UNIT_US`]) that
    /// gives up past `max_bytes` bytes of deltas.
    pub fn new(unit_us: u64, max_bytes: usize) -> Self {
        let unit_us = unit_us.clamp(1, MAX_UNIT_US);
        PaceRecorder {
            unit_us,
            unit_ns: unit_us * 1000,
            last: 0,
            count: 0,
            deltas: Vec::new(),
            max_bytes,
            full: false,
        }
    }

    /// Records one chunk that arrived `elapsed_ns` nanoseconds after the start. An arrival
    /// earlier than the previous one (a clock that stepped back) is recorded as a zero gap.
    #[inline]
    pub fn record(&mut self, elapsed_ns: u64) {
        if self.full {
            return;
        }
        let q = (elapsed_ns.saturating_add(self.unit_ns / 2) / self.unit_ns).max(self.last);
        let before = self.deltas.len();
        write_varint(&mut self.deltas, q - self.last);
        if self.deltas.len() > self.max_bytes {
            self.full = true;
            self.deltas.truncate(before);
            self.deltas.shrink_to_fit();
            return;
        }
        self.last = q;
        self.count += 1;
    }

    /// Chunks recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The timing section, or None if recording stopped at the byte bound.
    pub fn encode(&self) -> Option<Vec<u8>> {
        if self.full {
            return None;
        }
        let mut out = Vec::with_capacity(self.deltas.len() + 12);
        write_varint(&mut out, self.unit_us);
        write_varint(&mut out, self.count);
        out.extend_from_slice(&self.deltas);
        Some(out)
    }
}

/// The arrival offsets (microseconds since the request's start, non-decreasing) of a timing
/// section. `max_total_us` bounds the last offset.
pub fn decode(data: &[u8], max_total_us: u64) -> Result<Vec<u64>> {
    let mut r = Reader::new(data);
    let unit = r.varint("timing unit")?;
    if unit == 0 || unit > MAX_UNIT_US {
        return Err(CodecError::Corrupt(format!(
            "timing unit of {unit} µs is outside 1..={MAX_UNIT_US}"
        )));
    }
    // every delta takes at least one byte: a corrupt count cannot allocate more than the input
    let count = r.count("timing count", 1)?;
    let mut out = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for _ in 0..count {
        let delta = r.varint("timing delta")?;
        total = delta
            .checked_mul(unit)
            .and_then(|d| total.checked_add(d))
            .filter(|t| *t <= max_total_us)
            .ok_or_else(|| {
                CodecError::Corrupt(format!(
                    "recorded timing exceeds {max_total_us} µs in total"
                ))
            })?;
        out.push(total);
    }
    if r.remaining() != 0 {
        return Err(CodecError::TrailingBytes(r.remaining()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY_US: u64 = 86_400_000_000;

    #[test]
    fn round_trip_within_half_a_unit_without_drift() {
        let mut rec = PaceRecorder::new(10, 1 << 20);
        let arrivals: Vec<u64> = (0..500u64).map(|i| 250_000_000 + i * 20_004_999).collect();
        for &t in &arrivals {
            rec.record(t);
        }
        let section = rec.encode().unwrap();
        let offsets = decode(&section, DAY_US).unwrap();
        assert_eq!(offsets.len(), 500);
        for (got_us, want_ns) in offsets.iter().zip(&arrivals) {
            assert!((*got_us as i64 * 1000 - *want_ns as i64).abs() <= 5_000);
        }
    }

    #[test]
    fn typical_gaps_cost_at_most_two_bytes() {
        let mut rec = PaceRecorder::new(DEFAULT_UNIT_US, 1 << 20);
        let mut t = 300_000_000u64; // 300 ms to first chunk: 3 bytes, once
        for i in 0..1000u64 {
            t += if i % 3 == 0 {
                0
            } else {
                5_000_000 + (i % 17) * 9_000_000
            }; // 0-149 ms
            rec.record(t);
        }
        let section = rec.encode().unwrap();
        assert!(section.len() <= 2 * 1000 + 8, "{} bytes", section.len());
    }

    #[test]
    fn a_clock_that_steps_back_records_zero_gaps() {
        let mut rec = PaceRecorder::new(10, 1 << 20);
        rec.record(1_000_000);
        rec.record(500_000);
        let offsets = decode(&rec.encode().unwrap(), DAY_US).unwrap();
        assert_eq!(offsets, vec![1000, 1000]);
    }

    #[test]
    fn the_byte_bound_stops_recording() {
        let mut rec = PaceRecorder::new(1, 4);
        for i in 0..10 {
            rec.record(i * 1_000_000);
        }
        assert!(rec.encode().is_none());
    }

    #[test]
    fn corrupt_sections_are_refused() {
        assert!(decode(b"", DAY_US).is_err());
        assert!(decode(&[0, 0], DAY_US).is_err()); // unit 0
        assert!(decode(&[10, 5, 1, 1], DAY_US).is_err()); // count beyond the input
        assert!(decode(&[10, 1, 1, 7], DAY_US).is_err()); // trailing byte
        assert!(decode(&[10, 1, 0xff], DAY_US).is_err()); // truncated varint
        let mut huge = vec![10, 2];
        write_varint(&mut huge, u64::MAX / 10);
        write_varint(&mut huge, u64::MAX / 10);
        assert!(decode(&huge, u64::MAX).is_err()); // overflow
        assert!(decode(&[10, 1, 101], 1000).is_err()); // above the cap
        assert_eq!(decode(&[10, 1, 100], 1000).unwrap(), vec![1000]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&data, DAY_US);
        }

        #[test]
        fn recorded_offsets_round_trip(
            unit in 1u64..1000,
            mut arrivals in proptest::collection::vec(0u64..10_000_000_000, 0..200),
        ) {
            arrivals.sort_unstable();
            let mut rec = PaceRecorder::new(unit, 1 << 20);
            for &t in &arrivals {
                rec.record(t);
            }
            let offsets = decode(&rec.encode().unwrap(), DAY_US).unwrap();
            prop_assert_eq!(offsets.len(), arrivals.len());
            for (got_us, want_ns) in offsets.iter().zip(&arrivals) {
                let err = (*got_us as i128) * 1000 - (*want_ns as i128);
                prop_assert!(err.abs() <= (unit as i128) * 500);
            }
        }
    }
}

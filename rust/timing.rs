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

use std::time::Instant;

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

/// Nanoseconds since its creation, read once per chunk (a `ChunkLog`'s arrival stamps).
///
/// `Instant::now()` costs ~26 ns in the VM this is developed on (the vDSO's ordered TSC read
/// and its seqlock). Where the kernel itself keeps time with the TSC (Linux on x86-64 whose
/// clocksource is `tsc`: an invariant TSC, synchronised across cores), a stamp is a raw
/// `rdtsc` (~10 ns) scaled from the last `Instant` reading, which is taken again after a
/// millisecond's worth of ticks (or when the TSC reads behind it, e.g. on another core): a
/// stamp is within about a microsecond of `Instant`'s (the recorded unit is 10 µs). Elsewhere,
/// and in a process's first 100 ms of stamps (the tick rate is measured over them), every
/// stamp is `Instant::now()`.
#[derive(Debug, Clone)]
pub struct StampClock {
    start: Instant,
    sync: Option<TscSync>,
}

/// The last `Instant` reading and the TSC read with it.
#[derive(Debug, Clone, Copy)]
struct TscSync {
    tsc: u64,
    ns: u64,
    /// Nanoseconds per tick, 32.32 fixed point.
    rate: u64,
    /// Ticks after `tsc` within which a stamp is extrapolated.
    window: u64,
}

impl Default for StampClock {
    fn default() -> Self {
        Self::new()
    }
}

impl StampClock {
    pub fn new() -> Self {
        tsc::start_calibration();
        StampClock {
            start: Instant::now(),
            sync: None,
        }
    }

    /// Nanoseconds since the clock was created.
    #[inline]
    pub fn elapsed_ns(&mut self) -> u64 {
        if let Some(sync) = self.sync {
            let ticks = tsc::read().wrapping_sub(sync.tsc);
            if ticks < sync.window {
                // < 2^64: window * rate is about 1 ms in 32.32 fixed point
                return sync.ns + ((u128::from(ticks) * u128::from(sync.rate)) >> 32) as u64;
            }
        }
        self.resync()
    }

    #[cold]
    fn resync(&mut self) -> u64 {
        let now = Instant::now();
        if tsc::calibrated_by(now) {
            if let Some((now, ticks)) = tsc::pair() {
                let ns = ns_between(self.start, now);
                self.sync = tsc::rate(now, ticks).map(|rate| TscSync {
                    tsc: ticks,
                    ns,
                    rate,
                    window: tsc::window(rate),
                });
                return ns;
            }
        }
        self.sync = None;
        ns_between(self.start, now)
    }

    /// True while stamps are extrapolated from the TSC (for tests).
    pub fn uses_tsc(&self) -> bool {
        self.sync.is_some()
    }
}

fn ns_between(start: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX)
}

/// The TSC where it is as good a clock as the kernel's own; a stub that never is elsewhere.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tsc {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// The span over which a process measures the tick rate before it uses it.
    const CALIBRATION_SPAN: Duration = Duration::from_millis(100);
    /// An `Instant` is read again after this many nanoseconds' worth of ticks.
    const RESYNC_NS: u128 = 1_000_000;
    /// A TSC read and an `Instant` read further apart than this (an interruption between
    /// them) are not paired (about 0.7 µs at 3 GHz).
    const MAX_PAIR_TICKS: u64 = 2_000;

    static USABLE: OnceLock<bool> = OnceLock::new();
    /// The process's first pair: the tick rate is measured from it.
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();

    /// Takes the first pair (once per process, where the TSC is usable).
    pub(super) fn start_calibration() {
        if ORIGIN.get().is_none() {
            if let Some(first) = pair() {
                let _ = ORIGIN.set(first);
            }
        }
    }

    /// The tick rate can be measured at `now` (`CALIBRATION_SPAN` after the first pair).
    pub(super) fn calibrated_by(now: Instant) -> bool {
        ORIGIN
            .get()
            .is_some_and(|(first, _)| now.saturating_duration_since(*first) >= CALIBRATION_SPAN)
    }

    #[inline]
    pub(super) fn read() -> u64 {
        // SAFETY: RDTSC exists on every x86-64 CPU and reads no memory; it faults only if the
        // process disabled it (prctl PR_SET_TSC), which would break the kernel's vDSO clock too.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// The kernel keeps time with the TSC: it found it invariant and synchronised.
    fn usable() -> bool {
        *USABLE.get_or_init(|| {
            std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|source| source.trim() == "tsc")
        })
    }

    /// An `Instant` and the TSC at the same moment, or None (not usable, or interrupted).
    pub(super) fn pair() -> Option<(Instant, u64)> {
        if !usable() {
            return None;
        }
        for _ in 0..3 {
            let before = read();
            let now = Instant::now();
            let after = read();
            let spread = after.wrapping_sub(before);
            if spread < MAX_PAIR_TICKS {
                return Some((now, before + spread / 2));
            }
        }
        None
    }

    /// Nanoseconds per tick (32.32), measured from the process's first pair to this one; None
    /// until they are `CALIBRATION_SPAN` apart.
    pub(super) fn rate(now: Instant, ticks: u64) -> Option<u64> {
        let &(first, first_ticks) = ORIGIN.get()?;
        let span = now.checked_duration_since(first)?;
        let elapsed_ticks = ticks.checked_sub(first_ticks).filter(|&t| t > 0)?;
        if span < CALIBRATION_SPAN {
            return None;
        }
        let rate = (span.as_nanos() << 32) / u128::from(elapsed_ticks);
        u64::try_from(rate).ok().filter(|&r| r > 0)
    }

    /// The ticks in `RESYNC_NS` at `rate`.
    pub(super) fn window(rate: u64) -> u64 {
        u64::try_from((RESYNC_NS << 32) / u128::from(rate)).unwrap_or(u64::MAX)
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod tsc {
    use std::time::Instant;

    pub(super) fn read() -> u64 {
        0
    }

    pub(super) fn start_calibration() {}

    pub(super) fn calibrated_by(_now: Instant) -> bool {
        false
    }

    pub(super) fn pair() -> Option<(Instant, u64)> {
        None
    }

    pub(super) fn rate(_now: Instant, _ticks: u64) -> Option<u64> {
        None
    }

    pub(super) fn window(_rate: u64) -> u64 {
        0
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

    #[test]
    fn stamps_stay_within_microseconds_of_instant() {
        // past the calibration span, so that TSC stamps (where usable) are checked too
        let mut clock = StampClock::new();
        let start = clock.start;
        let until = start + std::time::Duration::from_millis(250);
        let mut checked = 0u64;
        let mut extrapolated = 0u64;
        loop {
            let before = ns_between(start, Instant::now());
            let stamp = clock.elapsed_ns();
            let after = ns_between(start, Instant::now());
            if clock.uses_tsc() {
                extrapolated += 1;
            }
            // the stamp was taken between the two readings, give or take the pairing error
            assert!(
                stamp + 5_000 >= before && stamp <= after + 5_000,
                "{before} <= {stamp} <= {after}"
            );
            checked += 1;
            if Instant::now() >= until {
                break;
            }
        }
        assert!(checked > 1000);
        let tsc_clock = std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|s| s.trim() == "tsc");
        if cfg!(all(target_arch = "x86_64", target_os = "linux")) && tsc_clock {
            assert!(extrapolated > 0, "the TSC was never used");
        } else {
            assert_eq!(extrapolated, 0);
        }
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

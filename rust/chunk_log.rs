//! The chunk log behind every in-flight stream: an append-only sequence of chunks with one
//! cursor per consumer, a bound on how far the producer may run ahead of its slowest holding
//! consumer (`max_lag`), and a byte budget past which the log stops retaining the whole stream
//! and keeps only what some consumer has not read yet.
//!
//! Pure and non-blocking: every operation returns at once. The Python layer parks on events
//! and calls back in when something changed (see `chengeta_ai.layers.fanout`).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes consumer ids, the log's own sequence numbers (never outside input, so no flooding
/// to defend against): one multiplication per lookup instead of SipHash's rounds, on the
/// per-chunk path (`push_taking` looks its consumer up).
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (hashbrown's tag) depend on every bit of the id
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Cursors = HashMap<u64, Cursor, BuildHasherDefault<IdHasher>>;

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The consumer id is not attached (never was, or already detached).
    UnknownConsumer(u64),
    /// The consumer's next chunk was already dropped (the log stopped retaining the stream
    /// after it outgrew its byte budget, and this consumer had fallen behind).
    Lagged {
        consumer: u64,
        position: u64,
        first_retained: u64,
    },
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::UnknownConsumer(id) => write!(f, "consumer {id} is not attached"),
            LogError::Lagged {
                consumer,
                position,
                first_retained,
            } => write!(
                f,
                "consumer {consumer} lagged: it needs chunk {position} but the stream outgrew \
                 its retention budget and chunks before {first_retained} were dropped"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Index of the next chunk this consumer will read.
    position: u64,
    /// Chunks before this index were consumed. A read hands out a batch and acknowledges the
    /// previous one: backpressure counts from here, so chunks handed out but still in a
    /// consumer's batch never let the producer run further ahead.
    acked: u64,
    /// Whether this consumer holds the producer back (false once detached as a laggard).
    holds: bool,
}

/// Counters describing the life of one log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub pushed: u64,
    pub delivered: u64,
    pub attached: u64,
    pub detached_laggards: u64,
    pub lag_errors: u64,
    pub dropped: u64,
    pub peak_retained: u64,
}

/// An append-only chunk log with per-consumer cursors. See the module docs.
#[derive(Debug)]
pub struct ChunkLog<T> {
    items: VecDeque<(T, u64)>,
    /// Absolute index of `items[0]`.
    base: u64,
    bytes: u64,
    max_lag: u64,
    max_bytes: Option<u64>,
    /// True while the whole stream is retained (nothing dropped, within budget).
    retaining: bool,
    closed: bool,
    cursors: Cursors,
    next_id: u64,
    stats: LogStats,
}

impl<T> ChunkLog<T> {
    /// A new, open, empty log. `max_lag` (at least 1) bounds how many chunks the producer may
    /// be ahead of the slowest holding consumer; `max_bytes` bounds the retained stream.
    pub fn new(max_lag: u64, max_bytes: Option<u64>) -> Self {
        ChunkLog {
            items: VecDeque::new(),
            base: 0,
            bytes: 0,
            max_lag: max_lag.max(1),
            max_bytes,
            retaining: true,
            closed: false,
            cursors: Cursors::default(),
            next_id: 0,
            stats: LogStats::default(),
        }
    }

    /// Number of chunks ever pushed (the absolute index one past the last chunk).
    pub fn end(&self) -> u64 {
        self.base + self.items.len() as u64
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True while every chunk since the first is still held (a late joiner can start at 0).
    pub fn is_retaining(&self) -> bool {
        self.retaining
    }

    pub fn retained_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn consumers(&self) -> usize {
        self.cursors.len()
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// Attaches a consumer at the first chunk. `None` once the log no longer retains the
    /// start of the stream: a new caller cannot get the whole sequence from it.
    pub fn attach(&mut self) -> Option<u64> {
        if !self.retaining {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.cursors.insert(
            id,
            Cursor {
                position: self.base,
                acked: self.base,
                holds: true,
            },
        );
        self.stats.attached += 1;
        Some(id)
    }

    /// Removes a consumer; returns how many remain. Unknown ids are ignored.
    pub fn detach(&mut self, id: u64) -> usize {
        self.cursors.remove(&id);
        self.trim();
        self.cursors.len()
    }

    /// How many chunks the producer may push before it must wait for a holding consumer.
    /// With no holding consumer the producer is never held back.
    pub fn headroom(&self) -> u64 {
        match self.slowest_holding() {
            None => self.max_lag,
            Some(slowest) => self.max_lag.saturating_sub(self.end() - slowest),
        }
    }

    /// The lowest acknowledged position among the consumers that hold the producer back.
    fn slowest_holding(&self) -> Option<u64> {
        self.cursors
            .values()
            .filter(|c| c.holds)
            .map(|c| c.acked)
            .min()
    }

    /// Stops the consumers at the slowest position from holding the producer back (the
    /// "detach" slow-consumer policy). Returns how many were released: none when every
    /// holding consumer is at the same position (nobody is ahead, so the producer waits).
    pub fn release_slowest(&mut self) -> usize {
        let Some(slowest) = self.slowest_holding() else {
            return 0;
        };
        if !self.cursors.values().any(|c| c.holds && c.acked > slowest) {
            return 0;
        }
        let mut released = 0;
        for c in self.cursors.values_mut() {
            if c.holds && c.acked == slowest {
                c.holds = false;
                released += 1;
            }
        }
        self.stats.detached_laggards += released as u64;
        self.trim();
        released
    }

    /// Appends one chunk of `nbytes` bytes. Returns true when this push made the log stop
    /// retaining the whole stream (the byte budget was exceeded for the first time).
    pub fn push(&mut self, item: T, nbytes: u64) -> bool {
        self.items.push_back((item, nbytes));
        self.bytes += nbytes;
        self.stats.pushed += 1;
        let mut overflowed = false;
        if self.retaining {
            if let Some(limit) = self.max_bytes {
                if self.bytes > limit {
                    self.retaining = false;
                    overflowed = true;
                }
            }
        }
        self.trim();
        let retained = self.items.len() as u64;
        if retained > self.stats.peak_retained {
            self.stats.peak_retained = retained;
        }
        overflowed
    }

    /// True when this consumer may read the next upstream chunk itself: the stream is open,
    /// the consumer has read everything pushed so far, and the producer is not held back.
    pub fn ready_to_pull(&self, id: u64) -> bool {
        !self.closed
            && self.headroom() > 0
            && self
                .cursors
                .get(&id)
                .is_some_and(|c| c.position == self.end())
    }

    /// `push`, then, if consumer `id` had read everything before it, hands that consumer the
    /// new chunk as a read of one would (acknowledging its previous batch). Returns
    /// `(overflowed, taken)`. The consumer that pulled a chunk keeps it in hand instead of
    /// reading it back: one call per chunk on a lone caller's miss instead of three.
    pub fn push_taking(&mut self, item: T, nbytes: u64, id: u64) -> (bool, bool) {
        let end = self.end();
        let caught_up = self.cursors.get(&id).is_some_and(|c| c.position == end);
        let overflowed = self.push(item, nbytes);
        if !caught_up {
            return (overflowed, false);
        }
        if let Some(cursor) = self.cursors.get_mut(&id) {
            cursor.acked = cursor.position;
            cursor.position += 1;
            cursor.holds = true;
        }
        self.stats.delivered += 1;
        if !self.retaining {
            self.trim();
        }
        (overflowed, true)
    }

    /// Marks the stream finished (successfully or not): consumers drain what is left.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Acknowledges the consumer's previous batch, then visits up to `max_n` chunks from its
    /// cursor and advances it. A consumer that reaches the live edge holds the producer again
    /// if it had been released.
    pub fn read(
        &mut self,
        id: u64,
        max_n: usize,
        mut visit: impl FnMut(&T),
    ) -> Result<usize, LogError> {
        let base = self.base;
        let end = self.end();
        let cursor = self
            .cursors
            .get_mut(&id)
            .ok_or(LogError::UnknownConsumer(id))?;
        if cursor.position < base {
            self.stats.lag_errors += 1;
            return Err(LogError::Lagged {
                consumer: id,
                position: cursor.position,
                first_retained: base,
            });
        }
        cursor.acked = cursor.position;
        let start = (cursor.position - base) as usize;
        let n = ((end - cursor.position) as usize).min(max_n);
        for (item, _) in self.items.range(start..start + n) {
            visit(item);
        }
        cursor.position += n as u64;
        if cursor.position == end {
            cursor.holds = true;
        }
        self.stats.delivered += n as u64;
        if n > 0 && !self.retaining {
            self.trim();
        }
        Ok(n)
    }

    /// How many chunks are ready for this consumer (0 if unknown).
    pub fn available(&self, id: u64) -> u64 {
        self.cursors
            .get(&id)
            .map_or(0, |c| self.end().saturating_sub(c.position))
    }

    /// Visits every chunk of the whole stream, in order; `false` if the start was dropped.
    pub fn for_each_retained(&self, mut visit: impl FnMut(&T)) -> bool {
        if !self.retaining {
            return false;
        }
        for (item, _) in &self.items {
            visit(item);
        }
        true
    }

    /// Once the log no longer retains the stream, drops every chunk that all holding consumers
    /// have read: a released laggard does not pin memory, and may find its next chunk gone.
    fn trim(&mut self) {
        if self.retaining {
            return;
        }
        let keep_from = self
            .cursors
            .values()
            .filter(|c| c.holds)
            .map(|c| c.position)
            .min()
            .unwrap_or(self.end());
        while self.base < keep_from {
            match self.items.pop_front() {
                Some((_, nbytes)) => {
                    self.bytes -= nbytes;
                    self.base += 1;
                    self.stats.dropped += 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads everything available and consumes it (a second, empty read acknowledges it).
    fn read_all(log: &mut ChunkLog<u32>, id: u64) -> Result<Vec<u32>, LogError> {
        let mut out = Vec::new();
        log.read(id, usize::MAX, |x| out.push(*x))?;
        log.read(id, 0, |_| {})?;
        Ok(out)
    }

    #[test]
    fn every_consumer_sees_the_whole_sequence_in_order() {
        let mut log = ChunkLog::new(100, None);
        let a = log.attach().unwrap();
        log.push(1, 1);
        log.push(2, 1);
        let b = log.attach().unwrap();
        log.push(3, 1);
        assert_eq!(read_all(&mut log, a).unwrap(), vec![1, 2, 3]);
        assert_eq!(read_all(&mut log, b).unwrap(), vec![1, 2, 3]);
        log.push(4, 1);
        assert_eq!(read_all(&mut log, b).unwrap(), vec![4]);
        assert_eq!(log.stats().delivered, 7);
    }

    #[test]
    fn headroom_follows_the_slowest_holding_consumer() {
        let mut log = ChunkLog::new(3, None);
        let slow = log.attach().unwrap();
        let fast = log.attach().unwrap();
        assert_eq!(log.headroom(), 3);
        for i in 0..3 {
            log.push(i, 1);
        }
        read_all(&mut log, fast).unwrap();
        assert_eq!(log.headroom(), 0);
        assert_eq!(log.release_slowest(), 1);
        assert_eq!(log.headroom(), 3);
        // the released consumer holds again once it catches up
        read_all(&mut log, slow).unwrap();
        assert_eq!(log.headroom(), 3);
        log.detach(slow);
        log.detach(fast);
        assert_eq!(log.headroom(), 3);
    }

    #[test]
    fn over_budget_the_log_drops_what_everyone_read_and_refuses_joiners() {
        let mut log = ChunkLog::new(100, Some(10));
        let a = log.attach().unwrap();
        let b = log.attach().unwrap();
        for i in 0..3 {
            assert!(!log.push(i, 3));
        }
        assert!(log.push(3, 3));
        assert!(!log.is_retaining());
        assert!(log.attach().is_none());
        assert_eq!(read_all(&mut log, a).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(log.retained_bytes(), 12, "b has read nothing yet");
        assert_eq!(read_all(&mut log, b).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(log.retained_bytes(), 0);
        assert!(!log.for_each_retained(|_| {}));
    }

    #[test]
    fn a_released_laggard_behind_the_dropped_part_gets_lagged() {
        let mut log = ChunkLog::new(2, Some(1));
        let fast = log.attach().unwrap();
        let slow = log.attach().unwrap();
        log.push(0, 5);
        log.push(1, 5);
        assert_eq!(log.retained_bytes(), 10, "both still hold chunk 0");
        read_all(&mut log, fast).unwrap();
        assert_eq!(log.headroom(), 0);
        assert_eq!(log.release_slowest(), 1);
        assert_eq!(
            log.retained_bytes(),
            0,
            "only the released laggard needed them"
        );
        let err = log.read(slow, 1, |_| {}).unwrap_err();
        assert_eq!(
            err,
            LogError::Lagged {
                consumer: slow,
                position: 0,
                first_retained: 2
            }
        );
        assert_eq!(log.stats().lag_errors, 1);
        assert_eq!(
            log.read(99, 1, |_| {}).unwrap_err(),
            LogError::UnknownConsumer(99)
        );
    }

    #[test]
    fn consumers_at_the_same_position_are_never_released() {
        let mut log = ChunkLog::new(1, None);
        let _a = log.attach().unwrap();
        let _b = log.attach().unwrap();
        log.push(0, 1);
        assert_eq!(log.headroom(), 0);
        assert_eq!(log.release_slowest(), 0);
    }

    #[test]
    fn a_batch_handed_out_counts_as_consumed_only_at_the_next_read() {
        let mut log = ChunkLog::new(4, None);
        let c = log.attach().unwrap();
        for i in 0..4 {
            log.push(i, 1);
        }
        let mut batch = Vec::new();
        log.read(c, 10, |x| batch.push(*x)).unwrap();
        assert_eq!(batch, vec![0, 1, 2, 3]);
        assert_eq!(log.headroom(), 0, "the batch is still being consumed");
        log.read(c, 10, |_| {}).unwrap();
        assert_eq!(log.headroom(), 4);
    }

    #[test]
    fn a_caught_up_consumer_takes_the_chunk_it_pulled() {
        let mut log = ChunkLog::new(2, None);
        let a = log.attach().unwrap();
        let b = log.attach().unwrap();
        assert!(log.ready_to_pull(a));
        assert_eq!(log.push_taking(0, 1, a), (false, true));
        // b has not read chunk 0: it reads it as usual; a is caught up again
        assert!(log.ready_to_pull(a));
        assert!(!log.ready_to_pull(b));
        assert_eq!(log.push_taking(1, 1, a), (false, true));
        // two chunks ahead of b (max_lag 2): nobody may pull
        assert_eq!(log.headroom(), 0);
        assert!(!log.ready_to_pull(a));
        assert_eq!(read_all(&mut log, b).unwrap(), vec![0, 1]);
        // b has not read chunk 2 (a took it): a chunk b pushes now is not b's to take
        assert_eq!(log.push_taking(2, 1, a), (false, true));
        assert_eq!(log.push_taking(3, 1, b), (false, false));
        assert_eq!(read_all(&mut log, b).unwrap(), vec![2, 3]);
        assert_eq!(log.stats().delivered, 7);
        log.close();
        assert!(!log.ready_to_pull(a));
        assert!(!log.ready_to_pull(99));
    }

    #[test]
    fn a_taken_chunk_is_dropped_once_nobody_needs_it() {
        let mut log = ChunkLog::new(8, Some(1));
        let a = log.attach().unwrap();
        assert_eq!(log.push_taking(0, 5, a), (true, true));
        assert_eq!(
            log.retained_bytes(),
            0,
            "a holds it in hand, nobody else needs it"
        );
        assert_eq!(log.push_taking(1, 5, a), (false, true));
        assert_eq!(log.retained_bytes(), 0);
        assert_eq!(read_all(&mut log, a).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn retained_stream_is_visited_in_order() {
        let mut log = ChunkLog::new(4, None);
        for i in 0..10 {
            log.push(i, 1);
        }
        let mut seen = Vec::new();
        assert!(log.for_each_retained(|x| seen.push(*x)));
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(log.stats().peak_retained, 10);
    }

    #[test]
    fn random_schedules_deliver_exact_sequences() {
        // a tiny deterministic xorshift so the test needs no extra crate
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut rnd = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..200 {
            let mut log = ChunkLog::new(1 + rnd(8), None);
            let mut seen: HashMap<u64, Vec<u32>> = HashMap::new();
            let total = rnd(50) as u32;
            let mut pushed = 0;
            while pushed < total || seen.is_empty() {
                match rnd(3) {
                    0 if seen.len() < 8 => {
                        if let Some(id) = log.attach() {
                            seen.insert(id, Vec::new());
                        }
                    }
                    1 if pushed < total && log.headroom() > 0 => {
                        log.push(pushed, 1);
                        pushed += 1;
                    }
                    _ => {
                        let ids: Vec<u64> = seen.keys().copied().collect();
                        if let Some(&id) = ids.get(rnd(ids.len().max(1) as u64) as usize) {
                            let v = seen.get_mut(&id).unwrap();
                            log.read(id, rnd(4) as usize + 1, |x| v.push(*x)).unwrap();
                        }
                        if pushed < total && log.headroom() == 0 {
                            log.release_slowest();
                        }
                    }
                }
            }
            log.close();
            for (id, v) in seen.iter_mut() {
                log.read(*id, usize::MAX, |x| v.push(*x)).unwrap();
                assert_eq!(*v, (0..total).collect::<Vec<_>>());
            }
        }
    }
}

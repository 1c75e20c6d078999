//! Canonical, typed encoding of request values, hashed with BLAKE3 (pure Rust, no PyO3).
//!
//! A request (messages, params, ...) is a tree of a few value types. [`Encode`] writes each
//! value as a self-delimiting, typed byte string; [`KeyHasher`] feeds those bytes into
//! BLAKE3 through a fixed buffer, so the digest is `BLAKE3(encoding)` and never depends on
//! how the walk happened to be split into writes.
//!
//! # Encoding (formats 3 and 4)
//!
//! Lengths and counts (`n` below) are written as a *length prefix*: below 248, the single byte
//! `n`; otherwise the byte `0xf7 + k` followed by `n` in big-endian in its minimal number of
//! bytes `k` (1 to 8). So 5 is `05`, 247 is `f7`, 248 is `f8 f8`, 300 is `f9 01 2c`,
//! 2^64 - 1 is `ff` and eight `ff`. Every `n` has exactly one length prefix, its first byte
//! says how long it is (prefix-free), and prefixes compare bytewise like the numbers they encode
//! (order-preserving). Every value starts with a tag byte:
//!
//! | value        | bytes                                                                  |
//! |--------------|------------------------------------------------------------------------|
//! | `None`       | `N`                                                                    |
//! | `False/True` | `F` / `T`                                                              |
//! | int          | `i`, byte length, minimal two's-complement big-endian bytes (0 is `00`) |
//! | float        | `f`, 8 bytes IEEE-754 big-endian; `-0.0` is written as `0.0`, every NaN as `7ff8000000000000` |
//! | str          | `s`, UTF-8 byte length, UTF-8                                          |
//! | bytes        | `b`, length, the bytes                                                 |
//! | list, tuple  | `l`, item count, the items in order                                    |
//! | dict         | `d`, entry count, then `key value` pairs sorted bytewise by the key's encoding |
//! | record       | `o`, the class's module and qualname as two strs, then its fields as a dict |
//!
//! For example `{"role": "user"}` is `d 01 s 04 role s 04 user` (tags and text as ASCII), and
//! an instance of `class Msg` defined in module `app` with the one field `role = "user"` is
//! `o s 03 app s 03 Msg d 01 s 04 role s 04 user`. A *record* is an object whose class decides
//! what is sent (a pydantic model, a dataclass, a named tuple): its class identity and every
//! field it sends are hashed, so it never shares an encoding with a dict or with a record of
//! another class (which fields a record has is the binding's business, see `py::keys`).
//! Since length prefixes are order-preserving, the encodings of two strs compare like their
//! `(UTF-8 length, UTF-8 bytes)`, which lets the Python walk sort `str` keys without encoding
//! them apart.
//!
//! Consequences: every encoding is self-delimiting (a tag, then a length or a fixed size), so
//! a container's encoding determines its items and no two nestings collide; values of
//! different types never share an encoding (`"1"`, `True`, `b"1"`, `1` and `1.0` are five
//! different digests, a record and the dict of its fields are two); dict insertion order never
//! matters; two different keys of one dict that
//! encode the same are rejected ([`KeyErrorKind::DuplicateKey`]) rather than hashed in an
//! order-dependent way. Nesting deeper than [`MAX_DEPTH`] is an error, which also stops
//! self-referencing containers.
//!
//! # What is hashed, format 4
//!
//! The digest is BLAKE3 of the encoding followed by zero bytes, fewer than the encoding's own
//! length: the encoding is cut into parts of 16 KiB (the hasher's buffer), and the last part, if
//! longer than 1 KiB, is zero-padded up to the next power of two (2, 4, 8 or 16 KiB)
//! ([`padding_len`], [`hashed_bytes`]). So a 1,900-byte encoding is hashed as 2,048 bytes and a
//! 92,500-byte one as 81,920 + 16,384. Why: BLAKE3 compresses whole 1 KiB chunks side by side
//! (SIMD, up to 16 at once) but the blocks of a lone or partial last chunk one after the other,
//! 64 bytes at a time; padded, every chunk of the last part goes through the parallel path
//! (measured on AVX-512: 1,900 bytes in 1.1 µs instead of 2.0, 4,000 in 1.5 instead of 3.4).
//!
//! Padding keeps keys injective: the padded bytes `E || 0^p` of an encoding `E` start with `E`.
//! If two encodings `E1 != E2` gave the same padded bytes, both would be prefixes of one byte
//! string, so the shorter would be a prefix of the longer; but encodings are prefix-free (every
//! value is self-delimiting, see above), so no encoding is a prefix of another one. Hence equal
//! padded bytes mean equal encodings, and a BLAKE3 collision between two different requests
//! remains a collision of BLAKE3 itself (tested: `padded_encodings_stay_distinct`).
//!
//! (Format 1, never released, wrote every length as 8 bytes big-endian. Format 2 had no
//! records: it hashed a pydantic model as the dict of its *set* fields and a dataclass as the
//! dict of its fields, without their class, so that `HumanMessage(content=x)` and
//! `SystemMessage(content=x)` whose `type` is a class default, or two dataclasses of different
//! classes with equal fields, shared a key. Format 3 hashed the encoding without padding: the
//! same bytes, so an encoding of at most 1 KiB, or whose last part is, hashes as in format 3.)
//! The encoding carries no version byte of its own:
//! the key derivation hashes its format name (`KEY_FORMAT` in `chengeta_ai.core.key_builder`)
//! in front of every request, and bumps it with any change here.

use std::fmt;

use num_bigint::BigInt;

/// Tag of `None`.
pub const TAG_NONE: u8 = b'N';
/// Tag of `False`.
pub const TAG_FALSE: u8 = b'F';
/// Tag of `True`.
pub const TAG_TRUE: u8 = b'T';
/// Tag of an integer of any size.
pub const TAG_INT: u8 = b'i';
/// Tag of a 64-bit float.
pub const TAG_FLOAT: u8 = b'f';
/// Tag of a text string (UTF-8).
pub const TAG_STR: u8 = b's';
/// Tag of a byte string.
pub const TAG_BYTES: u8 = b'b';
/// Tag of a sequence (list and tuple alike).
pub const TAG_LIST: u8 = b'l';
/// Tag of a mapping (dicts of any kind).
pub const TAG_DICT: u8 = b'd';
/// Tag of a record: an object hashed as its class identity and its fields.
pub const TAG_RECORD: u8 = b'o';

/// The bit pattern every NaN is hashed as.
pub const CANONICAL_NAN_BITS: u64 = 0x7ff8_0000_0000_0000;

/// Deepest nesting of containers accepted; deeper input (or a reference cycle) is an error.
/// Like orjson's limit (254), far beyond real requests. The Python walk needs about 700 bytes
/// of C stack per level: under 192 KiB at the limit (tested on a 256 KiB thread stack).
pub const MAX_DEPTH: usize = 256;

/// Size of [`KeyHasher`]'s buffer: a multiple of BLAKE3's 1 KiB chunk, so that full flushes
/// hash many chunks at once with SIMD.
const BUFFER_SIZE: usize = 16 * 1024;

/// BLAKE3's chunk: 1 KiB, compressed 64 bytes at a time, one after the other; several whole
/// chunks are compressed side by side (SIMD).
const CHUNK_LEN: usize = 1024;

/// Length prefixes up to this value are one byte (see the format above).
pub const MAX_SHORT_LEN: u64 = 0xf7;

/// The length prefix of `n` (see the format above): the bytes, and how many of them are used.
#[inline]
pub fn length_prefix(n: u64) -> ([u8; 9], usize) {
    let mut out = [0u8; 9];
    if n <= MAX_SHORT_LEN {
        out[0] = n as u8;
        return (out, 1);
    }
    let k = 8 - (n.leading_zeros() / 8) as usize;
    out[0] = MAX_SHORT_LEN as u8 + k as u8;
    out[1..=k].copy_from_slice(&n.to_be_bytes()[8 - k..]);
    (out, 1 + k)
}

/// Where encoded bytes go: a [`KeyHasher`], or a `Vec<u8>` when a dict key must be encoded
/// apart to be sorted.
pub trait Sink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);

    /// Appends a tag byte and the length prefix of `n` (the header of every sized value).
    #[inline]
    fn put_header(&mut self, tag: u8, n: u64) {
        let (prefix, len) = length_prefix(n);
        self.put(&[tag]);
        self.put(&prefix[..len]);
    }

    /// Appends a tag byte and a big-endian `u64` (a float). Sinks may write it directly:
    /// assembling the 9 bytes on the stack first and copying them costs a store-forwarding
    /// stall.
    #[inline]
    fn put_tagged_u64(&mut self, tag: u8, value: u64) {
        self.put(&[tag]);
        self.put(&value.to_be_bytes());
    }

    /// Appends the first `used` bytes of `block` (at most 16: a short str's whole encoding).
    /// Sinks may store all 16 at once.
    #[inline]
    fn put_block(&mut self, block: [u8; 16], used: usize) {
        self.put(&block[..used]);
    }

    /// Appends a tag byte, the length prefix of `data.len()`, then `data` (a str or bytes).
    /// Sinks may write it in one step.
    #[inline]
    fn put_tagged_bytes(&mut self, tag: u8, data: &[u8]) {
        self.put_header(tag, data.len() as u64);
        self.put(data);
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The canonical encoding of each scalar and of container headers, for any [`Sink`].
pub trait Encode: Sink {
    /// Writes `None`.
    #[inline]
    fn none(&mut self) {
        self.put(&[TAG_NONE]);
    }

    /// Writes a bool.
    #[inline]
    fn boolean(&mut self, value: bool) {
        self.put(&[if value { TAG_TRUE } else { TAG_FALSE }]);
    }

    /// Writes an integer that fits an `i64`; same bytes as [`Encode::int_be_bytes`] of it.
    #[inline]
    fn int_i64(&mut self, value: i64) {
        let bytes = value.to_be_bytes();
        let skip = redundant_sign_bytes(&bytes);
        self.int_be_bytes(&bytes[skip..]);
    }

    /// Writes an integer given as minimal two's-complement big-endian bytes (as
    /// `BigInt::to_signed_bytes_be` returns them; zero is one `0x00` byte).
    #[inline]
    fn int_be_bytes(&mut self, minimal: &[u8]) {
        self.put_header(TAG_INT, minimal.len() as u64);
        self.put(minimal);
    }

    /// Writes an integer of any size.
    fn int_big(&mut self, value: &BigInt) {
        match i64::try_from(value) {
            Ok(small) => self.int_i64(small),
            Err(_) => self.int_be_bytes(&value.to_signed_bytes_be()),
        }
    }

    /// Writes a float: `-0.0` as `0.0`, every NaN as one bit pattern.
    #[inline]
    fn float(&mut self, value: f64) {
        let bits = if value.is_nan() {
            CANONICAL_NAN_BITS
        } else if value == 0.0 {
            0
        } else {
            value.to_bits()
        };
        self.put_tagged_u64(TAG_FLOAT, bits);
    }

    /// Writes a text string given as its UTF-8 bytes.
    #[inline]
    fn str_utf8(&mut self, utf8: &[u8]) {
        self.tagged_bytes(TAG_STR, utf8);
    }

    /// Writes a byte string.
    #[inline]
    fn bytes(&mut self, value: &[u8]) {
        self.tagged_bytes(TAG_BYTES, value);
    }

    /// Writes the header of a sequence of `len` items; the items follow.
    #[inline]
    fn list_header(&mut self, len: usize) {
        self.count_header(TAG_LIST, len);
    }

    /// Writes the header of a mapping of `len` entries; the sorted entries follow.
    #[inline]
    fn dict_header(&mut self, len: usize) {
        self.count_header(TAG_DICT, len);
    }

    /// Writes the header of a record of the class `module`.`qualname` (UTF-8); its fields
    /// follow, as a dict ([`Encode::dict_header`] and the sorted entries).
    fn record_header(&mut self, module: &[u8], qualname: &[u8]) {
        self.put(&[TAG_RECORD]);
        self.str_utf8(module);
        self.str_utf8(qualname);
    }

    #[doc(hidden)]
    #[inline]
    fn tagged_bytes(&mut self, tag: u8, data: &[u8]) {
        self.put_tagged_bytes(tag, data);
    }

    #[doc(hidden)]
    #[inline]
    fn count_header(&mut self, tag: u8, len: usize) {
        self.put_header(tag, len as u64);
    }
}

impl<S: Sink + ?Sized> Encode for S {}

/// Number of leading bytes of a two's-complement big-endian integer that only repeat its sign.
#[inline]
fn redundant_sign_bytes(bytes: &[u8]) -> usize {
    let mut skip = 0;
    while skip + 1 < bytes.len() {
        let (b, next) = (bytes[skip], bytes[skip + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            skip += 1;
        } else {
            break;
        }
    }
    skip
}

/// The number of zero bytes hashed after the last part of an encoding, of `tail` bytes (see
/// "What is hashed" in the module docs): none for a part of at most one 1 KiB chunk, else up to
/// the next power of two (2, 4, 8 or 16 KiB).
#[inline]
pub fn padding_len(tail: usize) -> usize {
    if tail <= CHUNK_LEN {
        0
    } else {
        tail.next_power_of_two() - tail
    }
}

/// The bytes that [`KeyHasher`] hashes for an encoding: the encoding, then the zero padding of
/// its last part (the reference model of the buffered hasher, for tests and other
/// implementations).
pub fn hashed_bytes(encoding: &[u8]) -> Vec<u8> {
    // A last part of a whole 16 KiB (0 here) is not padded, as 0 bytes are not.
    let tail = encoding.len() % BUFFER_SIZE;
    let mut out = encoding.to_vec();
    out.resize(encoding.len() + padding_len(tail), 0);
    out
}

/// BLAKE3 over a canonical encoding (padded: see [`padding_len`]), fed through a fixed 16 KiB
/// buffer (many tiny writes, few hasher updates).
pub struct KeyHasher {
    hasher: blake3::Hasher,
    // Capacity BUFFER_SIZE, never exceeded; a Vec rather than an array so that creating a
    // hasher neither zeroes nor moves 16 KiB.
    buf: Vec<u8>,
}

impl KeyHasher {
    /// A hasher with nothing written yet.
    pub fn new() -> Self {
        KeyHasher {
            hasher: blake3::Hasher::new(),
            buf: Vec::with_capacity(BUFFER_SIZE),
        }
    }

    /// The 32-byte digest of everything written.
    pub fn finalize(mut self) -> [u8; 32] {
        self.finalize_reset()
    }

    /// The 32-byte digest of everything written; the hasher is then as new, its buffer kept
    /// (a hasher kept between requests skips an allocation, and moving 2 KiB of BLAKE3 state
    /// in and out of every call).
    pub fn finalize_reset(&mut self) -> [u8; 32] {
        // The last part's zero padding (see `padding_len`); the buffer holds that part, and its
        // capacity (BUFFER_SIZE, a power of two) any padded length.
        let pad = padding_len(self.buf.len());
        self.buf.resize(self.buf.len() + pad, 0);
        self.flush();
        let digest = *self.hasher.finalize().as_bytes();
        self.hasher.reset();
        digest
    }

    #[inline]
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for KeyHasher {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let len = self.buf.len();
        if bytes.len() <= BUFFER_SIZE - len {
            // SAFETY: `buf` has capacity >= BUFFER_SIZE (reserved by `new`, never
            // shrunk) and the check above keeps `len + bytes.len()` within it; the copied bytes
            // initialise exactly the new length. (Vec::extend_from_slice re-checks capacity and
            // is not inlined in the opt-level-1 dev build that the tests use.)
            unsafe {
                copy_bytes(bytes, self.buf.as_mut_ptr().add(len));
                self.buf.set_len(len + bytes.len());
            }
        } else {
            self.put_slow(bytes);
        }
    }

    #[inline]
    fn put_block(&mut self, block: [u8; 16], used: usize) {
        debug_assert!(used <= 16);
        let len = self.buf.len();
        if BUFFER_SIZE - len >= 16 {
            // SAFETY: as in `put`: capacity >= BUFFER_SIZE and 16 bytes fit; the store writes
            // spare capacity, and the new length covers only the `used` bytes meant.
            unsafe {
                self.buf
                    .as_mut_ptr()
                    .add(len)
                    .cast::<[u8; 16]>()
                    .write_unaligned(block);
                self.buf.set_len(len + used);
            }
        } else {
            self.put(&block[..used]);
        }
    }

    #[inline]
    fn put_tagged_bytes(&mut self, tag: u8, data: &[u8]) {
        let len = self.buf.len();
        let n = data.len();
        // Most strs of a request (dict keys, roles, types) are short: tag, one length byte and
        // the text, written with one capacity check.
        if n as u64 <= MAX_SHORT_LEN && n + 2 <= BUFFER_SIZE - len {
            // SAFETY: as in `put`: capacity >= BUFFER_SIZE and the `n + 2` bytes fit; the
            // writes initialise exactly the new length.
            unsafe {
                let at = self.buf.as_mut_ptr().add(len);
                at.cast::<[u8; 2]>().write_unaligned([tag, n as u8]);
                copy_bytes(data, at.add(2));
                self.buf.set_len(len + 2 + n);
            }
        } else {
            self.put_header(tag, n as u64);
            self.put(data);
        }
    }

    #[inline]
    fn put_tagged_u64(&mut self, tag: u8, value: u64) {
        let len = self.buf.len();
        if BUFFER_SIZE - len >= 9 {
            // SAFETY: as in `put`: capacity >= BUFFER_SIZE and 9 bytes fit; both writes land
            // inside the spare capacity and initialise exactly the 9 new bytes.
            unsafe {
                let at = self.buf.as_mut_ptr().add(len);
                at.write(tag);
                at.add(1)
                    .cast::<[u8; 8]>()
                    .write_unaligned(value.to_be_bytes());
                self.buf.set_len(len + 9);
            }
        } else {
            self.put(&[tag]);
            self.put(&value.to_be_bytes());
        }
    }

    #[inline(always)]
    fn put_header(&mut self, tag: u8, n: u64) {
        let len = self.buf.len();
        if n <= MAX_SHORT_LEN && BUFFER_SIZE - len >= 2 {
            // SAFETY: as in `put`: capacity >= BUFFER_SIZE and 2 bytes fit; the write
            // initialises exactly the 2 new bytes.
            unsafe {
                let at = self.buf.as_mut_ptr().add(len);
                at.cast::<[u8; 2]>().write_unaligned([tag, n as u8]);
                self.buf.set_len(len + 2);
            }
        } else {
            self.put_long_header(tag, n);
        }
    }
}

impl KeyHasher {
    /// [`Sink::put_header`] for a length of more than one byte, or at the end of the buffer.
    #[inline(never)]
    fn put_long_header(&mut self, tag: u8, n: u64) {
        let len = self.buf.len();
        if n <= MAX_SHORT_LEN || BUFFER_SIZE - len < 10 {
            let (prefix, used) = length_prefix(n);
            self.put(&[tag]);
            self.put(&prefix[..used]);
            return;
        }
        // `0xf7 + k`, then `n` shifted to the top of 8 big-endian bytes: their first k bytes are
        // the minimal big-endian form, the rest is scratch beyond the new length.
        let (_, used) = length_prefix(n);
        let k = used - 1;
        let high = n << (8 * (8 - k));
        // SAFETY: as in `put`: capacity >= BUFFER_SIZE and 10 bytes fit; the writes stay in the
        // spare capacity and the new length covers the 1 + used bytes that are meant.
        unsafe {
            let at = self.buf.as_mut_ptr().add(len);
            at.cast::<[u8; 2]>()
                .write_unaligned([tag, (MAX_SHORT_LEN as usize + k) as u8]);
            at.add(2)
                .cast::<[u8; 8]>()
                .write_unaligned(high.to_be_bytes());
            self.buf.set_len(len + 1 + used);
        }
    }

    #[inline(never)]
    fn put_slow(&mut self, bytes: &[u8]) {
        // Top the buffer up to a whole 16 KiB (BLAKE3 hashes full buffers 16 chunks at a
        // time), then hash what remains in whole buffers straight from `bytes`.
        let room = BUFFER_SIZE - self.buf.len();
        self.buf.extend_from_slice(&bytes[..room]);
        self.flush();
        let rest = &bytes[room..];
        let direct = rest.len() - rest.len() % BUFFER_SIZE;
        if direct > 0 {
            self.hasher.update(&rest[..direct]);
        }
        self.buf.extend_from_slice(&rest[direct..]);
    }
}

/// Longest str (UTF-8 bytes) whose encoding [`short_encoding`] holds: tag, one length byte and
/// the text in 16 bytes.
pub const SHORT_STR: usize = 14;

/// The encoding of a str of up to [`SHORT_STR`] bytes of UTF-8 (`s`, length, text), zero-padded
/// to 16 bytes, as a big-endian number (never 0); 0 for a longer one. Two such numbers compare
/// like the encodings (the zero padding sorts below any byte, and only pads a shorter text,
/// whose length byte already decides).
#[inline]
pub fn short_encoding(utf8: &[u8]) -> u128 {
    let n = utf8.len();
    if n > SHORT_STR {
        return 0;
    }
    let be64 = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&utf8[at..at + 8]);
        u128::from(u64::from_be_bytes(word))
    };
    let be32 = |at: usize| {
        let mut word = [0u8; 4];
        word.copy_from_slice(&utf8[at..at + 4]);
        u128::from(u32::from_be_bytes(word))
    };
    // The text goes to bytes 2..2 + n of the 16 (bits 111 down): loaded as two overlapping
    // words, each shifted into its place.
    let text = if n >= 8 {
        (be64(0) << 48) | (be64(n - 8) << (8 * (SHORT_STR - n)))
    } else if n >= 4 {
        (be32(0) << 80) | (be32(n - 4) << (8 * (SHORT_STR - n)))
    } else {
        utf8.iter()
            .enumerate()
            .fold(0, |t, (i, &b)| t | (u128::from(b) << (104 - 8 * i)))
    };
    (u128::from(TAG_STR) << 120) | ((n as u128) << 112) | text
}

/// Copies `src` to `dst`. Up to 16 bytes (most keys and short values) with two overlapping
/// loads and stores of a word or half-word, inline; longer through `copy_nonoverlapping`
/// (a `memcpy` call, which is what its unknown length compiles to anyway).
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes and not overlap `src`.
#[inline(always)]
unsafe fn copy_bytes(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let from = src.as_ptr();
    // SAFETY (every branch): the reads stay within `src` (offsets 0..n) and the writes within
    // `dst..dst + n` (the caller's contract); overlapping stores write the same bytes twice.
    unsafe {
        if n > 16 {
            std::ptr::copy_nonoverlapping(from, dst, n);
        } else if n >= 8 {
            let head = from.cast::<u64>().read_unaligned();
            let tail = from.add(n - 8).cast::<u64>().read_unaligned();
            dst.cast::<u64>().write_unaligned(head);
            dst.add(n - 8).cast::<u64>().write_unaligned(tail);
        } else if n >= 4 {
            let head = from.cast::<u32>().read_unaligned();
            let tail = from.add(n - 4).cast::<u32>().read_unaligned();
            dst.cast::<u32>().write_unaligned(head);
            dst.add(n - 4).cast::<u32>().write_unaligned(tail);
        } else if n > 0 {
            // 1 to 3 bytes: first, middle, last.
            dst.write(*from);
            dst.add(n / 2).write(*from.add(n / 2));
            dst.add(n - 1).write(*from.add(n - 1));
        }
    }
}

/// Sorts the entries of one dict by the canonical encoding of their keys.
///
/// Encode each key into [`KeyOrder::key_sink`], then call [`KeyOrder::finish_key`] with the
/// entry's index; [`KeyOrder::sort`] then yields `(key encoding, index)` in canonical order.
/// Reusable: [`KeyOrder::clear`] keeps the allocations.
#[derive(Default)]
pub struct KeyOrder {
    keys: Vec<u8>,
    entries: Vec<(usize, usize, usize)>,
}

impl KeyOrder {
    /// Forgets every entry, keeping the buffers.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.entries.clear();
    }

    /// Forgets every entry and gives back memory beyond about `max_bytes` (for buffers kept
    /// between requests, so that one huge request does not pin its memory for good).
    pub fn clear_and_trim(&mut self, max_bytes: usize) {
        self.clear();
        self.keys.shrink_to(max_bytes);
        self.entries
            .shrink_to(max_bytes / std::mem::size_of::<(usize, usize, usize)>());
    }

    /// Where the next key's encoding is written.
    pub fn key_sink(&mut self) -> &mut Vec<u8> {
        &mut self.keys
    }

    /// Records that the bytes written since the previous key are the key of entry `index`.
    pub fn finish_key(&mut self, index: usize) {
        let start = self.entries.last().map_or(0, |e| e.1);
        self.entries.push((start, self.keys.len(), index));
    }

    /// Drops the bytes written since the last finished key (a key that failed to encode).
    pub fn abandon_key(&mut self) {
        let start = self.entries.last().map_or(0, |e| e.1);
        self.keys.truncate(start);
    }

    /// Sorts the entries; fails with the position (in sorted order) of a key whose encoding
    /// equals its predecessor's.
    pub fn sort(&mut self) -> Result<(), usize> {
        let keys = &self.keys;
        if let [a, b] = &mut self.entries[..] {
            // The most common request dict ({"role", "content"}): one comparison.
            return match keys[a.0..a.1].cmp(&keys[b.0..b.1]) {
                std::cmp::Ordering::Less => Ok(()),
                std::cmp::Ordering::Greater => {
                    std::mem::swap(a, b);
                    Ok(())
                }
                std::cmp::Ordering::Equal => Err(1),
            };
        }
        self.entries
            .sort_unstable_by(|a, b| keys[a.0..a.1].cmp(&keys[b.0..b.1]));
        for (i, pair) in self.entries.windows(2).enumerate() {
            if keys[pair[0].0..pair[0].1] == keys[pair[1].0..pair[1].1] {
                return Err(i + 1);
            }
        }
        Ok(())
    }

    /// The sorted `(key encoding, entry index)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], usize)> + '_ {
        self.entries
            .iter()
            .map(move |&(start, end, index)| (&self.keys[start..end], index))
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One step of the path from the hashed root to a failing value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Item of a list or tuple: `[3]`.
    Index(usize),
    /// Value of a dict entry, with the key already rendered like Python's `repr`: `['role']`.
    Key(String),
    /// Field of a record (model, dataclass, named tuple): `.content`.
    Field(String),
    /// A named top-level value, such as the `messages` argument of a key builder: `messages`.
    /// Only meaningful as the outermost segment.
    Name(String),
    /// Inside a dict's key rather than its value.
    DictKey,
}

/// Why a value cannot be hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyErrorKind {
    /// A value of a type outside the supported set (its Python type name).
    Unsupported(String),
    /// Two different keys of one dict have the same canonical encoding.
    DuplicateKey,
    /// Nesting deeper than [`MAX_DEPTH`], or a reference cycle.
    TooDeep,
}

/// A value that cannot be hashed, and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// What went wrong.
    pub kind: KeyErrorKind,
    /// Innermost segment first (segments are pushed while the walk unwinds).
    rev_path: Vec<Segment>,
}

impl KeyError {
    /// An error at the current value; callers add segments with [`KeyError::within`].
    pub fn new(kind: KeyErrorKind) -> Self {
        KeyError {
            kind,
            rev_path: Vec::new(),
        }
    }

    /// Adds the segment that leads from the enclosing container to where the error is.
    #[must_use]
    pub fn within(mut self, segment: Segment) -> Self {
        self.rev_path.push(segment);
        self
    }

    /// The path from the root, Python-style: `[0]['content']`, `.messages[2]`,
    /// `messages[0]` (a [`Segment::Name`] first), `` for the root.
    /// Paths longer than 24 segments keep their first and last 12, around `...`.
    pub fn path(&self) -> String {
        const KEEP: usize = 12;
        let n = self.rev_path.len();
        let mut out = String::new();
        for (i, segment) in self.rev_path.iter().rev().enumerate() {
            if n > 2 * KEEP && (KEEP..n - KEEP).contains(&i) {
                if i == KEEP {
                    out.push_str("...");
                }
                continue;
            }
            match segment {
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
                Segment::Key(k) => out.push_str(&format!("[{k}]")),
                Segment::Field(f) => out.push_str(&format!(".{f}")),
                Segment::Name(name) => out.push_str(name),
                Segment::DictKey => out.push_str(" (a dict key)"),
            }
        }
        out
    }

    fn location(&self) -> String {
        let path = self.path();
        if path.is_empty() {
            "the top level".to_owned()
        } else if let Some(rest) = path.strip_prefix(' ') {
            format!("the top level {rest}")
        } else {
            path
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.location();
        match &self.kind {
            KeyErrorKind::Unsupported(type_name) => {
                write!(f, "cannot hash object of type '{type_name}' at {at}")
            }
            KeyErrorKind::DuplicateKey => write!(
                f,
                "cannot hash dict at {at}: two different keys have the same canonical encoding"
            ),
            KeyErrorKind::TooDeep => write!(
                f,
                "cannot hash object nested deeper than {MAX_DEPTH} levels (or containing itself) at {at}"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// Renders a string the way Python's `repr` does for ordinary text (used in error paths).
pub fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A request value in pure Rust: the reference model of what the Python walk hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `bool`.
    Bool(bool),
    /// `int` of any size.
    Int(BigInt),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `bytes` / `bytearray`.
    Bytes(Vec<u8>),
    /// `list` / `tuple`.
    List(Vec<Value>),
    /// `dict`, in any order.
    Dict(Vec<(Value, Value)>),
    /// A record: an object of the class `module`.`qualname` and its fields, in any order.
    Record {
        /// The class's `__module__`.
        module: String,
        /// The class's `__qualname__`.
        qualname: String,
        /// Every field the object sends, by name.
        fields: Vec<(String, Value)>,
    },
}

/// Writes the canonical encoding of `value` into `sink`.
pub fn encode_value<S: Sink + ?Sized>(sink: &mut S, value: &Value) -> Result<(), KeyError> {
    encode_at(sink, value, 0)
}

fn encode_at<S: Sink + ?Sized>(sink: &mut S, value: &Value, depth: usize) -> Result<(), KeyError> {
    match value {
        Value::None => sink.none(),
        Value::Bool(b) => sink.boolean(*b),
        Value::Int(i) => sink.int_big(i),
        Value::Float(x) => sink.float(*x),
        Value::Str(s) => sink.str_utf8(s.as_bytes()),
        Value::Bytes(b) => sink.bytes(b),
        Value::List(items) => {
            if depth >= MAX_DEPTH {
                return Err(KeyError::new(KeyErrorKind::TooDeep));
            }
            sink.list_header(items.len());
            for (i, item) in items.iter().enumerate() {
                encode_at(sink, item, depth + 1).map_err(|e| e.within(Segment::Index(i)))?;
            }
        }
        Value::Dict(entries) => {
            if depth >= MAX_DEPTH {
                return Err(KeyError::new(KeyErrorKind::TooDeep));
            }
            let entries: Vec<(&Value, &Value)> = entries.iter().map(|(k, v)| (k, v)).collect();
            encode_entries(sink, &entries, depth, key_segment)?;
        }
        Value::Record {
            module,
            qualname,
            fields,
        } => {
            if depth >= MAX_DEPTH {
                return Err(KeyError::new(KeyErrorKind::TooDeep));
            }
            sink.record_header(module.as_bytes(), qualname.as_bytes());
            let names: Vec<Value> = fields.iter().map(|(n, _)| Value::Str(n.clone())).collect();
            let entries: Vec<(&Value, &Value)> =
                names.iter().zip(fields.iter().map(|(_, v)| v)).collect();
            encode_entries(sink, &entries, depth, |key| match key {
                Value::Str(name) => Segment::Field(name.clone()),
                other => key_segment(other),
            })?;
        }
    }
    Ok(())
}

/// A dict's (or a record's fields') header and entries, sorted by the keys' encodings.
fn encode_entries<S: Sink + ?Sized>(
    sink: &mut S,
    entries: &[(&Value, &Value)],
    depth: usize,
    segment: impl Fn(&Value) -> Segment,
) -> Result<(), KeyError> {
    let mut order = KeyOrder::default();
    for (i, (key, _)) in entries.iter().enumerate() {
        encode_at(order.key_sink(), key, depth + 1).map_err(|e| e.within(Segment::DictKey))?;
        order.finish_key(i);
    }
    order
        .sort()
        .map_err(|_| KeyError::new(KeyErrorKind::DuplicateKey))?;
    sink.dict_header(entries.len());
    for (key_bytes, i) in order.iter() {
        sink.put(key_bytes);
        let (key, value) = entries[i];
        encode_at(sink, value, depth + 1).map_err(|e| e.within(segment(key)))?;
    }
    Ok(())
}

fn key_segment(key: &Value) -> Segment {
    Segment::Key(match key {
        Value::Str(s) => python_str_repr(s),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

/// The 32-byte BLAKE3 digest of `value`'s canonical encoding.
pub fn hash_value(value: &Value) -> Result<[u8; 32], KeyError> {
    let mut hasher = KeyHasher::new();
    encode_value(&mut hasher, value)?;
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        encode_value(&mut out, value).unwrap();
        out
    }

    fn s(x: &str) -> Value {
        Value::Str(x.to_owned())
    }

    fn int(x: i64) -> Value {
        Value::Int(BigInt::from(x))
    }

    #[test]
    fn scalars_encode_as_documented() {
        assert_eq!(enc(&Value::None), b"N");
        assert_eq!(enc(&Value::Bool(false)), b"F");
        assert_eq!(enc(&Value::Bool(true)), b"T");
        assert_eq!(enc(&int(0)), b"i\x01\x00");
        assert_eq!(enc(&int(-1)), b"i\x01\xff");
        assert_eq!(enc(&int(128)), b"i\x02\x00\x80");
        assert_eq!(enc(&int(-129)), b"i\x02\xff\x7f");
        assert_eq!(enc(&s("hi")), b"s\x02hi");
        assert_eq!(enc(&Value::Bytes(b"hi".to_vec())), b"b\x02hi");
        assert_eq!(
            enc(&Value::Float(1.0)),
            b"f\x3f\xf0\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(
            enc(&Value::Dict(vec![(s("role"), s("user"))])),
            b"d\x01s\x04roles\x04user"
        );
        assert_eq!(
            enc(&Value::List(vec![Value::None, Value::Bool(true)])),
            b"l\x02NT"
        );
        let long = enc(&s(&"x".repeat(300)));
        assert_eq!(&long[..4], b"s\xf9\x01\x2c");
        assert_eq!(long.len(), 4 + 300);
    }

    fn record(module: &str, qualname: &str, fields: &[(&str, Value)]) -> Value {
        Value::Record {
            module: module.to_owned(),
            qualname: qualname.to_owned(),
            fields: fields
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn records_encode_as_documented() {
        let msg = record("app", "Msg", &[("role", s("user"))]);
        assert_eq!(enc(&msg), b"os\x03apps\x03Msgd\x01s\x04roles\x04user");
        let two = record("app", "Msg", &[("role", s("user")), ("content", s("hi"))]);
        let swapped = record("app", "Msg", &[("content", s("hi")), ("role", s("user"))]);
        assert_eq!(enc(&two), enc(&swapped));
    }

    #[test]
    fn records_differ_from_dicts_and_from_other_classes() {
        let fields = [("content", s("x")), ("type", s("human"))];
        let human = record("app", "HumanMessage", &fields);
        let as_dict = Value::Dict(fields.iter().map(|(n, v)| (s(n), v.clone())).collect());
        let forms = [
            human.clone(),
            as_dict,
            record("app", "SystemMessage", &fields),
            record("other", "HumanMessage", &fields),
            // Module and qualname are two strs, not one joined name.
            record("app.HumanMessage", "", &fields),
            record("app", "HumanMessage", &fields[..1]),
            record(
                "app",
                "HumanMessage",
                &[("content", s("x")), ("type", s("system"))],
            ),
        ];
        for (i, a) in forms.iter().enumerate() {
            for b in &forms[i + 1..] {
                assert_ne!(
                    hash_value(a).unwrap(),
                    hash_value(b).unwrap(),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn record_errors_name_the_field() {
        let bad = record(
            "app",
            "Msg",
            &[(
                "role",
                Value::Dict(vec![(s("a"), int(1)), (s("a"), int(2))]),
            )],
        );
        let err = hash_value(&Value::List(vec![bad])).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::DuplicateKey);
        assert_eq!(err.path(), "[0].role");
    }

    #[test]
    fn padding_is_as_documented() {
        let padded = |n: usize| n + padding_len(n);
        for (n, expected) in [
            (0, 0),
            (1, 1),
            (1024, 1024),
            (1025, 2048),
            (1900, 2048),
            (2048, 2048),
            (2049, 4096),
            (5000, 8192),
            (8193, 16384),
            (16384, 16384),
        ] {
            assert_eq!(padded(n), expected, "{n}");
        }
        assert_eq!(hashed_bytes(&[7; 1500]).len(), 2048);
        assert_eq!(hashed_bytes(&[7; 1500])[1500..], [0; 548]);
        assert_eq!(hashed_bytes(&[7; 16384 + 1500]).len(), 16384 + 2048);
        assert_eq!(hashed_bytes(&[7; 16384 + 100]).len(), 16384 + 100);
        assert_eq!(hashed_bytes(&[7; 32768]).len(), 32768);
        assert!(hashed_bytes(&[]).is_empty());
    }

    #[test]
    fn the_hasher_pads_the_last_part_at_every_boundary() {
        // Written in pieces of any size (through the buffer, or straight past it), the digest is
        // BLAKE3 of `hashed_bytes`.
        let lens = [
            0usize, 1, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 4097, 8193, 16383, 16384, 16385,
            17408, 17409, 32768, 32769, 40000,
        ];
        for len in lens {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for piece in [1usize, 13, 1000, BUFFER_SIZE, 40_000] {
                let mut hasher = KeyHasher::new();
                for part in data.chunks(piece) {
                    hasher.put(part);
                }
                let expected = *blake3::hash(&hashed_bytes(&data)).as_bytes();
                assert_eq!(hasher.finalize_reset(), expected, "{len} in {piece}s");
                // reused after a reset, as the bindings keep it
                hasher.put(&data);
                assert_eq!(hasher.finalize(), expected, "{len} again");
            }
        }
    }

    #[test]
    fn length_prefixes_are_as_documented() {
        let prefix = |n: u64| {
            let (bytes, used) = length_prefix(n);
            bytes[..used].to_vec()
        };
        assert_eq!(prefix(0), [0x00]);
        assert_eq!(prefix(5), [0x05]);
        assert_eq!(prefix(247), [0xf7]);
        assert_eq!(prefix(248), [0xf8, 0xf8]);
        assert_eq!(prefix(255), [0xf8, 0xff]);
        assert_eq!(prefix(256), [0xf9, 0x01, 0x00]);
        assert_eq!(prefix(300), [0xf9, 0x01, 0x2c]);
        assert_eq!(prefix(1 << 56), [0xff, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(prefix(u64::MAX), [0xff; 9]);
    }

    #[test]
    fn hasher_headers_match_the_plain_encoding_across_buffer_edges() {
        // The hasher writes headers on its own fast paths; they must produce the same bytes as
        // the generic ones, wherever in the buffer they land.
        let lens = [
            0u64,
            1,
            247,
            248,
            255,
            256,
            65_535,
            65_536,
            1 << 40,
            u64::MAX,
        ];
        for pad in 0..12 {
            let mut plain = Vec::new();
            let mut hasher = KeyHasher::new();
            for round in 0..3 {
                let filler = vec![0xabu8; BUFFER_SIZE - 11 + pad + round];
                plain.put(&filler);
                hasher.put(&filler);
                for &n in &lens {
                    plain.put_header(TAG_STR, n);
                    hasher.put_header(TAG_STR, n);
                    plain.put_tagged_u64(TAG_FLOAT, n);
                    hasher.put_tagged_u64(TAG_FLOAT, n);
                }
            }
            assert_eq!(
                hasher.finalize(),
                *blake3::hash(&hashed_bytes(&plain)).as_bytes(),
                "pad {pad}"
            );
        }
    }

    #[test]
    fn hasher_strs_match_the_plain_encoding_at_every_small_length_and_buffer_edge() {
        // `put_tagged_bytes` and the inline small copies of the hasher, against `Vec<u8>`:
        // every length up to 40 (each branch of the small copy) and around the one-byte
        // length limit, wherever in the buffer they land.
        let text: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        let lens: Vec<usize> = (0..=40).chain([246, 247, 248, 300]).collect();
        for pad in 0..48 {
            let mut plain = Vec::new();
            let mut hasher = KeyHasher::new();
            let filler = vec![0x5au8; BUFFER_SIZE - 40 + pad];
            plain.put(&filler);
            hasher.put(&filler);
            for &n in &lens {
                plain.str_utf8(&text[..n]);
                hasher.str_utf8(&text[..n]);
                let mut block = [0xeeu8; 16];
                let used = n.min(16);
                block[..used].copy_from_slice(&text[..used]);
                plain.put_block(block, used);
                hasher.put_block(block, used);
                plain.put(&text[n / 3..n]);
                hasher.put(&text[n / 3..n]);
            }
            assert_eq!(
                hasher.finalize(),
                *blake3::hash(&hashed_bytes(&plain)).as_bytes(),
                "pad {pad}"
            );
        }
    }

    #[test]
    fn short_encodings_are_the_encodings_and_sort_like_them() {
        let texts: Vec<Vec<u8>> = (0..=SHORT_STR + 1)
            .flat_map(|n| {
                [0x00u8, 0x61, 0xff].into_iter().map(move |fill| {
                    (0..n)
                        .map(|i| fill.wrapping_add((i as u8).wrapping_mul(37)))
                        .collect()
                })
            })
            .collect();
        for a in &texts {
            let short = short_encoding(a);
            if a.len() > SHORT_STR {
                assert_eq!(short, 0);
                continue;
            }
            let mut plain = Vec::new();
            plain.str_utf8(a);
            let bytes = short.to_be_bytes();
            assert_eq!(&bytes[..a.len() + 2], &plain[..], "{a:?}");
            assert!(bytes[a.len() + 2..].iter().all(|&b| b == 0), "{a:?}");
            for b in &texts {
                if b.len() <= SHORT_STR {
                    let mut other = Vec::new();
                    other.str_utf8(b);
                    assert_eq!(short.cmp(&short_encoding(b)), plain.cmp(&other));
                }
            }
        }
    }

    #[test]
    fn floats_canonicalise_zero_and_nan() {
        assert_eq!(enc(&Value::Float(-0.0)), enc(&Value::Float(0.0)));
        let other_nan = f64::from_bits(0xfff0_0000_0000_0001);
        assert!(other_nan.is_nan());
        assert_eq!(enc(&Value::Float(other_nan)), enc(&Value::Float(f64::NAN)));
        assert_ne!(
            enc(&Value::Float(f64::INFINITY)),
            enc(&Value::Float(f64::NAN))
        );
    }

    #[test]
    fn types_never_collide() {
        let values = [
            s("1"),
            Value::Bool(true),
            Value::Bytes(b"1".to_vec()),
            int(1),
            Value::Float(1.0),
            Value::List(vec![int(1)]),
            Value::Dict(vec![(int(1), Value::None)]),
            Value::None,
        ];
        for (i, a) in values.iter().enumerate() {
            for b in &values[i + 1..] {
                assert_ne!(
                    hash_value(a).unwrap(),
                    hash_value(b).unwrap(),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn buffering_does_not_change_the_digest() {
        let big = "x".repeat(3 * BUFFER_SIZE + 17);
        let value = Value::List(vec![s("a"), s(&big), s("b"), Value::Bytes(vec![7; 40_000])]);
        let plain = blake3::hash(&hashed_bytes(&enc(&value)));
        assert_eq!(hash_value(&value).unwrap(), *plain.as_bytes());
    }

    #[test]
    fn nesting_is_prefix_free() {
        // [[1], 2] and [[1, 2]] differ, as do ["ab"] and ["a", "b"].
        let a = Value::List(vec![Value::List(vec![int(1)]), int(2)]);
        let b = Value::List(vec![Value::List(vec![int(1), int(2)])]);
        assert_ne!(enc(&a), enc(&b));
        assert_ne!(
            enc(&Value::List(vec![s("ab")])),
            enc(&Value::List(vec![s("a"), s("b")]))
        );
    }

    #[test]
    fn duplicate_key_encodings_are_rejected() {
        let dict = Value::Dict(vec![(s("a"), int(1)), (s("a"), int(2))]);
        let err = hash_value(&dict).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::DuplicateKey);
    }

    #[test]
    fn too_deep_is_an_error_with_a_path() {
        let mut value = int(0);
        for _ in 0..MAX_DEPTH {
            value = Value::List(vec![value]);
        }
        assert!(hash_value(&value).is_ok());
        let value = Value::List(vec![value]);
        let err = hash_value(&value).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::TooDeep);
        assert_eq!(err.path(), format!("{0}...{0}", "[0]".repeat(12)));
    }

    #[test]
    fn error_messages_name_type_and_place() {
        let err = KeyError::new(KeyErrorKind::Unsupported("set".into()))
            .within(Segment::Key(python_str_repr("content")))
            .within(Segment::Index(0))
            .within(Segment::Key(python_str_repr("messages")));
        assert_eq!(
            err.to_string(),
            "cannot hash object of type 'set' at ['messages'][0]['content']"
        );
        let root = KeyError::new(KeyErrorKind::Unsupported("set".into()));
        assert_eq!(
            root.to_string(),
            "cannot hash object of type 'set' at the top level"
        );
        let in_key = KeyError::new(KeyErrorKind::Unsupported("object".into()))
            .within(Segment::DictKey)
            .within(Segment::Field("params".into()));
        assert_eq!(
            in_key.to_string(),
            "cannot hash object of type 'object' at .params (a dict key)"
        );
        let named = KeyError::new(KeyErrorKind::Unsupported("set".into()))
            .within(Segment::Key(python_str_repr("content")))
            .within(Segment::Index(0))
            .within(Segment::Name("messages".into()));
        assert_eq!(
            named.to_string(),
            "cannot hash object of type 'set' at messages[0]['content']"
        );
        let named_key = KeyError::new(KeyErrorKind::Unsupported("frozenset".into()))
            .within(Segment::DictKey)
            .within(Segment::Name("params".into()));
        assert_eq!(
            named_key.to_string(),
            "cannot hash object of type 'frozenset' at params (a dict key)"
        );
        assert_eq!(python_str_repr("it's"), "\"it's\"");
        assert_eq!(python_str_repr("a\nb'\""), "'a\\nb\\'\"'");
    }

    fn big_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0usize..1100).prop_map(|n| Value::Bytes(vec![0; n])),
            (900usize..2100).prop_map(|n| Value::Bytes(vec![0; n])),
            (0usize..20_000).prop_map(|n| Value::Bytes(vec![0; n])),
            (0usize..3000).prop_map(|n| Value::Str("a".repeat(n))),
            Just(Value::None),
            Just(int(0)),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::None),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Int(BigInt::from(i))),
            any::<i128>().prop_map(|i| Value::Int(BigInt::from(i))),
            any::<f64>().prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::Bytes),
            // Around the one-byte length limit (247).
            proptest::collection::vec(any::<u8>(), 240..260).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
                proptest::collection::btree_map(".{0,6}", inner.clone(), 0..6).prop_map(|m| {
                    Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())
                }),
                (
                    prop_oneof![Just("app"), Just("lib")],
                    prop_oneof![Just("A"), Just("B"), Just("")],
                    proptest::collection::btree_map("[ab]{0,2}", inner, 0..4),
                )
                    .prop_map(|(module, qualname, m)| Value::Record {
                        module: module.to_owned(),
                        qualname: qualname.to_owned(),
                        fields: m.into_iter().collect(),
                    }),
            ]
        })
    }

    proptest! {
        #[test]
        fn key_order_sorts_bytewise_and_finds_duplicates(
            keys in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..4), 0..6)
        ) {
            let mut order = KeyOrder::default();
            for (i, key) in keys.iter().enumerate() {
                order.key_sink().extend_from_slice(key);
                order.finish_key(i);
            }
            let mut expected = keys.clone();
            expected.sort();
            let has_dup = expected.windows(2).any(|w| w[0] == w[1]);
            prop_assert_eq!(order.sort().is_err(), has_dup);
            if !has_dup {
                let got: Vec<Vec<u8>> = order.iter().map(|(k, _)| k.to_vec()).collect();
                prop_assert_eq!(&got, &expected);
                for (k, i) in order.iter() {
                    prop_assert_eq!(k, &keys[i][..]);
                }
            }
        }

        #[test]
        fn length_prefixes_are_order_preserving_and_prefix_free(
            a in prop_oneof![0u64..600, any::<u64>(), (0u32..64).prop_map(|s| 1u64 << s)],
            b in prop_oneof![0u64..600, any::<u64>(), (0u32..64).prop_map(|s| 1u64 << s)],
        ) {
            let (pa, ua) = length_prefix(a);
            let (pb, ub) = length_prefix(b);
            let (pa, pb) = (&pa[..ua], &pb[..ub]);
            prop_assert_eq!(pa.cmp(pb), a.cmp(&b));
            prop_assert_eq!(usize::from(pa[0].saturating_sub(0xf7)) + 1, ua);
            if a != b {
                prop_assert!(!pa.starts_with(pb) && !pb.starts_with(pa));
            }
        }

        #[test]
        fn i64_fast_path_matches_bigint(i in any::<i64>()) {
            let mut fast = Vec::new();
            fast.int_i64(i);
            let mut big = Vec::new();
            big.int_be_bytes(&BigInt::from(i).to_signed_bytes_be());
            prop_assert_eq!(fast, big);
        }

        #[test]
        fn big_ints_round_trip_through_their_bytes(i in any::<i128>(), shift in 0u32..200) {
            let value = BigInt::from(i) << shift;
            let mut out = Vec::new();
            out.int_big(&value);
            let (prefix, used) = length_prefix(out.len() as u64 - 2);
            prop_assume!(used == 1); // under 248 bytes: all of these
            prop_assert_eq!(usize::from(out[1]), out.len() - 2);
            prop_assert_eq!(prefix[0], out[1]);
            prop_assert_eq!(BigInt::from_signed_bytes_be(&out[2..]), value);
        }

        #[test]
        fn dict_order_never_matters(value in value_strategy(), seed in any::<u64>()) {
            let Value::Dict(mut entries) = Value::Dict(vec![
                (s("v"), value.clone()), (int(3), s("x")), (s("w"), Value::None),
                (Value::Bytes(vec![1]), Value::Float(2.5)),
            ]) else { unreachable!() };
            let before = hash_value(&Value::Dict(entries.clone())).unwrap();
            let n = entries.len();
            entries.rotate_left((seed as usize) % n);
            entries.swap(0, (seed as usize / 7) % n);
            prop_assert_eq!(before, hash_value(&Value::Dict(entries)).unwrap());
        }

        #[test]
        fn equal_values_hash_equal_and_differ_otherwise(a in value_strategy(), b in value_strategy()) {
            let (ea, eb) = (enc(&a), enc(&b));
            prop_assert_eq!(hash_value(&a).unwrap(), *blake3::hash(&hashed_bytes(&ea)).as_bytes());
            if ea != eb {
                prop_assert_ne!(hashed_bytes(&ea), hashed_bytes(&eb));
            }
            if ea != eb {
                prop_assert_ne!(hash_value(&a).unwrap(), hash_value(&b).unwrap());
            }
        }

        #[test]
        fn padded_encodings_stay_distinct(
            a in proptest::collection::vec(big_leaf(), 1..4),
            b in proptest::collection::vec(big_leaf(), 1..4),
        ) {
            // Values around the padding's thresholds, ending in zero bytes (what padding adds).
            let (a, b) = (Value::List(a), Value::List(b));
            let (ea, eb) = (enc(&a), enc(&b));
            prop_assert_eq!(ea == eb, hashed_bytes(&ea) == hashed_bytes(&eb));
            prop_assert_eq!(hash_value(&a).unwrap(), *blake3::hash(&hashed_bytes(&ea)).as_bytes());
            prop_assert_eq!(ea == eb, hash_value(&a).unwrap() == hash_value(&b).unwrap());
        }

        #[test]
        fn encodings_are_prefix_free(a in value_strategy(), b in value_strategy()) {
            // Self-delimiting: the encoding of [a, b] determines a and b.
            let (ea, eb) = (enc(&a), enc(&b));
            if ea != eb {
                prop_assert!(!ea.starts_with(&eb) && !eb.starts_with(&ea));
            }
        }
    }
}

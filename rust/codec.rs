//! The compact, versioned binary format for chunk streams (pure Rust, no PyO3).
//!
//! # Layout
//! ```text
//! header   "CGCB" | version u8 | flags u8 | count varint | body_len varint
//! body     (raw, or one zstd frame when FLAG_ZSTD) =
//!          structure_len varint | lengths_len varint | structure | lengths | data
//! ```
//! The *structure* stream holds tags, varints, bitmasks and back-references: it repeats from
//! chunk to chunk and compresses to almost nothing. The *data* stream holds the payload of new
//! strings, bytes, floats and big ints, whose lengths (varints) go to the *lengths* stream.
//! Keeping the three apart lets zstd find long periodic matches in the structure and entropy-code
//! the incompressible payload (e.g. OpenAI's random `obfuscation` padding) with a tight literal
//! table that length bytes do not dilute.
//!
//! Values are a tag byte in the structure stream followed by their operands (see the `TAG_*`
//! constants). Strings up to [`INTERN_MAX_LEN`] bytes are interned: the first occurrence is
//! `TAG_STR_NEW` (payload in data) and later ones `TAG_STR_REF` + table index. Model instances
//! refer to a per-stream *template* (class name + field names, written once) and carry a bitmask
//! of fields whose scalar value equals the previous instance of the same template.
//!
//! Reading never trusts a length: every length and count is bounded by the bytes that remain,
//! so corrupt input fails with a [`CodecError`] and never allocates more than the input implies.
//! The decompressed body is bounded too ([`body_limit`]): by the caller's cap on decoded bytes
//! and by [`MAX_EXPANSION`] times the compressed size (plus [`EXPANSION_SLACK`]), so a few-KB
//! zstd bomb is refused from its header, before anything is decompressed. [`validate`] walks a
//! whole body (every count, reference, string and class name) without building anything, so a
//! decoder that validated first cannot fail half way through a stream.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;

/// The 4 bytes every encoding starts with.
pub const MAGIC: &[u8; 4] = b"CGCB";
/// The format version written by this build (the only one it reads).
pub const VERSION: u8 = 1;
/// Header flag: the payload is a sequence of items (`StreamEncoder`), not one value.
pub const FLAG_SEQUENCE: u8 = 0x01;
/// Header flag: the body is one zstd frame.
pub const FLAG_ZSTD: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_SEQUENCE | FLAG_ZSTD;

/// Deepest nesting of containers/models the codec writes or reads.
pub const MAX_DEPTH: usize = 200;
/// Strings longer than this (in UTF-8 bytes) are written raw instead of interned.
pub const INTERN_MAX_LEN: usize = 256;
/// The intern table stops growing at this many entries (strings are then written raw).
pub const INTERN_MAX_ENTRIES: usize = 1 << 20;

/// Default cap on a decoded (decompressed) body: 1 GiB. Callers pass their own.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 1 << 30;
/// A compressed body may expand to at most this many times its compressed size (plus
/// [`EXPANSION_SLACK`]). zstd reaches ~32000x on degenerate input (RLE blocks); the encoder
/// stores a body raw rather than write a frame that expands more than this.
pub const MAX_EXPANSION: u64 = 256;
/// Any compressed body may expand to this many bytes whatever its ratio.
pub const EXPANSION_SLACK: u64 = 1 << 20;

/// `None`.
pub const TAG_NONE: u8 = 0;
/// `False`.
pub const TAG_FALSE: u8 = 1;
/// `True`.
pub const TAG_TRUE: u8 = 2;
/// An int in `i64`: zigzag varint in structure.
pub const TAG_INT: u8 = 3;
/// An int outside `i64`: data = (len in lengths) + little-endian two's complement bytes.
pub const TAG_BIGINT: u8 = 4;
/// A float: data = 8 bytes, little-endian IEEE-754 bits.
pub const TAG_FLOAT: u8 = 5;
/// A new interned string: data = (len in lengths) + UTF-8; appended to the intern table.
pub const TAG_STR_NEW: u8 = 6;
/// A back-reference: structure = varint index into the intern table.
pub const TAG_STR_REF: u8 = 7;
/// A string not interned: data = (len in lengths) + UTF-8.
pub const TAG_STR_RAW: u8 = 8;
/// Bytes: data = (len in lengths) + bytes.
pub const TAG_BYTES: u8 = 9;
/// A list: structure = varint length, then the items.
pub const TAG_LIST: u8 = 10;
/// A tuple: structure = varint length, then the items.
pub const TAG_TUPLE: u8 = 11;
/// A dict: structure = varint length, then key, value pairs.
pub const TAG_DICT: u8 = 12;
/// A model instance with a new template: class name (string value), varint field count,
/// field names (string values), then the instance body.
pub const TAG_MODEL_DEF: u8 = 13;
/// A model instance of a known template: varint template index, then the instance body.
pub const TAG_MODEL: u8 = 14;

/// A string with lone surrogates (not UTF-8): data = (len in lengths) + "surrogatepass" UTF-8.
pub const TAG_STR_SURROGATES: u8 = 15;

/// Instance flag: `__pydantic_fields_set__` equals the previous instance's of this template.
pub const INST_FIELDS_SET_SAME: u8 = 0x01;
/// Instance flag: `__pydantic_extra__` is a dict (else `None`); the dict follows.
pub const INST_EXTRA_DICT: u8 = 0x02;
/// Instance flag: `__pydantic_private__` is a dict (else `None`); the dict follows.
pub const INST_PRIVATE_DICT: u8 = 0x04;
/// Every instance flag this version knows.
pub const INST_KNOWN_FLAGS: u8 = INST_FIELDS_SET_SAME | INST_EXTRA_DICT | INST_PRIVATE_DICT;

/// Everything that can go wrong reading or writing the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The input ended while reading `what`.
    Truncated(&'static str),
    /// The input does not start with [`MAGIC`].
    BadMagic,
    /// The version byte is not one this build reads.
    UnknownVersion(u8),
    /// Header flags with unknown bits set.
    UnknownFlags(u8),
    /// A varint longer than 10 bytes or overflowing `u64`.
    VarintOverflow,
    /// A declared length/count larger than the input that remains.
    LengthOutOfBounds {
        /// What the length was for.
        what: &'static str,
        /// The declared length.
        len: u64,
        /// Bytes that remained.
        remaining: usize,
    },
    /// A tag byte that no value starts with.
    UnknownTag(u8),
    /// String payload that is not UTF-8.
    InvalidUtf8,
    /// A back-reference (string, template, previous value) to something that does not exist.
    BadReference(&'static str, u64),
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Bytes left over after the declared items.
    TrailingBytes(usize),
    /// zstd failed (corrupt frame, or output not of the declared size).
    Zstd(String),
    /// A declared size above the decoder's limit (a decompression bomb, or a cap too small).
    TooLarge {
        /// What the size was for.
        what: &'static str,
        /// The declared size.
        len: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// Any other inconsistency, described.
    Corrupt(String),
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated(what) => write!(f, "truncated input while reading {what}"),
            Self::BadMagic => write!(f, "not a chengeta_ai compact encoding (bad magic)"),
            Self::UnknownVersion(v) => {
                write!(
                    f,
                    "unknown format version {v} (this build reads version {VERSION})"
                )
            }
            Self::UnknownFlags(b) => write!(f, "unknown header flags 0x{b:02x}"),
            Self::VarintOverflow => write!(f, "corrupt varint (longer than 10 bytes)"),
            Self::LengthOutOfBounds {
                what,
                len,
                remaining,
            } => write!(
                f,
                "corrupt {what} length {len}: only {remaining} bytes remain"
            ),
            Self::UnknownTag(t) => write!(f, "corrupt data: unknown tag {t}"),
            Self::InvalidUtf8 => write!(f, "corrupt data: string is not valid UTF-8"),
            Self::BadReference(what, i) => write!(f, "corrupt data: {what} {i} does not exist"),
            Self::TooDeep => write!(f, "nesting deeper than {MAX_DEPTH} levels"),
            Self::TrailingBytes(n) => write!(f, "corrupt data: {n} trailing bytes"),
            Self::Zstd(msg) => write!(f, "corrupt compressed body: {msg}"),
            Self::TooLarge { what, len, limit } => write!(
                f,
                "{what} of {len} bytes exceeds the decoding limit of {limit} bytes"
            ),
            Self::Corrupt(msg) => write!(f, "corrupt data: {msg}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, CodecError>;

// ---------------------------------------------------------------------------------------------
// varints

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Zigzag-maps a signed int so small magnitudes give small varints.
#[inline]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A bounds-checked cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// A reader of `buf` positioned at `pos` (clamped to the end).
    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Self {
            buf,
            pos: pos.min(buf.len()),
        }
    }

    /// Bytes not yet read.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Current offset.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// One byte.
    #[inline(always)]
    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        let b = *self.buf.get(self.pos).ok_or(CodecError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    /// An unsigned LEB128 varint (at most 10 bytes, no overflow).
    #[inline(always)]
    pub fn varint(&mut self, what: &'static str) -> Result<u64> {
        // One-byte varints (tags' operands, indices, small counts) are the common case.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_long(what)
    }

    #[inline(never)]
    fn varint_long(&mut self, what: &'static str) -> Result<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            let low = u64::from(b & 0x7f);
            if i == 9 && low > 1 {
                return Err(CodecError::VarintOverflow);
            }
            v |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::VarintOverflow)
    }

    /// A count of things each taking at least `min_size` bytes of this reader: bounded by
    /// what remains, so a corrupt count cannot cause a large allocation.
    #[inline]
    pub fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize> {
        let n = self.varint(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(CodecError::LengthOutOfBounds {
                what,
                len: n,
                remaining: self.remaining(),
            });
        }
        Ok(n as usize)
    }

    /// `n` raw bytes.
    #[inline]
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(CodecError::LengthOutOfBounds {
                what,
                len: n as u64,
                remaining: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A varint length followed by that many bytes.
    #[inline]
    pub fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let n = self.count(what, 1)?;
        self.bytes(n, what)
    }

    /// A varint-length-prefixed UTF-8 string.
    #[inline]
    pub fn str(&mut self, what: &'static str) -> Result<&'a str> {
        std::str::from_utf8(self.len_prefixed(what)?).map_err(|_| CodecError::InvalidUtf8)
    }

    /// 8 bytes as a little-endian `u64`.
    #[inline]
    pub fn u64_le(&mut self, what: &'static str) -> Result<u64> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

// ---------------------------------------------------------------------------------------------
// writer

/// The two output streams of an encoding in progress.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    /// Tags, varints, bitmasks, back-references.
    pub structure: Vec<u8>,
    /// Lengths (varints) of the payloads in `data`.
    pub lengths: Vec<u8>,
    /// Payload of new strings, bytes, floats and big ints.
    pub data: Vec<u8>,
}

impl Writer {
    /// Uncompressed body bytes written so far.
    pub fn len(&self) -> usize {
        self.structure.len() + self.lengths.len() + self.data.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A tag byte.
    #[inline]
    pub fn tag(&mut self, t: u8) {
        self.structure.push(t);
    }

    /// A varint in the structure stream.
    #[inline]
    pub fn varint(&mut self, v: u64) {
        write_varint(&mut self.structure, v);
    }

    /// `TAG_INT` + zigzag varint.
    #[inline]
    pub fn int(&mut self, v: i64) {
        self.structure.push(TAG_INT);
        write_varint(&mut self.structure, zigzag(v));
    }

    /// `TAG_FLOAT` + bits.
    #[inline]
    pub fn float(&mut self, v: f64) {
        self.structure.push(TAG_FLOAT);
        self.data.extend_from_slice(&v.to_bits().to_le_bytes());
    }

    /// A tag in structure, the length in lengths and the payload in data.
    #[inline]
    pub fn payload(&mut self, tag: u8, bytes: &[u8]) {
        self.structure.push(tag);
        write_varint(&mut self.lengths, bytes.len() as u64);
        self.data.extend_from_slice(bytes);
    }

    /// A string, interned through `table` when short enough.
    #[inline]
    pub fn string(&mut self, table: &mut InternTable, s: &str) {
        match table.lookup_or_insert(s) {
            Interned::Existing(i) => {
                self.structure.push(TAG_STR_REF);
                write_varint(&mut self.structure, u64::from(i));
            }
            Interned::New => self.payload(TAG_STR_NEW, s.as_bytes()),
            Interned::NotInterned => self.payload(TAG_STR_RAW, s.as_bytes()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// intern tables

/// FxHash (rustc's hasher): a fast, non-cryptographic hash for the intern table. The keys come
/// from the values being encoded, which the encoding process already trusts.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(FX_SEED);
        }
        for &b in chunks.remainder() {
            self.hash = (self.hash.rotate_left(5) ^ u64::from(b)).wrapping_mul(FX_SEED);
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.hash = (self.hash.rotate_left(5) ^ u64::from(i)).wrapping_mul(FX_SEED);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// What [`InternTable::lookup_or_insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interned {
    /// Seen before at this index: write a back-reference.
    Existing(u32),
    /// First occurrence, now added at the next index: write it as new.
    New,
    /// Too long, or the table is full: write it raw.
    NotInterned,
}

/// The encoder's string table: string -> index of first occurrence.
#[derive(Debug, Default, Clone)]
pub struct InternTable {
    map: HashMap<Box<str>, u32, BuildHasherDefault<FxHasher>>,
}

impl InternTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of interned strings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Looks `s` up, adding it when new (and short enough, and the table not full).
    #[inline]
    pub fn lookup_or_insert(&mut self, s: &str) -> Interned {
        if s.len() > INTERN_MAX_LEN {
            return Interned::NotInterned;
        }
        if let Some(&i) = self.map.get(s) {
            return Interned::Existing(i);
        }
        if self.map.len() >= INTERN_MAX_ENTRIES {
            return Interned::NotInterned;
        }
        let i = self.map.len() as u32;
        self.map.insert(s.into(), i);
        Interned::New
    }
}

/// The decoder's mirror of [`InternTable`]: an append-only list with checked lookups.
#[derive(Debug, Clone)]
pub struct DecodeTable<T> {
    items: Vec<T>,
}

impl<T> Default for DecodeTable<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

impl<T> DecodeTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the next entry.
    pub fn push(&mut self, item: T) -> Result<()> {
        if self.items.len() >= INTERN_MAX_ENTRIES {
            return Err(CodecError::Corrupt("intern table overflow".into()));
        }
        self.items.push(item);
        Ok(())
    }

    /// The entry at `index`, or `BadReference`.
    #[inline]
    pub fn get(&self, index: u64) -> Result<&T> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.items.get(i))
            .ok_or(CodecError::BadReference("string reference", index))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The entries, in order.
    pub fn into_items(self) -> Vec<T> {
        self.items
    }
}

// ---------------------------------------------------------------------------------------------
// bitmasks

/// Bytes of a bitmask over `n` fields.
#[inline]
pub fn mask_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Whether bit `i` is set in `mask`.
#[inline]
pub fn mask_get(mask: &[u8], i: usize) -> bool {
    mask[i / 8] & (1 << (i % 8)) != 0
}

/// Sets bit `i` in `mask`.
#[inline]
pub fn mask_set(mask: &mut [u8], i: usize) {
    mask[i / 8] |= 1 << (i % 8);
}

// ---------------------------------------------------------------------------------------------
// header + body

/// The parsed fixed part of an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Written by a stream encoder (a sequence of items), not a single value.
    pub sequence: bool,
    /// The body is zstd-compressed.
    pub compressed: bool,
    /// Number of items (1 for a single value).
    pub count: u64,
    /// Uncompressed body length.
    pub body_len: u64,
}

impl Header {
    /// Appends the header bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let mut flags = 0;
        if self.sequence {
            flags |= FLAG_SEQUENCE;
        }
        if self.compressed {
            flags |= FLAG_ZSTD;
        }
        out.push(flags);
        write_varint(out, self.count);
        write_varint(out, self.body_len);
    }

    /// Parses a header, returning it and the offset of the body.
    pub fn parse(data: &[u8]) -> Result<(Header, usize)> {
        if data.len() < MAGIC.len() {
            return if MAGIC.starts_with(data) {
                Err(CodecError::Truncated("magic"))
            } else {
                Err(CodecError::BadMagic)
            };
        }
        if &data[..4] != MAGIC {
            return Err(CodecError::BadMagic);
        }
        let mut r = Reader::new(&data[4..]);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(CodecError::UnknownVersion(version));
        }
        let flags = r.u8("flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(CodecError::UnknownFlags(flags));
        }
        let count = r.varint("item count")?;
        let body_len = r.varint("body length")?;
        let h = Header {
            sequence: flags & FLAG_SEQUENCE != 0,
            compressed: flags & FLAG_ZSTD != 0,
            count,
            body_len,
        };
        if !h.sequence && count != 1 {
            return Err(CodecError::Corrupt(format!(
                "single value with item count {count}"
            )));
        }
        Ok((h, 4 + r.position()))
    }
}

/// Compresses `body` as one zstd frame.
pub fn zstd_compress(body: &[u8], level: i32) -> Result<Vec<u8>> {
    zstd::bulk::compress(body, level).map_err(|e| CodecError::Zstd(e.to_string()))
}

/// Bodies up to this size are decompressed in one call into a buffer of the declared size
/// (about 4x faster than streaming); larger ones grow with the data actually produced.
pub const BULK_DECOMPRESS_MAX: u64 = 16 << 20;

/// Decompresses one zstd frame that must expand to exactly `expected` bytes. Above
/// [`BULK_DECOMPRESS_MAX`] the output grows with the data actually produced, so a lying
/// `expected` cannot force a large allocation; below it, one call fills a buffer of `expected`
/// bytes. Anything unusual (not exactly one frame, a size mismatch, corrupt data) takes the
/// streaming path, so errors read the same either way.
pub fn zstd_decompress(frame: &[u8], expected: u64) -> Result<Vec<u8>> {
    if expected <= BULK_DECOMPRESS_MAX
        && zstd::zstd_safe::find_frame_compressed_size(frame).ok() == Some(frame.len())
    {
        let out = BULK_DCTX.with(|cell| {
            // A thread's context is reused: creating one costs about as much as decompressing
            // a 150 KB body. `try_borrow_mut` cannot fail (no re-entry), but never panics.
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.is_none() {
                *slot = zstd::bulk::Decompressor::new().ok();
            }
            slot.as_mut()?.decompress(frame, expected as usize).ok()
        });
        if let Some(out) = out.filter(|o| o.len() as u64 == expected) {
            return Ok(out);
        }
    }
    zstd_decompress_streaming(frame, expected)
}

thread_local! {
    /// Each thread's zstd decompression context for [`zstd_decompress`].
    static BULK_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_decompress_streaming(frame: &[u8], expected: u64) -> Result<Vec<u8>> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame)
        .map_err(|e| CodecError::Zstd(e.to_string()))?
        .single_frame();
    let mut out = Vec::with_capacity(expected.min(frame.len() as u64 * 8) as usize);
    // Read at most one byte more than declared to detect an oversized frame.
    (&mut dec)
        .take(expected.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Zstd(e.to_string()))?;
    if out.len() as u64 != expected {
        return Err(CodecError::Zstd(format!(
            "expands to {}{} bytes, header says {expected}",
            out.len(),
            if out.len() as u64 > expected { "+" } else { "" }
        )));
    }
    Ok(out)
}

/// Builds the body (`structure_len | lengths_len | structure | lengths | data`) of a finished
/// writer.
pub fn build_body(w: &Writer) -> Vec<u8> {
    let mut body = Vec::with_capacity(w.len() + 20);
    write_varint(&mut body, w.structure.len() as u64);
    write_varint(&mut body, w.lengths.len() as u64);
    body.extend_from_slice(&w.structure);
    body.extend_from_slice(&w.lengths);
    body.extend_from_slice(&w.data);
    body
}

/// Frames a finished writer: header + body, the body zstd-compressed when at least
/// `compress_min_bytes` long (and smaller compressed).
pub fn assemble(
    w: &Writer,
    sequence: bool,
    count: u64,
    compress_min_bytes: usize,
    level: i32,
) -> Result<Vec<u8>> {
    let body = build_body(w);
    let packed = if body.len() >= compress_min_bytes {
        Some(zstd_compress(&body, level)?)
            .filter(|c| c.len() < body.len() && expansion_ok(c.len(), body.len()))
    } else {
        None
    };
    Ok(frame(&body, packed.as_deref(), sequence, count))
}

/// Header + (compressed or raw) body.
pub fn frame(body: &[u8], compressed: Option<&[u8]>, sequence: bool, count: u64) -> Vec<u8> {
    let h = Header {
        sequence,
        compressed: compressed.is_some(),
        count,
        body_len: body.len() as u64,
    };
    let payload = compressed.unwrap_or(body);
    let mut out = Vec::with_capacity(payload.len() + 24);
    h.write(&mut out);
    out.extend_from_slice(payload);
    out
}

/// The most bytes a body read from `payload_len` bytes may decode to: `max_decoded`, and for
/// a compressed body also [`MAX_EXPANSION`] times its size plus [`EXPANSION_SLACK`].
pub fn body_limit(payload_len: usize, compressed: bool, max_decoded: u64) -> u64 {
    if compressed {
        let ratio = (payload_len as u64)
            .saturating_mul(MAX_EXPANSION)
            .saturating_add(EXPANSION_SLACK);
        ratio.min(max_decoded)
    } else {
        max_decoded
    }
}

/// Whether a frame of `frame_len` bytes for a body of `body_len` bytes is within
/// [`MAX_EXPANSION`] (the encoder stores the body raw otherwise).
pub fn expansion_ok(frame_len: usize, body_len: usize) -> bool {
    body_len as u64 <= body_limit(frame_len, true, u64::MAX)
}

/// Parses the header and returns it with the raw body, refusing a body above
/// [`body_limit`] before decompressing anything; `decompress` is called for a compressed body
/// (so the caller can release the GIL around it) and reads at most one byte more than declared.
pub fn open_with(
    data: &[u8],
    max_decoded: u64,
    decompress: impl FnOnce(&[u8], u64) -> Result<Vec<u8>>,
) -> Result<(Header, Vec<u8>)> {
    let (h, off) = Header::parse(data)?;
    let rest = &data[off..];
    let limit = body_limit(rest.len(), h.compressed, max_decoded);
    if h.body_len > limit {
        return Err(CodecError::TooLarge {
            what: if h.compressed {
                "decompressed body"
            } else {
                "body"
            },
            len: h.body_len,
            limit,
        });
    }
    let body = if h.compressed {
        decompress(rest, h.body_len)?
    } else {
        if rest.len() as u64 != h.body_len {
            return Err(if (rest.len() as u64) < h.body_len {
                CodecError::Truncated("body")
            } else {
                CodecError::TrailingBytes(rest.len() - h.body_len as usize)
            });
        }
        rest.to_vec()
    };
    Ok((h, body))
}

/// [`open_with`] using [`zstd_decompress`] and [`DEFAULT_MAX_DECODED_BYTES`].
pub fn open(data: &[u8]) -> Result<(Header, Vec<u8>)> {
    open_with(data, DEFAULT_MAX_DECODED_BYTES, zstd_decompress)
}

/// Where the three streams of a body are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyLayout {
    /// The structure stream.
    pub structure: std::ops::Range<usize>,
    /// The lengths stream.
    pub lengths: std::ops::Range<usize>,
    /// Start of the data stream (it runs to the end of the body).
    pub data: usize,
}

/// Splits a body into its streams, checking that they and the item count fit.
pub fn split_body(body: &[u8], count: u64) -> Result<BodyLayout> {
    let mut r = Reader::new(body);
    let slen = r.count("structure", 1)?;
    let llen = r.count("lengths", 1)?;
    let start = r.position();
    if slen + llen > r.remaining() {
        return Err(CodecError::LengthOutOfBounds {
            what: "structure + lengths",
            len: (slen + llen) as u64,
            remaining: r.remaining(),
        });
    }
    if count > slen as u64 {
        return Err(CodecError::LengthOutOfBounds {
            what: "item count",
            len: count,
            remaining: slen,
        });
    }
    Ok(BodyLayout {
        structure: start..start + slen,
        lengths: start + slen..start + slen + llen,
        data: start + slen + llen,
    })
}

/// Reads payloads: a length from the lengths stream, then that many bytes of data.
#[derive(Debug, Clone)]
pub struct PayloadReader<'a> {
    /// The lengths stream.
    pub lengths: Reader<'a>,
    /// The data stream.
    pub data: Reader<'a>,
}

impl<'a> PayloadReader<'a> {
    /// A length-prefixed payload, bounded by the data that remains.
    #[inline(always)]
    pub fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let n = self.lengths.varint(what)?;
        if n > self.data.remaining() as u64 {
            return Err(CodecError::LengthOutOfBounds {
                what,
                len: n,
                remaining: self.data.remaining(),
            });
        }
        self.data.bytes(n as usize, what)
    }

    /// A length-prefixed UTF-8 string.
    #[inline]
    pub fn str(&mut self, what: &'static str) -> Result<&'a str> {
        std::str::from_utf8(self.len_prefixed(what)?).map_err(|_| CodecError::InvalidUtf8)
    }

    /// 8 data bytes as a little-endian `u64` (no length).
    #[inline]
    pub fn u64_le(&mut self, what: &'static str) -> Result<u64> {
        self.data.u64_le(what)
    }

    /// Unread bytes of both streams.
    pub fn remaining(&self) -> usize {
        self.lengths.remaining() + self.data.remaining()
    }
}

// ---------------------------------------------------------------------------------------------
// validation

/// Whether `b` is what Python's `b.decode("utf-8", "surrogatepass")` accepts: UTF-8 in which
/// lone surrogates (U+D800..U+DFFF) may appear as their 3-byte encodings.
pub fn is_surrogatepass_utf8(mut b: &[u8]) -> bool {
    loop {
        match std::str::from_utf8(b) {
            Ok(_) => return true,
            Err(e) => {
                let rest = &b[e.valid_up_to()..];
                match rest {
                    [0xED, 0xA0..=0xBF, 0x80..=0xBF, ..] => b = &rest[3..],
                    _ => return false,
                }
            }
        }
    }
}

/// The fields-set names an instance may reuse from its template's previous instance, per byte
/// of structure (plus [`REUSE_BUDGET_SLACK`]): a mask bit per field costs 1/8 byte, so honest
/// data stays near 8; a planted template with a huge fields set reused by every instance would
/// otherwise make decoding quadratic.
pub const REUSE_BUDGET_PER_BYTE: u64 = 16;
/// See [`REUSE_BUDGET_PER_BYTE`].
pub const REUSE_BUDGET_SLACK: u64 = 1 << 16;

/// The bits of byte `k` of a mask over `n` fields that stand for fields.
#[inline]
pub fn mask_byte_bits(n: usize, k: usize) -> u8 {
    match n.saturating_sub(k * 8) {
        r if r >= 8 => 0xff,
        r => (1u8 << r) - 1,
    }
}

/// Fields marked in a mask over `n` fields (bits beyond `n` ignored).
pub fn mask_count(mask: &[u8], n: usize) -> u64 {
    mask.iter()
        .enumerate()
        .map(|(k, &b)| u64::from((b & mask_byte_bits(n, k)).count_ones()))
        .sum()
}

struct VTemplate {
    /// Fields.
    n: usize,
    /// Bit `i`: field `i` of the previous instance was a scalar (so a mask bit may reuse it).
    prev: Vec<u8>,
    /// Members of the previous instance's fields set, if there was one.
    prev_fs: Option<u64>,
    /// Instances begun so far: tells a walk that a field's value held an instance of the same
    /// template (which updates `prev` in between).
    seq: u64,
}

fn set_bit(mask: &mut [u8], i: usize, on: bool) {
    if on {
        mask[i / 8] |= 1 << (i % 8);
    } else {
        mask[i / 8] &= !(1 << (i % 8));
    }
}

/// The validator's result: a boxed error keeps `Ok` values in registers on the hot path.
type VResult<T> = std::result::Result<T, Box<CodecError>>;

struct Validator<'a, F> {
    s: Reader<'a>,
    d: PayloadReader<'a>,
    /// The intern table, as payload slices (their UTF-8 was checked when they were read).
    strings: Vec<&'a [u8]>,
    templates: Vec<VTemplate>,
    /// The whole data stream is ASCII, so every string in it is UTF-8: no per-string check.
    data_ascii: bool,
    reuse_budget: u64,
    known_class: F,
}

/// What kind of string a string tag held.
enum VStr<'a> {
    /// UTF-8 (checked).
    Text(&'a [u8]),
    Surrogates,
}

impl<'a, F: FnMut(&str) -> bool> Validator<'a, F> {
    /// A string payload, its UTF-8 checked unless the whole data stream is ASCII.
    #[inline(always)]
    fn utf8(&mut self) -> VResult<&'a [u8]> {
        let b = self.d.len_prefixed("string")?;
        if !self.data_ascii && std::str::from_utf8(b).is_err() {
            return Err(Box::new(CodecError::InvalidUtf8));
        }
        Ok(b)
    }

    /// The string after `tag`, or `None` when `tag` is not a string tag.
    #[inline(always)]
    fn string(&mut self, tag: u8) -> VResult<Option<VStr<'a>>> {
        Ok(Some(match tag {
            TAG_STR_REF => {
                let i = self.s.varint("string reference")?;
                let s = usize::try_from(i)
                    .ok()
                    .and_then(|i| self.strings.get(i))
                    .ok_or(CodecError::BadReference("string reference", i))?;
                VStr::Text(s)
            }
            TAG_STR_NEW => {
                let s = self.utf8()?;
                if self.strings.len() >= INTERN_MAX_ENTRIES {
                    return Err(Box::new(CodecError::Corrupt(
                        "intern table overflow".into(),
                    )));
                }
                self.strings.push(s);
                VStr::Text(s)
            }
            TAG_STR_RAW => VStr::Text(self.utf8()?),
            TAG_STR_SURROGATES => {
                let b = self.d.len_prefixed("string")?;
                if !self.data_ascii && !is_surrogatepass_utf8(b) {
                    return Err(Box::new(CodecError::InvalidUtf8));
                }
                VStr::Surrogates
            }
            _ => return Ok(None),
        }))
    }

    fn str_value(&mut self, what: &str) -> VResult<VStr<'a>> {
        let tag = self.s.u8("tag")?;
        self.string(tag)?.ok_or_else(|| {
            Box::new(CodecError::Corrupt(format!(
                "{what} is not a string (tag {tag})"
            )))
        })
    }

    /// Walks one value; returns whether it is a scalar (what a model's same-field mask may
    /// reuse). `in_key`: inside a dict key, where only hashable builtins may appear.
    fn value(&mut self, depth: usize, in_key: bool) -> VResult<bool> {
        if depth > MAX_DEPTH {
            return Err(Box::new(CodecError::TooDeep));
        }
        let tag = self.s.u8("tag")?;
        if self.string(tag)?.is_some() {
            return Ok(true);
        }
        let unhashable = |what: &str| {
            Err(Box::new(CodecError::Corrupt(format!(
                "dict key is a {what} (unhashable)"
            ))))
        };
        match tag {
            TAG_NONE | TAG_FALSE | TAG_TRUE => {}
            TAG_INT => {
                self.s.varint("int")?;
            }
            TAG_BIGINT => {
                self.d.len_prefixed("big int")?;
            }
            TAG_FLOAT => {
                self.d.u64_le("float")?;
            }
            TAG_BYTES => {
                self.d.len_prefixed("bytes")?;
            }
            TAG_LIST | TAG_TUPLE => {
                if in_key && tag == TAG_LIST {
                    return unhashable("list");
                }
                let n = self
                    .s
                    .count(if tag == TAG_LIST { "list" } else { "tuple" }, 1)?;
                for _ in 0..n {
                    self.value(depth + 1, in_key)?;
                }
                return Ok(false);
            }
            TAG_DICT => {
                if in_key {
                    return unhashable("dict");
                }
                self.dict_body(depth)?;
                return Ok(false);
            }
            TAG_MODEL_DEF | TAG_MODEL if in_key => return unhashable("model instance"),
            TAG_MODEL_DEF => {
                let name = match self.str_value("model name")? {
                    VStr::Text(s) => std::str::from_utf8(s).map_err(|_| CodecError::InvalidUtf8)?,
                    VStr::Surrogates => return Err(Box::new(CodecError::InvalidUtf8)),
                };
                if !(self.known_class)(name) {
                    return Err(Box::new(CodecError::Corrupt(format!(
                        "unknown model class name {name:?} (not registered)"
                    ))));
                }
                let n = self.s.count("model fields", 1)?;
                for _ in 0..n {
                    self.str_value("field name")?;
                }
                let tid = self.templates.len();
                if tid >= INTERN_MAX_ENTRIES {
                    return Err(Box::new(CodecError::Corrupt(
                        "too many model templates".into(),
                    )));
                }
                self.templates.push(VTemplate {
                    n,
                    prev: vec![0; mask_len(n)],
                    prev_fs: None,
                    seq: 0,
                });
                self.model_body(tid, depth)?;
                return Ok(false);
            }
            TAG_MODEL => {
                let id = self.s.varint("model template")?;
                if id >= self.templates.len() as u64 {
                    return Err(Box::new(CodecError::BadReference("model template", id)));
                }
                self.model_body(id as usize, depth)?;
                return Ok(false);
            }
            t => return Err(Box::new(CodecError::UnknownTag(t))),
        }
        Ok(true)
    }

    fn dict_body(&mut self, depth: usize) -> VResult<()> {
        let n = self.s.count("dict", 2)?;
        for _ in 0..n {
            self.value(depth + 1, true)?;
            self.value(depth + 1, false)?;
        }
        Ok(())
    }

    /// Mirrors the decoder's `model_body` step by step (a nested instance of the same template
    /// updates its previous values in between).
    fn model_body(&mut self, tid: usize, depth: usize) -> VResult<()> {
        let flags = self.s.u8("model flags")?;
        if flags & !INST_KNOWN_FLAGS != 0 {
            return Err(Box::new(CodecError::Corrupt(format!(
                "unknown model flags 0x{flags:02x}"
            ))));
        }
        let n = self.templates[tid].n;
        let fs_same = if flags & INST_FIELDS_SET_SAME != 0 {
            let members = self.templates[tid].prev_fs.ok_or(CodecError::BadReference(
                "previous fields set of template",
                tid as u64,
            ))?;
            self.reuse_budget = self.reuse_budget.checked_sub(members).ok_or_else(|| {
                CodecError::Corrupt("fields sets reused more than the data can justify".into())
            })?;
            Some(members)
        } else {
            None
        };
        let mask = self.s.bytes(mask_len(n), "same-field mask")?;
        let mut seq = {
            let t = &mut self.templates[tid];
            t.seq = t.seq.wrapping_add(1);
            t.seq
        };
        // Field by field, as the decoder reads them; 8 at a time while no field's value holds
        // an instance of this same template (which would update `prev` in between).
        let mut i = 0;
        'fields: while i < n {
            if i % 8 == 0 {
                let k = i / 8;
                let bits = mask_byte_bits(n, k);
                let same = mask[k] & bits;
                if same & !self.templates[tid].prev[k] == 0 {
                    let mut todo = !same & bits;
                    while todo != 0 {
                        let b = todo.trailing_zeros() as usize;
                        todo &= todo - 1;
                        let scalar = self.value(depth + 1, false)?;
                        let t = &mut self.templates[tid];
                        set_bit(&mut t.prev, i + b, scalar);
                        if t.seq != seq {
                            seq = t.seq;
                            i += b + 1;
                            continue 'fields;
                        }
                    }
                    i += 8;
                    continue;
                }
            }
            if mask_get(mask, i) {
                if !mask_get(&self.templates[tid].prev, i) {
                    return Err(Box::new(CodecError::BadReference(
                        "previous value of field",
                        i as u64,
                    )));
                }
            } else {
                let scalar = self.value(depth + 1, false)?;
                let t = &mut self.templates[tid];
                set_bit(&mut t.prev, i, scalar);
                seq = t.seq;
            }
            i += 1;
        }
        let members = match fs_same {
            Some(m) => m,
            None => {
                let fs_mask = self.s.bytes(mask_len(n), "fields-set mask")?;
                let set = mask_count(fs_mask, n);
                let others = self.s.count("fields-set names", 1)?;
                for _ in 0..others {
                    self.str_value("fields-set name")?;
                }
                set + others as u64
            }
        };
        self.templates[tid].prev_fs = Some(members);
        if flags & INST_EXTRA_DICT != 0 {
            self.dict_body(depth)?;
        }
        if flags & INST_PRIVATE_DICT != 0 {
            self.dict_body(depth)?;
        }
        Ok(())
    }
}

/// Checks a whole body as the decoder will read it, without building anything: `count` items,
/// every tag, count, length and reference, every string's UTF-8, every model class name
/// (`known_class` says whether this process can build it), the same-field and fields-set
/// references, dict keys that are hashable builtins, and no trailing bytes. A body that passes
/// decodes without a [`CodecError`].
pub fn validate(
    body: &[u8],
    layout: &BodyLayout,
    count: u64,
    known_class: impl FnMut(&str) -> bool,
) -> Result<()> {
    let structure_len = layout.structure.len() as u64;
    let mut v = Validator {
        s: Reader::at(&body[..layout.structure.end], layout.structure.start),
        d: PayloadReader {
            lengths: Reader::at(&body[..layout.lengths.end], layout.lengths.start),
            data: Reader::at(body, layout.data),
        },
        strings: Vec::new(),
        templates: Vec::new(),
        data_ascii: body[layout.data..].is_ascii(),
        reuse_budget: structure_len
            .saturating_mul(REUSE_BUDGET_PER_BYTE)
            .saturating_add(REUSE_BUDGET_SLACK),
        known_class,
    };
    for _ in 0..count {
        v.value(0, false).map_err(|e| *e)?;
    }
    let left = v.s.remaining() + v.d.remaining();
    if left != 0 {
        return Err(CodecError::TrailingBytes(left));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// validation memo

/// Entries smaller than this are validated every time (hashing them costs about as much).
pub const MEMO_MIN_BYTES: usize = 4096;
/// Entries the memo remembers (32-byte keys; the oldest is forgotten first).
pub const MEMO_CAPACITY: usize = 4096;

/// The key of an encoding in a [`ValidatedMemo`]: BLAKE3 of `generation` (of whatever decides
/// which class names validate) and of the stored bytes. A strong hash, not a checksum: finding
/// other bytes with the key of an entry that validated is infeasible, so a planted or damaged
/// entry cannot borrow a good entry's verdict.
pub fn memo_key(generation: u64, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// A bounded set of encodings that passed [`validate`] (by [`memo_key`]): a hot entry is walked
/// once per process, not on every hit. Validity is a function of the stored bytes (the body is
/// their deterministic decompression) and of the class registry, which the key covers.
#[derive(Debug, Default)]
pub struct ValidatedMemo {
    keys: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl ValidatedMemo {
    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` validated before (and is still remembered).
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.keys.contains(key)
    }

    /// Remembers `key`, forgetting the oldest key beyond [`MEMO_CAPACITY`].
    pub fn insert(&mut self, key: [u8; 32]) {
        if self.keys.insert(key) {
            self.order.push_back(key);
            while self.order.len() > MEMO_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.keys.remove(&old);
                }
            }
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn varint_bytes(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_varint(&mut out, v);
        out
    }

    #[test]
    fn varint_known_answers() {
        assert_eq!(varint_bytes(0), [0]);
        assert_eq!(varint_bytes(127), [127]);
        assert_eq!(varint_bytes(128), [0x80, 1]);
        assert_eq!(varint_bytes(300), [0xac, 0x02]);
        assert_eq!(varint_bytes(u64::MAX).len(), 10);
    }

    #[test]
    fn varint_rejects_overflow_and_truncation() {
        let mut r = Reader::new(&[0xff; 11]);
        assert_eq!(r.varint("x"), Err(CodecError::VarintOverflow));
        let mut bad = vec![0xff; 9];
        bad.push(0x02); // 10th byte may only carry one bit
        assert_eq!(
            Reader::new(&bad).varint("x"),
            Err(CodecError::VarintOverflow)
        );
        assert_eq!(
            Reader::new(&[0x80, 0x80]).varint("x"),
            Err(CodecError::Truncated("x"))
        );
    }

    #[test]
    fn zigzag_known_answers() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(i64::MIN), u64::MAX);
    }

    #[test]
    fn counts_are_bounded_by_remaining_input() {
        let mut data = varint_bytes(1 << 40);
        data.extend_from_slice(&[0; 4]);
        let err = Reader::new(&data).count("list", 1).unwrap_err();
        assert!(matches!(err, CodecError::LengthOutOfBounds { .. }));
    }

    #[test]
    fn header_round_trip_and_errors() {
        let h = Header {
            sequence: true,
            compressed: false,
            count: 5000,
            body_len: 123_456,
        };
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(Header::parse(&out).unwrap(), (h, out.len()));
        assert_eq!(Header::parse(b"CG"), Err(CodecError::Truncated("magic")));
        assert_eq!(Header::parse(b"\x80\x04junk"), Err(CodecError::BadMagic));
        assert_eq!(
            Header::parse(b"CGCB\x02\x00\x01\x00"),
            Err(CodecError::UnknownVersion(2))
        );
        assert_eq!(
            Header::parse(b"CGCB\x01\x80\x01\x00"),
            Err(CodecError::UnknownFlags(0x80))
        );
        assert!(Header::parse(b"CGCB\x01\x00\x02\x00").is_err());
        for cut in 0..out.len() {
            assert!(Header::parse(&out[..cut]).is_err());
        }
    }

    #[test]
    fn intern_table_refs_and_limits() {
        let mut t = InternTable::new();
        assert_eq!(t.lookup_or_insert("a"), Interned::New);
        assert_eq!(t.lookup_or_insert("b"), Interned::New);
        assert_eq!(t.lookup_or_insert("a"), Interned::Existing(0));
        assert_eq!(t.lookup_or_insert("b"), Interned::Existing(1));
        let long = "x".repeat(INTERN_MAX_LEN + 1);
        assert_eq!(t.lookup_or_insert(&long), Interned::NotInterned);
        assert_eq!(t.len(), 2);
        let mut d: DecodeTable<String> = DecodeTable::new();
        d.push("a".into()).unwrap();
        assert_eq!(d.get(0).unwrap(), "a");
        assert_eq!(
            d.get(1),
            Err(CodecError::BadReference("string reference", 1))
        );
        assert_eq!(
            d.get(u64::MAX),
            Err(CodecError::BadReference("string reference", u64::MAX))
        );
    }

    #[test]
    fn assemble_open_raw_and_compressed() {
        let mut w = Writer::default();
        let mut t = InternTable::new();
        for i in 0..500 {
            w.int(i);
            w.string(&mut t, "chat.completion.chunk");
        }
        for min in [0, usize::MAX] {
            let enc = assemble(&w, true, 1000, min, 3).unwrap();
            let (h, body) = open(&enc).unwrap();
            assert_eq!(h.compressed, min == 0);
            assert_eq!(body, build_body(&w));
            let l = split_body(&body, h.count).unwrap();
            assert_eq!(&body[l.structure], &w.structure[..]);
            assert_eq!(&body[l.lengths], &w.lengths[..]);
            assert_eq!(&body[l.data..], &w.data[..]);
            for cut in 0..enc.len() {
                assert!(open(&enc[..cut]).is_err(), "cut {cut}");
            }
        }
    }

    #[test]
    fn zstd_size_mismatch_is_an_error() {
        let frame = zstd_compress(&[7u8; 1000], 3).unwrap();
        assert!(zstd_decompress(&frame, 999).is_err());
        assert!(zstd_decompress(&frame, 1001).is_err());
        assert!(zstd_decompress(&frame, u64::MAX).is_err());
        assert_eq!(zstd_decompress(&frame, 1000).unwrap(), vec![7u8; 1000]);
        assert!(zstd_decompress(b"garbage!", 10).is_err());
    }

    #[test]
    fn bulk_and_streaming_decompression_agree() {
        let body: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let n = body.len() as u64;
        let f = zstd_compress(&body, 3).unwrap();
        assert_eq!(zstd_decompress(&f, n).unwrap(), body);
        assert_eq!(zstd_decompress_streaming(&f, n).unwrap(), body);
        let mut two = f.clone();
        two.extend_from_slice(&f);
        for (frame, e) in [(&f, 0), (&f, n - 1), (&f, n + 1), (&two, n), (&two, 2 * n)] {
            assert_eq!(
                zstd_decompress(frame, e),
                zstd_decompress_streaming(frame, e)
            );
        }
        assert!(zstd_decompress(&f[..f.len() - 1], n).is_err());
    }

    /// A zstd frame of `prefix` then `fill` zero bytes, in 4 bytes per 128 KiB (RLE blocks).
    fn rle_frame(prefix: &[u8], mut fill: usize) -> Vec<u8> {
        let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
        let mut blocks: Vec<(u32, usize, Vec<u8>)> = vec![(0, prefix.len(), prefix.to_vec())];
        while fill > 0 {
            let n = fill.min(128 * 1024);
            blocks.push((1, n, vec![0]));
            fill -= n;
        }
        let last = blocks.len() - 1;
        for (i, (kind, size, content)) in blocks.into_iter().enumerate() {
            let h = u32::from(i == last) | (kind << 1) | ((size as u32) << 3);
            out.extend_from_slice(&h.to_le_bytes()[..3]);
            out.extend_from_slice(&content);
        }
        out
    }

    fn body_of(structure: &[u8], lengths: &[u8], data: &[u8]) -> Vec<u8> {
        let mut b = varint_bytes(structure.len() as u64);
        b.extend(varint_bytes(lengths.len() as u64));
        b.extend_from_slice(structure);
        b.extend_from_slice(lengths);
        b.extend_from_slice(data);
        b
    }

    fn check(body: &[u8], count: u64) -> Result<()> {
        let layout = split_body(body, count)?;
        validate(body, &layout, count, |name| name == "Known")
    }

    #[test]
    fn rle_bomb_is_refused_from_the_header() {
        let n = 1usize << 28;
        let mut prefix = varint_bytes(n as u64);
        prefix.push(0);
        let frame = rle_frame(&prefix, n);
        assert!(frame.len() < 9000);
        let mut enc = Vec::new();
        Header {
            sequence: true,
            compressed: true,
            count: n as u64,
            body_len: (prefix.len() + n) as u64,
        }
        .write(&mut enc);
        enc.extend_from_slice(&frame);
        let decompressed = std::cell::Cell::new(false);
        let err = open_with(&enc, DEFAULT_MAX_DECODED_BYTES, |f, e| {
            decompressed.set(true);
            zstd_decompress(f, e)
        })
        .unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err}");
        assert!(!decompressed.get());
        assert_eq!(body_limit(1000, true, u64::MAX), 256_000 + EXPANSION_SLACK);
        assert_eq!(body_limit(1000, true, 10), 10);
        assert_eq!(body_limit(1000, false, 10), 10);
        assert!(expansion_ok(1000, 1_000_000) && !expansion_ok(1000, 2_000_000));
    }

    #[test]
    fn validate_checks_counts_references_strings_and_trailing_bytes() {
        assert_eq!(check(&body_of(&[TAG_NONE], &[], &[]), 1), Ok(()));
        // a list declaring more items than the structure holds
        let mut s = vec![TAG_LIST];
        s.extend(varint_bytes(1 << 28));
        s.extend([0; 16]);
        assert!(matches!(
            check(&body_of(&s, &[], &[]), 1),
            Err(CodecError::LengthOutOfBounds { what: "list", .. })
        ));
        // a back-reference to a string never seen
        assert_eq!(
            check(&body_of(&[TAG_STR_REF, 0], &[], &[]), 1),
            Err(CodecError::BadReference("string reference", 0))
        );
        assert_eq!(
            check(&body_of(&[TAG_STR_NEW], &[2], &[0xc3, 0x28]), 1),
            Err(CodecError::InvalidUtf8)
        );
        assert_eq!(
            check(
                &body_of(&[TAG_STR_SURROGATES], &[3], &[0xed, 0xa0, 0x80]),
                1
            ),
            Ok(())
        );
        assert_eq!(
            check(&body_of(&[TAG_NONE], &[], &[7]), 1),
            Err(CodecError::TrailingBytes(1))
        );
        assert_eq!(
            check(&body_of(&[TAG_NONE, TAG_NONE], &[], &[]), 1),
            Err(CodecError::TrailingBytes(1))
        );
        // {[]: None}
        assert!(check(&body_of(&[TAG_DICT, 1, TAG_LIST, 0, TAG_NONE], &[], &[]), 1).is_err());
        // a model of a class this process does not know, then one it knows
        let model = |name: &[u8]| {
            body_of(
                &[TAG_MODEL_DEF, TAG_STR_NEW, 0, 0, 0],
                &[name.len() as u8],
                name,
            )
        };
        assert!(matches!(
            check(&model(b"Other"), 1),
            Err(CodecError::Corrupt(m)) if m.contains("unknown model class name")
        ));
        assert_eq!(check(&model(b"Known"), 1), Ok(()));
    }

    #[test]
    fn surrogatepass_matches_python() {
        assert!(is_surrogatepass_utf8(b"abc"));
        assert!(is_surrogatepass_utf8(b"a\xed\xa0\x80b\xed\xbf\xbf"));
        assert!(!is_surrogatepass_utf8(b"\xed\xa0"));
        assert!(!is_surrogatepass_utf8(b"\xff"));
        assert!(!is_surrogatepass_utf8(b"\xc0\x80")); // overlong
    }

    #[test]
    fn memo_is_bounded_and_keyed_by_content_and_generation() {
        let mut m = ValidatedMemo::new();
        let a = memo_key(0, b"entry");
        assert_ne!(a, memo_key(1, b"entry"));
        assert_ne!(a, memo_key(0, b"entrz"));
        assert!(!m.contains(&a));
        m.insert(a);
        m.insert(a);
        assert!(m.contains(&a) && m.len() == 1);
        for i in 0..MEMO_CAPACITY as u64 {
            m.insert(memo_key(i, b"other"));
        }
        assert_eq!(m.len(), MEMO_CAPACITY);
        assert!(!m.contains(&a), "the oldest key is forgotten first");
        assert!(m.contains(&memo_key(MEMO_CAPACITY as u64 - 1, b"other")));
    }

    proptest! {
        #[test]
        fn varint_round_trip(v: u64) {
            let b = varint_bytes(v);
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.varint("v").unwrap(), v);
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn zigzag_round_trip(v: i64) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }

        #[test]
        fn reader_never_panics(data: Vec<u8>) {
            let mut r = Reader::new(&data);
            let _ = r.varint("a");
            let _ = r.str("b");
            let _ = r.count("c", 2);
            let _ = r.u64_le("d");
            let _ = open(&data);
        }

        #[test]
        fn intern_round_trip(words in proptest::collection::vec("[a-c]{0,3}", 0..50)) {
            let mut w = Writer::default();
            let mut t = InternTable::new();
            for s in &words { w.string(&mut t, s); }
            let mut st = Reader::new(&w.structure);
            let mut da = PayloadReader { lengths: Reader::new(&w.lengths), data: Reader::new(&w.data) };
            let mut d: DecodeTable<String> = DecodeTable::new();
            for s in &words {
                let got = match st.u8("tag").unwrap() {
                    TAG_STR_NEW => { let v = da.str("s").unwrap().to_string(); d.push(v.clone()).unwrap(); v }
                    TAG_STR_REF => d.get(st.varint("i").unwrap()).unwrap().clone(),
                    t => panic!("tag {t}"),
                };
                prop_assert_eq!(&got, s);
            }
        }

        #[test]
        fn validate_never_panics(body: Vec<u8>, count in 0u64..64) {
            if let Ok(layout) = split_body(&body, count) {
                let _ = validate(&body, &layout, count, |n| n.len() % 2 == 0);
            }
        }

        #[test]
        fn truncated_or_mutated_frames_error_not_panic(
            n in 0usize..300, cut in 0usize..2000, flip in 0usize..2000, bit in 0u8..8, min in 0usize..2,
        ) {
            let mut w = Writer::default();
            let mut t = InternTable::new();
            for i in 0..n { w.int(i as i64); w.string(&mut t, &format!("s{}", i % 7)); }
            let enc = assemble(&w, true, n as u64, if min == 0 { 0 } else { usize::MAX }, 3).unwrap();
            let cut = cut % (enc.len() + 1);
            if cut < enc.len() { prop_assert!(open(&enc[..cut]).is_err()); }
            let mut m = enc.clone();
            let i = flip % m.len();
            m[i] ^= 1 << bit;
            let _ = open(&m).and_then(|(h, b)| split_body(&b, h.count).map(|_| ()));
        }
    }
}

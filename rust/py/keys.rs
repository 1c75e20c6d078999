//! `hash_request`: walks Python request objects straight into the canonical encoding of
//! [`crate::keys`] (no `json.dumps`, no intermediate tree).
//!
//! Python types map onto the encoding as follows (subclasses included, so `StrEnum`,
//! `IntEnum`, `OrderedDict` and namedtuples work):
//! - `None`, `bool`, `int` (any size), `float`, `str`, `bytes`/`bytearray` (one type);
//! - `list` and `tuple` alike (JSON and the OpenAI client use them interchangeably);
//! - `dict`, in any insertion order, with keys of any supported type;
//! - a pydantic v2 model as the dict of its *set* fields (`model_fields_set`) plus its extra
//!   fields, i.e. what `model_dump(exclude_unset=True)` holds, so a message model and the dict
//!   it was built from hash the same; fields by their Python names, not their aliases;
//! - a dataclass instance as the dict of all its `dataclasses.fields`.
//!
//! Anything else (sets, arbitrary objects, ...) is a `TypeError` naming the type and where it
//! sits; there is no `str()`/`repr()` fallback. Nesting deeper than
//! [`crate::keys::MAX_DEPTH`] (or a container holding itself) is a `ValueError`.
//!
//! The GIL stays held: the walk reads Python objects throughout (and requests are small, so
//! detaching would cost more than it frees). Speed comes from exact-type dispatch, UTF-8 read
//! straight from `str` objects, a buffered hasher, and per-thread reused buffers.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PySet, PyString, PyTuple, PyType,
};

use crate::keys::{Encode, KeyError, KeyErrorKind, KeyHasher, KeyOrder, Segment, Sink, MAX_DEPTH};

/// The walk failed: a value the encoding rejects, or a Python exception raised under it.
/// Boxed, so that every level of the walk returns a one-word `Result` (a wide one costs a
/// store-and-reload on each return).
struct WalkError(Box<Failure>);

enum Failure {
    Key(KeyError),
    Py(PyErr),
}

impl WalkError {
    #[cold]
    fn key(kind: KeyErrorKind) -> Self {
        WalkError(Box::new(Failure::Key(KeyError::new(kind))))
    }

    #[cold]
    fn within(mut self, segment: impl FnOnce() -> Segment) -> Self {
        if let Failure::Key(e) = *self.0 {
            *self.0 = Failure::Key(e.within(segment()));
        }
        self
    }
}

impl From<PyErr> for WalkError {
    #[cold]
    fn from(err: PyErr) -> Self {
        WalkError(Box::new(Failure::Py(err)))
    }
}

impl From<WalkError> for PyErr {
    fn from(err: WalkError) -> PyErr {
        match *err.0 {
            Failure::Py(err) => err,
            Failure::Key(err) => match err.kind {
                KeyErrorKind::Unsupported(_) => PyTypeError::new_err(err.to_string()),
                KeyErrorKind::DuplicateKey | KeyErrorKind::TooDeep => {
                    PyValueError::new_err(err.to_string())
                }
            },
        }
    }
}

type WalkResult = Result<(), WalkError>;

/// `pydantic.BaseModel`, once some import of pydantic has happened (never imported here).
static PYDANTIC_BASE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
/// `dataclasses.fields`.
static DATACLASS_FIELDS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn pydantic_base(py: Python<'_>) -> PyResult<Option<&Bound<'_, PyType>>> {
    if let Some(base) = PYDANTIC_BASE.get(py) {
        return Ok(Some(base.bind(py)));
    }
    let modules = py.import("sys")?.getattr("modules")?;
    let Ok(pydantic) = modules.get_item("pydantic") else {
        return Ok(None);
    };
    let base = pydantic.getattr("BaseModel")?.cast_into::<PyType>()?;
    Ok(Some(
        PYDANTIC_BASE.get_or_init(py, || base.unbind()).bind(py),
    ))
}

type Entries<'py> = Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>;

/// Buffers kept between calls on one thread: the hasher's buffer and a [`KeyOrder`] per
/// nesting level (sibling dicts, and later requests, reuse the allocations).
#[derive(Default)]
struct Scratch {
    hasher_buf: Vec<u8>,
    orders: Vec<KeyOrder>,
}

thread_local! {
    // Taken for the duration of a call; a re-entrant call (from a model's Python code) finds
    // it empty and allocates its own.
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

/// One pass over one request. Entry lists are per call (they hold references), one per
/// nesting level, reused by sibling dicts.
struct Walker<'py> {
    py: Python<'py>,
    orders: Vec<KeyOrder>,
    entries: Vec<Entries<'py>>,
}

/// How a mapping's entries are named in error paths.
#[derive(Clone, Copy)]
enum Naming {
    /// `['key']`: a dict.
    Keys,
    /// `.field`: a model or a dataclass.
    Fields,
}

impl<'py> Walker<'py> {
    fn new(py: Python<'py>, scratch: &mut Scratch) -> Self {
        Walker {
            py,
            orders: std::mem::take(&mut scratch.orders),
            entries: Vec::new(),
        }
    }

    fn into_scratch(self, scratch: &mut Scratch) {
        // Keep buffers for the first few levels only, and none of a huge request's size.
        const KEEP_LEVELS: usize = 16;
        const KEEP_BYTES: usize = 64 * 1024;
        let mut orders = self.orders;
        orders.truncate(KEEP_LEVELS);
        orders.iter_mut().for_each(|o| o.clear_and_trim(KEEP_BYTES));
        scratch.orders = orders;
    }

    fn walk<S: Sink>(&mut self, sink: &mut S, obj: &Bound<'py, PyAny>, depth: usize) -> WalkResult {
        // Exact types first: one pointer comparison each, in order of frequency.
        if obj.is_exact_instance_of::<PyString>() {
            // SAFETY: the exact type was checked just above.
            return write_str(sink, unsafe { obj.cast_unchecked::<PyString>() });
        }
        if obj.is_exact_instance_of::<PyDict>() {
            // SAFETY: the exact type was checked just above.
            return self.walk_dict(sink, unsafe { obj.cast_unchecked::<PyDict>() }, depth);
        }
        if obj.is_exact_instance_of::<PyList>() {
            // SAFETY: the exact type was checked just above.
            return self.walk_list(sink, unsafe { obj.cast_unchecked::<PyList>() }, depth);
        }
        if obj.is_exact_instance_of::<PyInt>() {
            write_int(sink, obj);
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyBool>() {
            sink.boolean(obj.is(PyBool::new(self.py, true)));
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyFloat>() {
            // SAFETY: the exact type was checked just above.
            sink.float(unsafe { obj.cast_unchecked::<PyFloat>() }.value());
            return Ok(());
        }
        if obj.is_none() {
            sink.none();
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyTuple>() {
            // SAFETY: the exact type was checked just above.
            return self.walk_tuple(sink, unsafe { obj.cast_unchecked::<PyTuple>() }, depth);
        }
        self.walk_other(sink, obj, depth)
    }

    /// Subclasses of the supported types, bytes, models and dataclasses: the rare cases.
    #[inline(never)]
    fn walk_other<S: Sink>(
        &mut self,
        sink: &mut S,
        obj: &Bound<'py, PyAny>,
        depth: usize,
    ) -> WalkResult {
        if let Ok(s) = obj.cast::<PyString>() {
            return write_str(sink, s);
        }
        if obj.is_instance_of::<PyInt>() {
            // bool cannot be subclassed, so this is an int subclass (IntEnum, ...).
            write_int(sink, obj);
            return Ok(());
        }
        if let Ok(f) = obj.cast::<PyFloat>() {
            sink.float(f.value());
            return Ok(());
        }
        if let Ok(b) = obj.cast::<PyBytes>() {
            sink.bytes(b.as_bytes());
            return Ok(());
        }
        if let Ok(b) = obj.cast::<PyByteArray>() {
            sink.bytes(&b.to_vec());
            return Ok(());
        }
        if let Ok(d) = obj.cast::<PyDict>() {
            return self.walk_dict(sink, d, depth);
        }
        if let Ok(l) = obj.cast::<PyList>() {
            return self.walk_list(sink, l, depth);
        }
        if let Ok(t) = obj.cast::<PyTuple>() {
            return self.walk_tuple(sink, t, depth);
        }
        if !obj.is_instance_of::<PyType>() && !obj.is_instance_of::<PySet>() {
            if let Some(entries) = self.model_entries(obj)? {
                return self.walk_entries(sink, entries, depth, Naming::Fields);
            }
        }
        let type_name = obj.get_type().name()?.to_string();
        Err(WalkError::key(KeyErrorKind::Unsupported(type_name)))
    }

    /// The `(name, value)` fields of a pydantic model or a dataclass instance, else `None`.
    fn model_entries(&self, obj: &Bound<'py, PyAny>) -> PyResult<Option<Entries<'py>>> {
        let py = self.py;
        let ty = obj.get_type();
        if ty.hasattr(pyo3::intern!(py, "__dataclass_fields__"))? {
            let fields = DATACLASS_FIELDS
                .get_or_try_init(py, || {
                    Ok::<_, PyErr>(py.import("dataclasses")?.getattr("fields")?.unbind())
                })?
                .bind(py)
                .call1((obj,))?;
            let mut out = Vec::new();
            for field in fields.try_iter()? {
                let name = field?.getattr(pyo3::intern!(py, "name"))?;
                let value = obj.getattr(name.cast::<PyString>()?)?;
                out.push((name, value));
            }
            return Ok(Some(out));
        }
        let Some(base) = pydantic_base(py)? else {
            return Ok(None);
        };
        if !obj.is_instance(base)? {
            return Ok(None);
        }
        let fields_set = obj.getattr(pyo3::intern!(py, "__pydantic_fields_set__"))?;
        let values = obj.getattr(pyo3::intern!(py, "__dict__"))?;
        let values = values.cast::<PyDict>()?;
        let mut out = Vec::with_capacity(values.len());
        for (name, value) in values.iter() {
            if fields_set.contains(&name)? {
                out.push((name, value));
            }
        }
        let extra = obj.getattr(pyo3::intern!(py, "__pydantic_extra__"))?;
        if let Ok(extra) = extra.cast::<PyDict>() {
            out.extend(extra.iter());
        }
        Ok(Some(out))
    }

    fn walk_list<S: Sink>(
        &mut self,
        sink: &mut S,
        list: &Bound<'py, PyList>,
        depth: usize,
    ) -> WalkResult {
        check_depth(depth)?;
        let len = list.len();
        sink.list_header(len);
        for i in 0..len {
            // An IndexError here means the list shrank under us (code run by a model getter).
            let item = list.get_item(i)?;
            self.walk(sink, &item, depth + 1)
                .map_err(|e| e.within(|| Segment::Index(i)))?;
        }
        Ok(())
    }

    fn walk_tuple<S: Sink>(
        &mut self,
        sink: &mut S,
        tuple: &Bound<'py, PyTuple>,
        depth: usize,
    ) -> WalkResult {
        check_depth(depth)?;
        sink.list_header(tuple.len());
        for (i, item) in tuple.iter_borrowed().enumerate() {
            self.walk(sink, &item, depth + 1)
                .map_err(|e| e.within(|| Segment::Index(i)))?;
        }
        Ok(())
    }

    fn walk_dict<S: Sink>(
        &mut self,
        sink: &mut S,
        dict: &Bound<'py, PyDict>,
        depth: usize,
    ) -> WalkResult {
        check_depth(depth)?;
        let mut entries = self.take_entries(depth);
        entries.reserve(dict.len());
        let mut pos: ffi::Py_ssize_t = 0;
        let (mut key, mut value) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: PyDict_Next over a live dict (held by `dict`) with the GIL held; it hands out
        // borrowed references, which are turned into owned ones at once. No Python code runs
        // in this loop, so the dict cannot change under it.
        unsafe {
            while ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut value) != 0 {
                entries.push((
                    Bound::from_borrowed_ptr(self.py, key),
                    Bound::from_borrowed_ptr(self.py, value),
                ));
            }
        }
        self.walk_entries(sink, entries, depth, Naming::Keys)
    }

    fn take_entries(&mut self, depth: usize) -> Entries<'py> {
        match self.entries.get_mut(depth) {
            Some(slot) => std::mem::take(slot),
            None => Vec::new(),
        }
    }

    /// Writes a mapping: keys encoded apart, sorted, then `key value` pairs in that order.
    #[inline(never)]
    fn walk_entries<S: Sink>(
        &mut self,
        sink: &mut S,
        mut entries: Entries<'py>,
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        check_depth(depth)?;
        if self.entries.len() <= depth {
            self.entries.resize_with(depth + 1, Vec::new);
        }
        let result = match self.write_str_keyed(sink, &entries, depth, naming) {
            Some(result) => result,
            None => self.write_sorted_entries(sink, &entries, depth, naming),
        };
        entries.clear();
        self.entries[depth] = entries;
        result
    }

    /// The general path: keys of any type, encoded apart and sorted by [`KeyOrder`].
    #[inline(never)]
    fn write_sorted_entries<S: Sink>(
        &mut self,
        sink: &mut S,
        entries: &[(Bound<'py, PyAny>, Bound<'py, PyAny>)],
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        if self.orders.len() <= depth {
            self.orders.resize_with(depth + 1, KeyOrder::default);
        }
        // Level `depth` owns this buffer; keys and values nest at `depth + 1` and up.
        let mut order = std::mem::take(&mut self.orders[depth]);
        order.clear();
        let result = self.write_entries(sink, &mut order, entries, depth, naming);
        self.orders[depth] = order;
        result
    }

    fn write_entries<S: Sink>(
        &mut self,
        sink: &mut S,
        order: &mut KeyOrder,
        entries: &[(Bound<'py, PyAny>, Bound<'py, PyAny>)],
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        for (i, (key, _)) in entries.iter().enumerate() {
            if key.is_exact_instance_of::<PyString>() {
                // The usual key, inlined.
                // SAFETY: the exact type was checked just above.
                write_str(order.key_sink(), unsafe {
                    key.cast_unchecked::<PyString>()
                })?;
            } else {
                let keyed = self.walk(order.key_sink(), key, depth + 1);
                keyed.map_err(|e| e.within(|| Segment::DictKey))?;
            }
            order.finish_key(i);
        }
        if order.sort().is_err() {
            return Err(WalkError::key(KeyErrorKind::DuplicateKey));
        }
        sink.dict_header(entries.len());
        for (key_bytes, i) in order.iter() {
            sink.put(key_bytes);
            let (key, value) = &entries[i];
            self.walk(sink, value, depth + 1)
                .map_err(|e| e.within(|| segment_for(key, naming)))?;
        }
        Ok(())
    }
}

/// Most request dicts: at most [`SMALL_DICT`] entries, every key an exact `str`.
const SMALL_DICT: usize = 16;

impl<'py> Walker<'py> {
    /// The fast path of [`Walker::write_entries`] for small dicts keyed by exact `str`s, or
    /// `None` to take the general path.
    #[inline]
    fn write_str_keyed<S: Sink>(
        &mut self,
        sink: &mut S,
        entries: &[(Bound<'py, PyAny>, Bound<'py, PyAny>)],
        depth: usize,
        naming: Naming,
    ) -> Option<WalkResult> {
        // Only the 16-byte permutation stays in this (recursive) frame.
        let order = match str_key_order(entries)? {
            Ok(order) => order,
            Err(e) => return Some(Err(e)),
        };
        sink.dict_header(entries.len());
        for &i in &order[..entries.len()] {
            let (key, value) = &entries[usize::from(i)];
            // SAFETY: str_key_order checked that every key is an exact str, and read its UTF-8
            // (now cached on the immutable str), so this cannot fail.
            let utf8 = utf8_of(unsafe { key.cast_unchecked::<PyString>() }).unwrap_or_default();
            sink.str_utf8(utf8);
            if let Err(e) = self.walk(sink, value, depth + 1) {
                return Some(Err(e.within(|| segment_for(key, naming))));
            }
        }
        Some(Ok(()))
    }
}

/// The canonical order of a small dict whose keys are all exact `str`s (as indices into
/// `entries`), or `None` if the dict is not such a dict. The encodings of two strs compare
/// like their `(UTF-8 length, UTF-8 bytes)` (tag equal, big-endian length first), so the keys
/// are sorted without being encoded apart.
#[inline(never)]
fn str_key_order(
    entries: &[(Bound<'_, PyAny>, Bound<'_, PyAny>)],
) -> Option<Result<[u8; SMALL_DICT], WalkError>> {
    let n = entries.len();
    if n > SMALL_DICT {
        return None;
    }
    let mut keys: [&[u8]; SMALL_DICT] = [&[]; SMALL_DICT];
    for (i, (key, _)) in entries.iter().enumerate() {
        if !key.is_exact_instance_of::<PyString>() {
            return None;
        }
        // SAFETY: the exact type was checked just above.
        keys[i] = utf8_of(unsafe { key.cast_unchecked::<PyString>() })?;
    }
    let mut order = [0u8; SMALL_DICT];
    for (i, slot) in order.iter_mut().enumerate() {
        *slot = i as u8;
    }
    let rank = |i: u8| (keys[usize::from(i)].len(), keys[usize::from(i)]);
    // Insertion sort: n is small and usually 2-4.
    for i in 1..n {
        let mut j = i;
        while j > 0 && rank(order[j - 1]) > rank(order[j]) {
            order.swap(j - 1, j);
            j -= 1;
        }
    }
    if order[..n].windows(2).any(|w| rank(w[0]) == rank(w[1])) {
        // Equal exact strs are one dict key; only model fields and extras could meet here.
        return Some(Err(WalkError::key(KeyErrorKind::DuplicateKey)));
    }
    Some(Ok(order))
}

fn check_depth(depth: usize) -> WalkResult {
    if depth >= MAX_DEPTH {
        Err(WalkError::key(KeyErrorKind::TooDeep))
    } else {
        Ok(())
    }
}

/// The error-path segment of a mapping entry (only built when an error unwinds).
fn segment_for(key: &Bound<'_, PyAny>, naming: Naming) -> Segment {
    match naming {
        Naming::Fields => Segment::Field(key.to_string()),
        Naming::Keys => Segment::Key(
            key.repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".to_owned()),
        ),
    }
}

#[inline]
fn write_str<S: Sink>(sink: &mut S, s: &Bound<'_, PyString>) -> WalkResult {
    match utf8_of(s) {
        Some(utf8) => sink.str_utf8(utf8),
        None => {
            // Lone surrogates: their `surrogatepass` bytes are never valid UTF-8, so they
            // cannot collide with any real string.
            let bytes =
                s.call_method1(pyo3::intern!(s.py(), "encode"), ("utf-8", "surrogatepass"))?;
            sink.str_utf8(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
        }
    }
    Ok(())
}

/// A str's UTF-8, borrowed from the object (its cached UTF-8, or the data itself for ASCII),
/// or `None` for a str with lone surrogates. (`PyString::to_str` without its error object.)
#[inline]
fn utf8_of<'a>(s: &'a Bound<'_, PyString>) -> Option<&'a [u8]> {
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `s` is a live str (the Bound holds a reference) and the GIL is held.
    let data = unsafe { ffi::PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut size) };
    if data.is_null() {
        // The UnicodeEncodeError it set is replaced by the caller's fallback.
        drop(PyErr::take(s.py()));
        return None;
    }
    // SAFETY: CPython keeps `size` bytes of UTF-8 at `data` alive as long as the str object,
    // which outlives the borrow `'a`; strs are immutable.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size as usize) })
}

#[inline]
fn write_int<S: Sink>(sink: &mut S, obj: &Bound<'_, PyAny>) {
    let mut overflow = 0;
    // SAFETY: `obj` is an int (or subclass) kept alive by the Bound; with an int argument
    // PyLong_AsLongLongAndOverflow cannot fail, it only reports overflow through the flag.
    let small = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
    if overflow == 0 {
        sink.int_i64(small);
    } else {
        let big: num_bigint::BigInt = obj.extract().expect("an int always converts to BigInt");
        sink.int_big(&big);
    }
}

/// Hashes a request (messages, params, ...) to a 32-byte BLAKE3 digest of its canonical,
/// typed encoding.
///
/// Supported: None, bool, int (any size), float, str, bytes/bytearray, list/tuple (which
/// hash alike), dict (insertion order never matters), pydantic v2 models (as the dict of their
/// set fields and extras) and dataclass instances (as the dict of their fields). Values of
/// different types never collide: "1", True, b"1", 1 and 1.0 all differ; -0.0 hashes as 0.0
/// and every NaN alike.
///
/// Raises TypeError for any other type, naming it and where it sits
/// (e.g. "cannot hash object of type 'set' at [0]['content']"), and ValueError for nesting
/// deeper than 256 levels (or a container holding itself) and for dicts with two different
/// keys of the same encoding.
#[pyfunction]
#[pyo3(signature = (obj, /))]
pub fn hash_request<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut scratch = SCRATCH.take().unwrap_or_default();
    let mut hasher = KeyHasher::with_buffer(std::mem::take(&mut scratch.hasher_buf));
    let mut walker = Walker::new(py, &mut scratch);
    let walked = walker.walk(&mut hasher, obj, 0);
    walker.into_scratch(&mut scratch);
    let (digest, buf) = hasher.finalize_keep_buffer();
    scratch.hasher_buf = buf;
    SCRATCH.set(Some(scratch));
    walked?;
    Ok(PyBytes::new(py, &digest))
}

/// Adds `hash_request` to `chengeta_ai._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hash_request, m)?)?;
    Ok(())
}

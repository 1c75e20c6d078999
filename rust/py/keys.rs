//! `hash_request`: walks Python request objects straight into the canonical encoding of
//! [`crate::keys`] (no `json.dumps`, no intermediate tree).
//!
//! Python types map onto the encoding (formats 3 and 4: `crate::keys`) as follows:
//! - `None`, `bool`, `int` (any size), `float`, `str`, `bytes`/`bytearray` (one type);
//! - `list` and `tuple` alike (JSON and the OpenAI client use them interchangeably);
//! - `dict`, in any insertion order, with keys of any supported type;
//! - *records*, objects whose class decides what is sent, as their class identity
//!   (`__module__` and `__qualname__`) and every field value, defaults included:
//!   - a pydantic v2 model: every field of `model_fields` (by Python name, not alias, whether
//!     set or defaulted), plus its extras (`__pydantic_extra__`); not its private attributes,
//!     computed fields or cached properties (they derive from the class and the fields);
//!   - a dataclass instance: every field of `dataclasses.fields`;
//!   - a named tuple (a tuple subclass with `_fields`): its items by field name;
//! - any other subclass of the types above hashes as its base value: `str`/`int` enum
//!   members as their value, `OrderedDict` and `defaultdict` as dicts, list subclasses as
//!   lists (they are sent as that value).
//!
//! So a model and the dict of its fields, two models of different classes with equal fields,
//! a subclass and its base, never share a digest; a model and its `model_copy` always do, and
//! so does a model with a default left unset and the same model with the default spelt out.
//! What a class is (record or not, its fields, its identity) is worked out once per class and
//! cached ([`CLASS_CACHE`]).
//!
//! Anything else (sets, plain enums, arbitrary objects, ...) is a `TypeError` naming the type
//! and where it sits; there is no `str()`/`repr()` fallback. Nesting deeper than
//! [`crate::keys::MAX_DEPTH`] (or a container holding itself) is a `ValueError`. Errors carry
//! their final message: given `names`, a top-level tuple's items are named in it
//! (`at messages[0]['content']`).
//!
//! The GIL stays held: the walk reads Python objects throughout (and requests are small, so
//! detaching would cost more than it frees). Speed comes from exact-type dispatch, UTF-8 read
//! straight from `str` objects, borrowed references (no reference counting, which the stable
//! ABI makes a call per object: see [`Walker`]), short strs remembered by address within a
//! walk ([`StrCache`]), a buffered hasher, and per-thread reused buffers and hasher. The garbage
//! collector is paused while the walk holds borrowed references.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType,
};
use pyo3::Borrowed;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::keys::{
    short_encoding, Encode, KeyError, KeyErrorKind, KeyHasher, KeyOrder, Segment, Sink, MAX_DEPTH,
    SHORT_STR,
};

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

/// How the walk treats instances of one class.
enum ClassKind {
    /// Not a record: a subclass of a supported type (hashed as its base), or unsupported.
    Plain,
    /// A pydantic v2 model: these `model_fields` names, read from the instance `__dict__`,
    /// then the extras.
    Pydantic(Vec<Py<PyString>>),
    /// A dataclass: these `dataclasses.fields` names, read with `getattr`.
    Dataclass(Vec<Py<PyString>>),
    /// A named tuple: its items, named by these `_fields`.
    NamedTuple(Vec<Py<PyString>>),
}

/// What the walk knows about a class, worked out once ([`class_info`]).
struct ClassInfo {
    /// The class itself: a strong reference, so that while it is cached no other class can
    /// take its address (the cache key).
    _class: Py<PyType>,
    kind: ClassKind,
    /// The record header ([`Encode::record_header`]) of the class's module and qualname.
    identity: Vec<u8>,
}

/// Classes seen by the walk, by address. Classes can be redefined under the same name (a
/// notebook, `create_model` in a loop), so the key is the class object, held by a strong
/// reference; at [`CLASS_CACHE_MAX`] classes the whole cache is dropped and refilled, so that
/// classes made on the fly are not kept alive for good.
///
/// Locking: the module holds the GIL, but the lock is a real `Mutex` all the same (cheap, and
/// right without the GIL). It is held only to look up, insert or take out the map: never
/// while Python code runs (working out a class's facts runs `dataclasses.fields`, and dropping
/// classes can run finalizers, both of which may re-enter the walk).
static CLASS_CACHE: Mutex<Option<HashMap<usize, Arc<ClassInfo>>>> = Mutex::new(None);
const CLASS_CACHE_MAX: usize = 1024;

fn class_info(ty: &Bound<'_, PyType>) -> PyResult<Arc<ClassInfo>> {
    let address = ty.as_ptr() as usize;
    let lock = || CLASS_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(info) = lock().as_ref().and_then(|m| m.get(&address)) {
        return Ok(Arc::clone(info));
    }
    let info = Arc::new(ClassInfo::of(ty)?);
    let evicted = {
        let mut guard = lock();
        let map = guard.get_or_insert_with(HashMap::new);
        let evicted = if map.len() >= CLASS_CACHE_MAX {
            std::mem::take(map)
        } else {
            HashMap::new()
        };
        map.insert(address, Arc::clone(&info));
        evicted
    };
    drop(evicted); // after unlocking (see CLASS_CACHE)
    Ok(info)
}

impl ClassInfo {
    fn of(ty: &Bound<'_, PyType>) -> PyResult<Self> {
        let py = ty.py();
        let kind = ClassKind::of(ty)?;
        let mut identity = Vec::new();
        if !matches!(kind, ClassKind::Plain) {
            let module = ty.getattr(pyo3::intern!(py, "__module__"))?.str()?;
            let qualname = ty.qualname()?;
            let (mut module_bytes, mut qualname_bytes) = (Vec::new(), Vec::new());
            write_str_bytes(&mut module_bytes, &module)?;
            write_str_bytes(&mut qualname_bytes, &qualname)?;
            identity.record_header(&module_bytes, &qualname_bytes);
        }
        Ok(ClassInfo {
            _class: ty.clone().unbind(),
            kind,
            identity,
        })
    }
}

impl ClassKind {
    fn of(ty: &Bound<'_, PyType>) -> PyResult<Self> {
        let py = ty.py();
        let names = |items: Bound<'_, PyAny>, attr: Option<&Bound<'_, PyString>>| {
            let mut out = Vec::new();
            for item in items.try_iter()? {
                let item = item?;
                let name = match attr {
                    Some(attr) => item.getattr(attr)?,
                    None => item,
                };
                out.push(name.cast_into::<PyString>()?.unbind());
            }
            PyResult::Ok(out)
        };
        if ty.hasattr(pyo3::intern!(py, "__dataclass_fields__"))? {
            let fields = DATACLASS_FIELDS
                .get_or_try_init(py, || {
                    Ok::<_, PyErr>(py.import("dataclasses")?.getattr("fields")?.unbind())
                })?
                .bind(py)
                .call1((ty,))?;
            let name = pyo3::intern!(py, "name");
            return Ok(ClassKind::Dataclass(names(fields, Some(name))?));
        }
        if ty.is_subclass_of::<PyTuple>()? {
            if let Ok(fields) = ty.getattr(pyo3::intern!(py, "_fields")) {
                if let Ok(fields) = fields.cast_into::<PyTuple>() {
                    if let Ok(names) = names(fields.into_any(), None) {
                        return Ok(ClassKind::NamedTuple(names));
                    }
                }
            }
            return Ok(ClassKind::Plain);
        }
        if let Some(base) = pydantic_base(py)? {
            if ty.is_subclass(base.as_any())? {
                let fields = ty.getattr(pyo3::intern!(py, "model_fields"))?;
                return Ok(ClassKind::Pydantic(names(fields, None)?));
            }
        }
        Ok(ClassKind::Plain)
    }
}

/// One slot of [`Walker::entries`]: an entry of a mapping being walked, or (`key` null) the
/// list item being walked. Whether the slot owns a reference to `key` and `value` depends on
/// its place in the stack (see [`Walker`]). `utf8` borrows the key's UTF-8 when the key is an
/// exact `str` without lone surrogates (read once, then used to sort and to write), else it is
/// null; `short` is then, for up to [`crate::keys::SHORT_STR`] bytes of UTF-8, the key's whole
/// encoding, zero-padded ([`short_encoding`], as bytes: written with one 16-byte copy, which a
/// number spilt to the stack would stall), else all zero.
#[derive(Clone, Copy)]
struct Entry {
    key: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    utf8: *const u8,
    utf8_len: usize,
    short: [u8; 16],
}

impl Entry {
    /// The key's UTF-8, if the key is a plain `str`.
    ///
    /// # Safety
    /// The entry must still be in [`Walker::entries`] (so that its key is alive), and the
    /// returned slice must not outlive that.
    #[inline]
    unsafe fn key_utf8<'a>(self) -> Option<&'a [u8]> {
        if self.utf8.is_null() {
            None
        } else {
            // SAFETY: `utf8`/`utf8_len` came from `utf8_of` on the key, which is alive while
            // the slot is (see `Walker`); CPython keeps a str's UTF-8 as long as the
            // (immutable) str.
            Some(unsafe { std::slice::from_raw_parts(self.utf8, self.utf8_len) })
        }
    }

    /// The canonical order of two str keys: the order of their encodings, i.e. by UTF-8
    /// length, then bytes (see [`Walker::write_str_keyed`]); for short keys, one comparison of
    /// their encodings.
    ///
    /// # Safety
    /// As [`Entry::key_utf8`], for both entries, which must have UTF-8.
    #[inline]
    unsafe fn cmp_str_keys(&self, other: &Entry) -> std::cmp::Ordering {
        if self.short[0] != 0 && other.short[0] != 0 {
            return u128::from_be_bytes(self.short).cmp(&u128::from_be_bytes(other.short));
        }
        // SAFETY: the caller's contract.
        let (a, b) = unsafe { (self.key_utf8(), other.key_utf8()) };
        self.utf8_len
            .cmp(&other.utf8_len)
            .then_with(|| a.unwrap_or_default().cmp(b.unwrap_or_default()))
    }
}

/// Buffers kept between calls on one thread: the hasher's buffer, the (empty) entry stack and
/// a [`KeyOrder`] per nesting level (sibling dicts, and later requests, reuse the allocations).
#[derive(Default)]
struct Scratch {
    hasher: Option<Box<KeyHasher>>,
    entries: Vec<Entry>,
    orders: Vec<KeyOrder>,
    strs: StrCache,
}

/// Slots of [`StrCache`] (a power of two).
const STR_CACHE_SLOTS: usize = 128;

/// The encodings of the short strs met lately, by object address: a request repeats the same
/// few key objects (`"role"`, `"type"`, `"content"`, interned by the code that built it) and
/// values (`"user"`, `"message"`) hundreds of times, and a hit skips reading the str's UTF-8
/// (a call under the stable ABI) and encoding it.
///
/// An address names the same str only while that str lives: a slot counts only in the
/// `generation` it was filled in, and the generation moves on whenever an object may have been
/// freed since (a walk starts, Python code ran, a pinned slot gave back its reference, a
/// failed UTF-8 read made and dropped an exception). In between, no object is freed (see
/// [`Walker`]), so no address can be reused.
struct StrCache {
    generation: u64,
    /// [`STR_CACHE_SLOTS`] slots once [`StrCache::ready`]; empty in a placeholder (taking the
    /// cache out of [`Scratch`] must not allocate).
    slots: Vec<CachedStr>,
}

#[derive(Clone, Copy, Default)]
struct CachedStr {
    obj: usize,
    generation: u64,
    utf8: usize,
    len: usize,
    encoding: [u8; 16],
}

impl Default for StrCache {
    fn default() -> Self {
        StrCache {
            generation: 1, // slots start at 0: empty
            slots: Vec::new(),
        }
    }
}

impl StrCache {
    /// Allocates the slots on first use, and forgets every slot (see [`StrCache::invalidate`]).
    fn ready(&mut self) {
        if self.slots.len() != STR_CACHE_SLOTS {
            self.slots = vec![CachedStr::default(); STR_CACHE_SLOTS];
        }
        self.invalidate();
    }

    #[inline]
    fn index(obj: *mut ffi::PyObject) -> usize {
        let address = obj as usize;
        ((address >> 4) ^ (address >> 11)) & (STR_CACHE_SLOTS - 1)
    }

    /// The cached facts of the str at `obj`, filled in this generation.
    #[inline]
    fn get(&self, obj: *mut ffi::PyObject) -> Option<&CachedStr> {
        let slot = self.slots.get(Self::index(obj))?;
        (slot.obj == obj as usize && slot.generation == self.generation).then_some(slot)
    }

    /// Records the str at `obj`, whose UTF-8 (alive as long as it) is `utf8`, of at most
    /// [`crate::keys::SHORT_STR`] bytes, and `encoding`, its [`short_encoding`].
    #[inline]
    fn put(&mut self, obj: *mut ffi::PyObject, utf8: &[u8], encoding: [u8; 16]) {
        let Some(slot) = self.slots.get_mut(Self::index(obj)) else {
            return;
        };
        *slot = CachedStr {
            obj: obj as usize,
            generation: self.generation,
            utf8: utf8.as_ptr() as usize,
            len: utf8.len(),
            encoding,
        };
    }

    /// Forgets every slot (objects may have been freed, their addresses reused).
    #[inline]
    fn invalidate(&mut self) {
        self.generation += 1;
    }
}

thread_local! {
    // Taken for the duration of a call; a re-entrant call (from a model's Python code) finds
    // it empty and allocates its own.
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

/// One pass over one request.
///
/// The entries of every mapping being walked sit in one stack, `entries`: a mapping pushes
/// its entries, sorts its own range in place, walks the values, and pops its range; the
/// mappings nested in its values push and pop above it, so its range stays put (only the
/// `Vec` may move, which is why entries are copied out by index, never borrowed across a
/// nested walk). The item of a list being walked sits there too, as a slot without a key.
///
/// References: slots are pushed *borrowed* (no reference counting, which the stable ABI turns
/// into two calls per object). That is sound while no Python code runs: nothing can then change
/// or free the containers being walked. The walk runs Python code only in
/// [`Walker::with_python`] (records, lone surrogates, huge ints, error messages), which first
/// *pins* the stack: takes a reference to every borrowed slot, so that slots below `owned` own
/// their key and value, and those from `owned` on borrow them (pinned slots are given back
/// when popped). What else is held while Python code may run is safe without a slot: the
/// object passed in (the caller's), tuple items (a live tuple cannot lose them), the object
/// `with_python` works on (its closure takes its own reference). And so that no garbage
/// collection runs finalizers in between (an exception object allocated by a failed UTF-8
/// read could start one before Python 3.12), the collector is paused for the walk and resumed
/// inside `with_python` and at the end.
struct Walker<'py> {
    py: Python<'py>,
    entries: Vec<Entry>,
    orders: Vec<KeyOrder>,
    /// `entries[..owned]` own a reference to their key and value; the rest borrow them.
    owned: usize,
    /// The walk paused the garbage collector (it was enabled) and must resume it.
    gc_paused: bool,
    strs: StrCache,
}

/// What [`Walker::walk_call`] finds in a common call: whether it streams, and its `model`
/// (None: the model id is `"default"`).
type CallSplit<'py> = (bool, Option<Bound<'py, PyString>>);

/// A call split and keyed by [`ClientKeyer::split`]: the split, its params, its key.
type KeyedCall<'py> = (Request, Py<PyDict>, Bound<'py, PyString>);

/// How a mapping's entries are named in error paths.
#[derive(Clone, Copy)]
enum Naming {
    /// `['key']`: a dict.
    Keys,
    /// `.field`: a model or a dataclass.
    Fields,
}

impl Drop for Walker<'_> {
    fn drop(&mut self) {
        // Normally empty already; not after a panic unwound through the walk.
        self.release_entries(0);
        self.resume_gc();
    }
}

impl<'py> Walker<'py> {
    fn new(py: Python<'py>, scratch: &mut Scratch) -> Self {
        // SAFETY: the GIL is held (`py`). PyGC_Disable returns the previous state.
        let gc_paused = unsafe { ffi::PyGC_Disable() } != 0;
        let mut strs = std::mem::take(&mut scratch.strs);
        strs.ready(); // (the previous call's objects may be gone)
        Walker {
            py,
            entries: std::mem::take(&mut scratch.entries),
            orders: std::mem::take(&mut scratch.orders),
            owned: 0,
            gc_paused,
            strs,
        }
    }

    fn into_scratch(mut self, scratch: &mut Scratch) {
        // Keep buffers for the first few levels only, and none of a huge request's size.
        const KEEP_LEVELS: usize = 16;
        const KEEP_BYTES: usize = 64 * 1024;
        self.resume_gc();
        let mut orders = std::mem::take(&mut self.orders);
        orders.truncate(KEEP_LEVELS);
        orders.iter_mut().for_each(|o| o.clear_and_trim(KEEP_BYTES));
        scratch.orders = orders;
        let mut entries = std::mem::take(&mut self.entries);
        debug_assert!(entries.is_empty() && self.owned == 0);
        entries.clear();
        entries.shrink_to(KEEP_BYTES / std::mem::size_of::<Entry>());
        scratch.entries = entries;
        scratch.strs = std::mem::take(&mut self.strs);
    }

    /// Resumes the garbage collector if the walk paused it.
    fn resume_gc(&mut self) {
        if std::mem::take(&mut self.gc_paused) {
            // SAFETY: the GIL is held (`self.py`).
            unsafe { ffi::PyGC_Enable() };
        }
    }

    /// Runs `f`, which may run Python code (and so change or free any object not referenced):
    /// the stack is pinned first, the garbage collector runs meanwhile, and slots `f` pushes
    /// must own their references ([`Walker::push_owned_entry`]).
    #[cold]
    #[inline(never)]
    fn with_python<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.pin();
        self.resume_gc();
        self.strs.invalidate();
        let result = f(self);
        self.strs.invalidate();
        // SAFETY: the GIL is held (`self.py`). Python code in `f` may have disabled the
        // collector itself: then it stays so.
        self.gc_paused = unsafe { ffi::PyGC_Disable() } != 0;
        result
    }

    /// Takes a reference to the key and value of every borrowed slot (see [`Walker`]).
    fn pin(&mut self) {
        for entry in &self.entries[self.owned..] {
            // SAFETY: a borrowed slot's objects are alive (no Python code ran since it was
            // pushed: see `Walker`); the GIL is held.
            unsafe {
                if !entry.key.is_null() {
                    ffi::Py_INCREF(entry.key);
                }
                ffi::Py_INCREF(entry.value);
            }
        }
        self.owned = self.entries.len();
    }

    /// Pushes a borrowed entry; returns whether the key is a plain `str` (its UTF-8 read).
    ///
    /// # Safety
    /// `key` and `value` must be live objects (the GIL is held by `self.py`), kept alive by
    /// their container until the slot is popped or pinned (see [`Walker`]).
    #[inline(always)]
    unsafe fn push_entry(&mut self, key: *mut ffi::PyObject, value: *mut ffi::PyObject) -> bool {
        // The usual key, inline: a str met before in this walk (`"role"`, `"type"`, ...).
        // SAFETY: a live object (the caller's contract).
        if unsafe { self.held(key) }.is_exact_instance_of::<PyString>() {
            if let Some(hit) = self.strs.get(key) {
                let entry = Entry {
                    key,
                    value,
                    utf8: hit.utf8 as *const u8,
                    utf8_len: hit.len,
                    short: hit.encoding,
                };
                self.entries.push(entry);
                return true;
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.push_entry_new_key(key, value) }
    }

    /// [`Walker::push_entry`] of a key that is not a str met before in this walk.
    ///
    /// # Safety
    /// As [`Walker::push_entry`].
    #[inline(never)]
    unsafe fn push_entry_new_key(
        &mut self,
        key: *mut ffi::PyObject,
        value: *mut ffi::PyObject,
    ) -> bool {
        // SAFETY: a live object (the caller's contract).
        let key_ref = unsafe { self.held(key) };
        if !key_ref.is_exact_instance_of::<PyString>() {
            self.entries.push(Entry {
                key,
                value,
                utf8: std::ptr::null(),
                utf8_len: 0,
                short: [0; 16],
            });
            return false;
        }
        // SAFETY: a live str (checked above); alive while the slot is.
        let utf8 = unsafe { utf8_of_ptr(self.py, key) };
        let (utf8, utf8_len, short) = match utf8 {
            Some(s) => {
                let short = short_encoding(s).to_be_bytes();
                if short[0] != 0 {
                    self.strs.put(key, s, short);
                }
                (s.as_ptr(), s.len(), short)
            }
            None => {
                self.strs.invalidate(); // an exception was made and dropped
                (std::ptr::null(), 0, [0; 16])
            }
        };
        self.entries.push(Entry {
            key,
            value,
            utf8,
            utf8_len,
            short,
        });
        !utf8.is_null()
    }

    /// [`Walker::push_entry`] without the str cache (a record's fields are read between runs
    /// of Python code, which may free what the cache names).
    ///
    /// # Safety
    /// As [`Walker::push_entry`].
    unsafe fn push_entry_uncached(
        &mut self,
        key: *mut ffi::PyObject,
        value: *mut ffi::PyObject,
    ) -> bool {
        // SAFETY: a live object (the caller's contract).
        let key_ref = unsafe { self.held(key) };
        let utf8 = if key_ref.is_exact_instance_of::<PyString>() {
            // SAFETY: a live str (checked just above); alive while the slot is.
            unsafe { utf8_of_ptr(self.py, key) }
        } else {
            None
        };
        let (utf8, utf8_len, short) = match utf8 {
            Some(s) => (s.as_ptr(), s.len(), short_encoding(s).to_be_bytes()),
            None => (std::ptr::null(), 0, [0; 16]),
        };
        self.entries.push(Entry {
            key,
            value,
            utf8,
            utf8_len,
            short,
        });
        !utf8.is_null()
    }

    /// [`Walker::push_entry`] of an entry that owns a reference to `key` and `value` (taken
    /// here), for objects that only a temporary holds (a model's field values). Only inside
    /// [`Walker::with_python`], on a pinned stack.
    ///
    /// # Safety
    /// `key` and `value` must be live objects (the GIL is held by `self.py`).
    unsafe fn push_owned_entry(
        &mut self,
        key: *mut ffi::PyObject,
        value: *mut ffi::PyObject,
    ) -> bool {
        debug_assert_eq!(self.owned, self.entries.len());
        // SAFETY: both live (the caller's contract); the references belong to the slot, below
        // `owned`, until `release_entries`.
        unsafe {
            ffi::Py_INCREF(key);
            ffi::Py_INCREF(value);
            let str_keyed = self.push_entry_uncached(key, value);
            self.owned = self.entries.len();
            str_keyed
        }
    }

    /// Pops the entries from `start` on, giving back the references of pinned ones.
    #[inline(always)]
    fn release_entries(&mut self, start: usize) {
        if self.owned <= start {
            // The usual case, inline: nothing pinned from `start` on, nothing to give back.
            self.entries.truncate(start);
        } else {
            self.release_pinned_entries(start);
        }
    }

    /// [`Walker::release_entries`] when some of the entries popped are pinned.
    #[inline(never)]
    fn release_pinned_entries(&mut self, start: usize) {
        let pinned_end = self.owned.max(start);
        self.owned = self.owned.min(start);
        // Every slot below `start` is pinned too when any above is (`owned` bounds a prefix),
        // so whatever Python code a last reference's finalizer runs finds no borrowed slot.
        if pinned_end > start {
            // A last reference given back frees its object (and a finalizer may run).
            self.strs.invalidate();
        }
        for i in start..pinned_end {
            let entry = self.entries[i];
            // SAFETY: a pinned slot owns one reference to its key and value; the GIL is held
            // (the walker lives inside a call from Python).
            unsafe {
                if !entry.key.is_null() {
                    ffi::Py_DECREF(entry.key);
                }
                ffi::Py_DECREF(entry.value);
            }
        }
        self.entries.truncate(start);
    }

    /// An object held by a slot of the stack (or otherwise alive, see [`Walker`]), borrowed
    /// without borrowing `self` (so that the walk can go on while it is used).
    ///
    /// # Safety
    /// `ptr` must be a live object, and the result must not be used after it may have been
    /// freed (a slot holding it popped, or, for a borrowed slot, Python code run unpinned).
    #[inline]
    unsafe fn held<'a>(&self, ptr: *mut ffi::PyObject) -> Borrowed<'a, 'py, PyAny> {
        // SAFETY: a live object (the caller's contract).
        unsafe { Borrowed::from_ptr(self.py, ptr) }
    }

    fn walk<S: Sink>(&mut self, sink: &mut S, obj: &Bound<'py, PyAny>, depth: usize) -> WalkResult {
        // Exact types first: one pointer comparison each, in order of frequency.
        if obj.is_exact_instance_of::<PyString>() {
            // SAFETY: the exact type was checked just above.
            return self.write_str(sink, unsafe { obj.cast_unchecked::<PyString>() });
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
            return self.write_int(sink, obj);
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

    /// Records, subclasses of the supported types, bytes: the rare cases.
    #[inline(never)]
    fn walk_other<S: Sink>(
        &mut self,
        sink: &mut S,
        obj: &Bound<'py, PyAny>,
        depth: usize,
    ) -> WalkResult {
        if let Ok(b) = obj.cast_exact::<PyBytes>() {
            sink.bytes(b.as_bytes());
            return Ok(());
        }
        // Working out a class's facts runs Python code (`dataclasses.fields`, ...).
        let info = self.with_python(|_| class_info(&obj.get_type()))?;
        if !matches!(info.kind, ClassKind::Plain) {
            return self.walk_record(sink, obj, &info, depth);
        }
        if let Ok(s) = obj.cast::<PyString>() {
            return self.write_str(sink, s);
        }
        if obj.is_instance_of::<PyInt>() {
            // bool cannot be subclassed, so this is an int subclass (IntEnum, ...).
            return self.write_int(sink, obj);
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
        let type_name = self.with_python(|_| obj.get_type().name().map(|n| n.to_string()))?;
        Err(WalkError::key(KeyErrorKind::Unsupported(type_name)))
    }

    /// A record: its class identity, then its fields as a mapping.
    fn walk_record<S: Sink>(
        &mut self,
        sink: &mut S,
        obj: &Bound<'py, PyAny>,
        info: &ClassInfo,
        depth: usize,
    ) -> WalkResult {
        check_depth(depth)?;
        let start = self.entries.len();
        // Reading the fields runs Python code (`__dict__`, `getattr`).
        let result = match self.with_python(|w| w.push_fields(obj, &info.kind)) {
            Ok(str_keyed) => {
                sink.put(&info.identity);
                self.write_mapping(sink, start, str_keyed, depth, Naming::Fields)
            }
            Err(err) => Err(err),
        };
        self.release_entries(start);
        result
    }

    /// Pushes a record's `(name, value)` fields onto the entry stack, as owned entries (inside
    /// [`Walker::with_python`]); returns whether every name is a plain `str`. On error, the
    /// caller pops what was pushed.
    fn push_fields(
        &mut self,
        obj: &Bound<'py, PyAny>,
        kind: &ClassKind,
    ) -> Result<bool, WalkError> {
        let py = self.py;
        let mut str_keyed = true;
        match kind {
            ClassKind::Plain => unreachable!("not a record"),
            ClassKind::Pydantic(names) => {
                let values = obj.getattr(pyo3::intern!(py, "__dict__"))?;
                let values = values.cast::<PyDict>().map_err(PyErr::from)?;
                for name in names {
                    // A field can be missing only from a `model_construct` that left it out
                    // (it has no default): nothing of it is sent, nothing is hashed.
                    if let Some(value) = values.get_item(name.bind(py))? {
                        // SAFETY: `names` (the cached class facts) and `value` are alive.
                        str_keyed &=
                            unsafe { self.push_owned_entry(name.as_ptr(), value.as_ptr()) };
                    }
                }
                let extra = obj.getattr(pyo3::intern!(py, "__pydantic_extra__"))?;
                if let Ok(extra) = extra.cast::<PyDict>() {
                    for (name, value) in extra.iter() {
                        // SAFETY: both alive (held by `name` and `value`).
                        str_keyed &=
                            unsafe { self.push_owned_entry(name.as_ptr(), value.as_ptr()) };
                    }
                }
            }
            ClassKind::Dataclass(names) => {
                for name in names {
                    let value = obj.getattr(name.bind(py))?;
                    // SAFETY: `names` (the cached class facts) and `value` are alive.
                    str_keyed &= unsafe { self.push_owned_entry(name.as_ptr(), value.as_ptr()) };
                }
            }
            ClassKind::NamedTuple(names) => {
                let items = obj.cast::<PyTuple>().map_err(PyErr::from)?;
                if items.len() != names.len() {
                    let type_name = obj.get_type().name()?.to_string();
                    return Err(WalkError::key(KeyErrorKind::Unsupported(type_name)));
                }
                for (name, value) in names.iter().zip(items.iter_borrowed()) {
                    // SAFETY: `names` (the cached class facts) and the tuple's items are alive.
                    str_keyed &= unsafe { self.push_owned_entry(name.as_ptr(), value.as_ptr()) };
                }
            }
        }
        Ok(str_keyed)
    }

    /// A top-level tuple whose items are named in error paths (`messages[0]`, not `[5][0]`):
    /// the same bytes as [`Walker::walk`] of the tuple.
    fn walk_named<S: Sink>(
        &mut self,
        sink: &mut S,
        items: &Bound<'py, PyTuple>,
        names: &Bound<'py, PyTuple>,
    ) -> WalkResult {
        sink.list_header(items.len());
        for (i, item) in items.iter_borrowed().enumerate() {
            if let Err(e) = self.walk(sink, &item, 1) {
                return Err(e.within(|| {
                    // `str()` of a name runs Python code.
                    self.with_python(|_| {
                        let name = names.get_item(i).map(|n| n.to_string());
                        Segment::Name(name.unwrap_or_else(|_| format!("[{i}]")))
                    })
                }));
            }
        }
        Ok(())
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
            // A borrowed reference: the list keeps its items while no Python code runs, and
            // the item's slot gets pinned before any does (see `Walker`).
            // SAFETY: a live list (the caller's) and the GIL held. `PyList_GetItem` (stable
            // ABI) checks the index against the list's current size: it may have shrunk since
            // its length was read (only if walking an earlier item ran Python code that
            // changed it), and then it raises IndexError, as `list[i]` does.
            let item = unsafe { ffi::PyList_GetItem(list.as_ptr(), i as ffi::Py_ssize_t) };
            if item.is_null() {
                return Err(PyErr::fetch(self.py).into());
            }
            // SAFETY: alive (see above).
            let item_ref = unsafe { self.held(item) };
            if item_ref.is_exact_instance_of::<PyString>() {
                // No slot needed: writing a str runs Python code only past its own reference
                // (lone surrogates).
                // SAFETY: the exact type was checked just above.
                self.write_str(sink, unsafe { (*item_ref).cast_unchecked::<PyString>() })?;
                continue;
            }
            let slot = self.entries.len();
            self.entries.push(Entry {
                key: std::ptr::null_mut(),
                value: item,
                utf8: std::ptr::null(),
                utf8_len: 0,
                short: [0; 16],
            });
            let walked = if item_ref.is_exact_instance_of::<PyDict>() {
                // The usual item of a request's lists (messages, content parts), without the
                // dispatch.
                // SAFETY: the exact type was checked just above.
                self.walk_dict(
                    sink,
                    unsafe { (*item_ref).cast_unchecked::<PyDict>() },
                    depth + 1,
                )
            } else {
                self.walk(sink, &item_ref, depth + 1)
            };
            self.release_entries(slot);
            walked.map_err(|e| e.within(|| Segment::Index(i)))?;
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
        let start = self.entries.len();
        let mut str_keyed = true;
        let mut pos: ffi::Py_ssize_t = 0;
        let (mut key, mut value) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: PyDict_Next over a live dict (the caller's) with the GIL held; it hands out
        // borrowed references, which the dict keeps alive while no Python code runs (the slots
        // are pinned before any does: see `Walker`). No Python code runs in this loop (reading
        // a str's UTF-8 runs none, and the collector is paused), so the dict cannot change
        // under it.
        unsafe {
            while ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut value) != 0 {
                str_keyed &= self.push_entry(key, value);
            }
        }
        let result = self.write_mapping(sink, start, str_keyed, depth, Naming::Keys);
        self.release_entries(start);
        result
    }

    /// The messages of a common call, `kwargs` without `stream` (as [`Walker::walk_dict`] of
    /// a copy of it without that entry), preceded by its model id: `split_plain_kwargs` and
    /// the walk in one pass over `kwargs`. Returns `Ok(None)` without writing anything for a
    /// call `split_plain_kwargs` does not take, else whether the call streams and its model
    /// id (`model`, or None for `"default"`, which the caller wrote).
    fn walk_call<S: Sink>(
        &mut self,
        sink: &mut S,
        kwargs: &Bound<'py, PyDict>,
    ) -> Result<Option<CallSplit<'py>>, WalkError> {
        let start = self.entries.len();
        let (mut stream, mut model) = (false, None);
        let mut plain = true;
        let mut pos: ffi::Py_ssize_t = 0;
        let (mut key, mut value) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: as in `walk_dict`; reading a built-in value's truth value runs no Python code.
        unsafe {
            while ffi::PyDict_Next(kwargs.as_ptr(), &mut pos, &mut key, &mut value) != 0 {
                let item = self.held(value);
                if !is_plain(&item) || !self.push_entry(key, value) {
                    plain = false;
                    break;
                }
                let name = self.entries[self.entries.len() - 1].key_utf8();
                let name = name.unwrap_or_default();
                if SPECIAL_ARGS.contains(&name) {
                    plain = false;
                    break;
                }
                if name == b"stream" {
                    stream = ffi::PyObject_IsTrue(value) == 1;
                    self.entries.pop(); // (it held no reference)
                } else if name == b"model" && item.is_exact_instance_of::<PyString>() {
                    model = Some(item.to_owned().cast_into_unchecked::<PyString>());
                }
            }
        }
        if !plain {
            self.release_entries(start);
            return Ok(None);
        }
        // the model id first (the item before the messages), as `split_plain_kwargs` makes it
        let model = model.filter(|m| m.len().is_ok_and(|n| n > 0));
        match &model {
            Some(model) => self.write_str(sink, model),
            None => self.write_str(sink, pyo3::intern!(self.py, "default")),
        }
        .map_err(|e| e.within(|| Segment::Name(DERIVED_NAMES[0].into())))?;
        check_depth(1)?;
        let result = self.write_mapping(sink, start, true, 1, Naming::Keys);
        self.release_entries(start);
        result.map_err(|e| e.within(|| Segment::Name(DERIVED_NAMES[1].into())))?;
        Ok(Some((stream, model)))
    }

    /// Writes the mapping whose entries are `entries[start..]`: keys sorted by their encoding,
    /// then `key value` pairs in that order.
    #[inline]
    fn write_mapping<S: Sink>(
        &mut self,
        sink: &mut S,
        start: usize,
        str_keyed: bool,
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        if str_keyed {
            self.write_str_keyed(sink, start, depth, naming)
        } else {
            self.write_sorted_entries(sink, start, depth, naming)
        }
    }

    /// The usual mapping: every key a plain `str`. The encodings of two strs compare like
    /// their `(UTF-8 length, UTF-8 bytes)` (same tag, order-preserving length prefix), so the
    /// entries are sorted in place by those ([`Entry::cmp_str_keys`]), without encoding the
    /// keys apart.
    fn write_str_keyed<S: Sink>(
        &mut self,
        sink: &mut S,
        start: usize,
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        let entries = &mut self.entries[start..];
        let n = entries.len();
        // SAFETY (both closures): every entry from `start` on is in the stack, with UTF-8 (the
        // caller checked `str_keyed`).
        let cmp = |a: &Entry, b: &Entry| unsafe { a.cmp_str_keys(b) };
        let mut duplicate = false;
        // The sorted order, for up to 16 entries: their indices, insertion-sorted (most request
        // dicts have 2 to 8 keys), so that no 48-byte entry is moved. A key equal to another
        // stops at it (every key meets its sorted predecessor), so that finds duplicates.
        let mut order = [0u8; 16];
        if n <= 16 {
            for i in 1..n {
                order[i] = i as u8;
                let mut j = i;
                loop {
                    let (a, b) = (order[j - 1], order[j]);
                    match cmp(&entries[usize::from(a)], &entries[usize::from(b)]) {
                        std::cmp::Ordering::Greater => order.swap(j - 1, j),
                        std::cmp::Ordering::Equal => {
                            duplicate = true;
                            break;
                        }
                        std::cmp::Ordering::Less => break,
                    }
                    j -= 1;
                    if j == 0 {
                        break;
                    }
                }
            }
        } else {
            entries.sort_unstable_by(cmp);
            duplicate = entries.windows(2).any(|w| cmp(&w[0], &w[1]).is_eq());
        }
        if duplicate {
            // Equal exact strs are one dict key; only model fields and extras could meet here.
            return Err(WalkError::key(KeyErrorKind::DuplicateKey));
        }
        sink.dict_header(n);
        // The k-th entry in sorted order (above 16 entries, the entries themselves are sorted).
        let sorted = |k: usize| start + if n <= 16 { usize::from(order[k]) } else { k };
        for k in 0..n {
            let index = sorted(k);
            let entry = &self.entries[index];
            let value = entry.value;
            if entry.short[0] != 0 {
                sink.put_block(entry.short, entry.utf8_len + 2);
            } else {
                // SAFETY: the entry stays in the stack until this mapping is done, after this
                // loop.
                sink.str_utf8(unsafe { entry.key_utf8() }.unwrap_or_default());
            }
            // SAFETY: as above.
            let value = unsafe { self.held(value) };
            // The most common values, without the dispatch.
            let walked = if value.is_exact_instance_of::<PyString>() {
                // SAFETY: the exact type was checked just above.
                self.write_str(sink, unsafe { (*value).cast_unchecked::<PyString>() })
            } else if value.is_exact_instance_of::<PyList>() {
                // SAFETY: the exact type was checked just above.
                self.walk_list(
                    sink,
                    unsafe { (*value).cast_unchecked::<PyList>() },
                    depth + 1,
                )
            } else {
                self.walk(sink, &value, depth + 1)
            };
            if let Err(e) = walked {
                let key = self.entries[index].key;
                return Err(e.within(|| self.segment_for(key, naming)));
            }
        }
        Ok(())
    }

    /// The general path: keys of any type, encoded apart and sorted by [`KeyOrder`].
    #[inline(never)]
    fn write_sorted_entries<S: Sink>(
        &mut self,
        sink: &mut S,
        start: usize,
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        if self.orders.len() <= depth {
            self.orders.resize_with(depth + 1, KeyOrder::default);
        }
        // Level `depth` owns this buffer; keys and values nest at `depth + 1` and up.
        let mut order = std::mem::take(&mut self.orders[depth]);
        order.clear();
        let result = self.write_entries(sink, &mut order, start, depth, naming);
        self.orders[depth] = order;
        result
    }

    fn write_entries<S: Sink>(
        &mut self,
        sink: &mut S,
        order: &mut KeyOrder,
        start: usize,
        depth: usize,
        naming: Naming,
    ) -> WalkResult {
        let n = self.entries.len() - start;
        for i in 0..n {
            let entry = self.entries[start + i];
            // SAFETY (here and below): the entry stays in the stack until this mapping is done.
            if let Some(utf8) = unsafe { entry.key_utf8() } {
                order.key_sink().str_utf8(utf8);
            } else {
                let key = unsafe { self.held(entry.key) };
                if let Err(e) = self.walk(order.key_sink(), &key, depth + 1) {
                    order.abandon_key();
                    return Err(e.within(|| Segment::DictKey));
                }
            }
            order.finish_key(i);
        }
        if order.sort().is_err() {
            return Err(WalkError::key(KeyErrorKind::DuplicateKey));
        }
        sink.dict_header(n);
        for (key_bytes, i) in order.iter() {
            sink.put(key_bytes);
            let entry = self.entries[start + i];
            let value = unsafe { self.held(entry.value) };
            if let Err(e) = self.walk(sink, &value, depth + 1) {
                return Err(e.within(|| self.segment_for(entry.key, naming)));
            }
        }
        Ok(())
    }

    /// The error-path segment of the mapping entry with this key (only built when an error
    /// unwinds; `repr()` runs Python code).
    #[cold]
    fn segment_for(&mut self, key: *mut ffi::PyObject, naming: Naming) -> Segment {
        self.with_python(|w| {
            // SAFETY: the key of a slot still in the stack (the mapping being unwound), pinned
            // by `with_python`.
            let key = unsafe { w.held(key) };
            match naming {
                Naming::Fields => Segment::Field(key.to_string()),
                Naming::Keys => Segment::Key(
                    key.repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| "?".to_owned()),
                ),
            }
        })
    }

    #[inline]
    fn write_str<S: Sink>(&mut self, sink: &mut S, s: &Bound<'py, PyString>) -> WalkResult {
        if let Some(hit) = self.strs.get(s.as_ptr()) {
            sink.put_block(hit.encoding, hit.len + 2);
            return Ok(());
        }
        match utf8_of(s) {
            Some(utf8) => {
                if utf8.len() <= SHORT_STR {
                    self.strs
                        .put(s.as_ptr(), utf8, short_encoding(utf8).to_be_bytes());
                }
                sink.str_utf8(utf8);
                Ok(())
            }
            None => {
                self.strs.invalidate(); // an exception was made and dropped
                self.write_surrogates(sink, s)
            }
        }
    }

    /// A str with lone surrogates: their `surrogatepass` bytes are never valid UTF-8, so they
    /// cannot collide with any real string.
    #[cold]
    #[inline(never)]
    fn write_surrogates<S: Sink>(&mut self, sink: &mut S, s: &Bound<'py, PyString>) -> WalkResult {
        let s = s.clone(); // its own reference, while Python code runs
        let bytes = self.with_python(|_| {
            s.call_method1(pyo3::intern!(s.py(), "encode"), ("utf-8", "surrogatepass"))
        })?;
        sink.str_utf8(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
        Ok(())
    }

    #[inline]
    fn write_int<S: Sink>(&mut self, sink: &mut S, obj: &Bound<'py, PyAny>) -> WalkResult {
        let mut overflow = 0;
        // SAFETY: `obj` is an int (or subclass), alive; with an int argument
        // PyLong_AsLongLongAndOverflow cannot fail, it only reports overflow through the flag.
        let small = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
        if overflow == 0 {
            sink.int_i64(small);
        } else {
            // Under the stable ABI the conversion calls `int.to_bytes`: Python code.
            let obj = obj.clone();
            let big: num_bigint::BigInt = self.with_python(|_| obj.extract())?;
            sink.int_big(&big);
        }
        Ok(())
    }
}

fn check_depth(depth: usize) -> WalkResult {
    if depth >= MAX_DEPTH {
        Err(WalkError::key(KeyErrorKind::TooDeep))
    } else {
        Ok(())
    }
}

/// A str's canonical text bytes (UTF-8, or `surrogatepass` bytes for lone surrogates), into
/// a `Vec`.
fn write_str_bytes(out: &mut Vec<u8>, s: &Bound<'_, PyString>) -> PyResult<()> {
    match utf8_of(s) {
        Some(utf8) => out.extend_from_slice(utf8),
        None => {
            let bytes =
                s.call_method1(pyo3::intern!(s.py(), "encode"), ("utf-8", "surrogatepass"))?;
            out.extend_from_slice(bytes.cast::<PyBytes>()?.as_bytes());
        }
    }
    Ok(())
}

/// A str's UTF-8, borrowed from the object (its cached UTF-8, or the data itself for ASCII),
/// or `None` for a str with lone surrogates. (`PyString::to_str` without its error object.)
#[inline]
fn utf8_of<'a>(s: &'a Bound<'_, PyString>) -> Option<&'a [u8]> {
    // SAFETY: `s` is a live str that outlives `'a`.
    unsafe { utf8_of_ptr(s.py(), s.as_ptr()) }
}

/// [`utf8_of`] for a raw str pointer.
///
/// # Safety
/// `s` must point to a live `str` (or subclass) that outlives `'a`.
#[inline]
unsafe fn utf8_of_ptr<'a>(py: Python<'_>, s: *mut ffi::PyObject) -> Option<&'a [u8]> {
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `s` is a live str (the caller's contract) and the GIL is held (`py`).
    let data = unsafe { ffi::PyUnicode_AsUTF8AndSize(s, &mut size) };
    if data.is_null() {
        // The UnicodeEncodeError it set is replaced by the caller's fallback.
        drop(PyErr::take(py));
        return None;
    }
    // SAFETY: CPython keeps `size` bytes of UTF-8 at `data` alive as long as the str object,
    // which outlives `'a`; strs are immutable.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size as usize) })
}

/// Hashes a request (messages, params, ...) to a 32-byte BLAKE3 digest of its canonical,
/// typed encoding (format 4: an encoding longer than 1 KiB is hashed with the last part of it
/// zero-padded to a power of two, so that BLAKE3 hashes its chunks side by side).
///
/// Supported: None, bool, int (any size), float, str, bytes/bytearray, list/tuple (which
/// hash alike), dict (insertion order never matters), and records: pydantic v2 models,
/// dataclass instances and named tuples, as their class (module and qualname) and every field
/// value, defaults included (a model's extras too), so a record never hashes like a dict or
/// like a record of another class. Other subclasses of the supported types (str and int
/// enums, OrderedDict, ...) hash as their value. Values of different types never collide:
/// "1", True, b"1", 1 and 1.0 all differ; -0.0 hashes as 0.0 and every NaN alike.
///
/// names: with a tuple `obj`, one name per item, used in error messages instead of the
/// item's index (the digest does not depend on them): with names=("messages", "params"),
/// "... at messages[0]['content']" rather than "... at [0][0]['content']".
///
/// Raises TypeError for any other type, naming it and where it sits
/// (e.g. "cannot hash object of type 'set' at [0]['content']"), and ValueError for nesting
/// deeper than 256 levels (or a container holding itself) and for dicts with two different
/// keys of the same encoding.
#[pyfunction]
#[pyo3(signature = (obj, /, *, names=None))]
pub fn hash_request<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    names: Option<&Bound<'py, PyTuple>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let named = match names {
        None => None,
        Some(names) => Some(check_names(obj, names)?),
    };
    let mut scratch = SCRATCH.take().unwrap_or_default();
    let mut hasher = scratch.hasher.take().unwrap_or_default();
    let mut walker = Walker::new(py, &mut scratch);
    let walked = match named {
        None => walker.walk(&mut *hasher, obj, 0),
        Some((items, names)) => walker.walk_named(&mut *hasher, items, names),
    };
    walker.into_scratch(&mut scratch);
    let digest = hasher.finalize_reset();
    scratch.hasher = Some(hasher);
    SCRATCH.set(Some(scratch));
    walked?;
    Ok(PyBytes::new(py, &digest))
}

/// `obj` as a tuple with one name per item, or the `TypeError`/`ValueError` saying why not.
fn check_names<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    names: &'a Bound<'py, PyTuple>,
) -> PyResult<(&'a Bound<'py, PyTuple>, &'a Bound<'py, PyTuple>)> {
    let items = obj
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("hash_request: with names, obj must be a tuple"))?;
    if items.len() != names.len() {
        return Err(PyValueError::new_err(format!(
            "hash_request: {} names for a tuple of {} items",
            names.len(),
            items.len()
        )));
    }
    // The names are read only to render an error (`str()` of each); checking their types here
    // would cost every call for the sake of a broken call site.
    Ok((items, names))
}

/// The names of the items a [`KeyDeriver`] hashes after its fixed header, for error messages.
const DERIVED_NAMES: [&str; 3] = ["model_id", "messages", "params"];

/// The key derivation of one `CacheKeyBuilder` (its namespace, version and default kind), for
/// its common call: [`KeyDeriver::key`] is
/// `f"{namespace}:{kind}:{hash_request((key_format, namespace, version, kind, model_id,
/// messages, {} if params is None else params)).hex()}"`, the same digest, without building
/// the tuple, the digest's bytes or the hex string in Python. The tuple's first four items
/// are encoded once, here.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct KeyDeriver {
    /// The encoding of the tuple's header (7 items) and its first four items.
    header: Vec<u8>,
    /// `"{namespace}:{kind}:"`.
    prefix: Py<PyString>,
    /// `prefix` as UTF-8 (None if it holds lone surrogates: then the key is made by
    /// concatenating Python strs).
    prefix_utf8: Option<String>,
}

#[pymethods]
impl KeyDeriver {
    #[new]
    fn new(
        key_format: &Bound<'_, PyString>,
        namespace: &Bound<'_, PyString>,
        version: &Bound<'_, PyString>,
        kind: &Bound<'_, PyString>,
    ) -> PyResult<Self> {
        let mut header = Vec::new();
        header.list_header(7);
        for item in [key_format, namespace, version, kind] {
            let mut utf8 = Vec::new();
            write_str_bytes(&mut utf8, item)?;
            header.str_utf8(&utf8);
        }
        let colon = pyo3::intern!(namespace.py(), ":");
        let prefix = namespace.add(colon)?.add(kind)?.add(colon)?;
        let prefix = prefix.cast_into::<PyString>()?;
        Ok(KeyDeriver {
            header,
            prefix_utf8: prefix.to_str().ok().map(str::to_owned),
            prefix: prefix.unbind(),
        })
    }

    /// The key of `(model_id, messages, params)`: the prefix and the hex digest (see the
    /// class). Raises as `hash_request` does, naming `model_id`, `messages` or `params`.
    fn key<'py>(
        &self,
        py: Python<'py>,
        model_id: &Bound<'py, PyAny>,
        messages: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyString>> {
        let digest = self.digest(py, model_id, messages, params)?;
        self.key_of(py, digest)
    }

    /// `split_plain_kwargs(kwargs)` and the key of the call it splits, in one call into the
    /// extension: `(request, key)`, where `key` is
    /// `self.key(request.model_id, request.request, params)` and `params` the dict that
    /// `params[request.stream]` was made of (`params`: the encodings of a call's params when it
    /// does not stream and when it does). None where `split_plain_kwargs` returns None (the
    /// caller takes the slow path). The hashed request is walked once, as `key` walks it.
    fn client_key<'py>(
        &self,
        py: Python<'py>,
        kwargs: &Bound<'py, PyDict>,
        params: (PyRef<'py, EncodedParams>, PyRef<'py, EncodedParams>),
    ) -> PyResult<Option<(Request, Bound<'py, PyString>)>> {
        let encoded = [params.0.encoding.as_slice(), params.1.encoding.as_slice()];
        let Some((request, digest)) = self.split_digest(py, kwargs, encoded)? else {
            return Ok(None);
        };
        let key = self.key_of(py, digest)?;
        Ok(Some((request, key)))
    }
}

impl KeyDeriver {
    /// The digest of `(key_format, namespace, version, kind, model_id, messages, params)`.
    fn digest<'py>(
        &self,
        py: Python<'py>,
        model_id: &Bound<'py, PyAny>,
        messages: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<[u8; 32]> {
        let mut scratch = SCRATCH.take().unwrap_or_default();
        let mut hasher = scratch.hasher.take().unwrap_or_default();
        hasher.put(&self.header);
        let mut walker = Walker::new(py, &mut scratch);
        let walked = Self::walk_items(&mut walker, &mut hasher, model_id, messages, params);
        walker.into_scratch(&mut scratch);
        let digest = hasher.finalize_reset();
        scratch.hasher = Some(hasher);
        SCRATCH.set(Some(scratch));
        walked?;
        Ok(digest)
    }

    /// `split_plain_kwargs(kwargs)` and the digest of the call it splits (`params`: the
    /// encodings of its params when it does not stream and when it does), in one pass over
    /// `kwargs` ([`Walker::walk_call`]); None for a call `split_plain_kwargs` does not take.
    fn split_digest<'py>(
        &self,
        py: Python<'py>,
        kwargs: &Bound<'py, PyDict>,
        params: [&[u8]; 2],
    ) -> PyResult<Option<(Request, [u8; 32])>> {
        let mut scratch = SCRATCH.take().unwrap_or_default();
        let mut hasher = scratch.hasher.take().unwrap_or_default();
        hasher.put(&self.header);
        let mut walker = Walker::new(py, &mut scratch);
        let walked = walker.walk_call(&mut *hasher, kwargs);
        if let Ok(Some((stream, _))) = &walked {
            hasher.put(params[usize::from(*stream)]);
        }
        walker.into_scratch(&mut scratch);
        let digest = hasher.finalize_reset();
        scratch.hasher = Some(hasher);
        SCRATCH.set(Some(scratch));
        let Some((stream, model)) = walked? else {
            return Ok(None);
        };
        let model_id = match model {
            Some(model) => model.unbind(),
            None => pyo3::intern!(py, "default").clone().unbind(),
        };
        let request = Request {
            request: PyOnceLock::new(),
            sdk_kwargs: kwargs.clone().unbind(),
            stream,
            model_id,
        };
        Ok(Some((request, digest)))
    }

    /// Writes `model_id`, `messages` and `params` (errors name them).
    fn walk_items<'py>(
        walker: &mut Walker<'py>,
        sink: &mut KeyHasher,
        model_id: &Bound<'py, PyAny>,
        messages: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
    ) -> WalkResult {
        let named =
            |i: usize| move |e: WalkError| e.within(|| Segment::Name(DERIVED_NAMES[i].into()));
        walker.walk(sink, model_id, 1).map_err(named(0))?;
        walker.walk(sink, messages, 1).map_err(named(1))?;
        match params {
            Some(params) => walker.walk(sink, params, 1).map_err(named(2)),
            None => {
                sink.dict_header(0); // `{}`
                Ok(())
            }
        }
    }

    /// `"{namespace}:{kind}:{hex digest}"`.
    fn key_of<'py>(&self, py: Python<'py>, digest: [u8; 32]) -> PyResult<Bound<'py, PyString>> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let prefix = self.prefix_utf8.as_deref().unwrap_or_default();
        let mut key = String::with_capacity(prefix.len() + 64);
        key.push_str(prefix);
        for byte in digest {
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 15)]));
        }
        let key = PyString::new(py, &key);
        if self.prefix_utf8.is_some() {
            return Ok(key);
        }
        Ok(self.prefix.bind(py).add(key)?.cast_into::<PyString>()?)
    }
}

/// A params dict as the canonical encoding that `hash_request` hashes of it, made once: what
/// [`KeyDeriver::client_key`] hashes as a call's params, instead of walking a dict that is the
/// same for every call of one client and endpoint. Made only here, from a walked value, so the
/// bytes always are a value's encoding (the key stays injective).
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct EncodedParams {
    encoding: Vec<u8>,
}

#[pymethods]
impl EncodedParams {
    /// The encoding of `params` (a dict, or None for `{}`). Raises as `hash_request` does.
    #[new]
    #[pyo3(signature = (params, /))]
    fn new(py: Python<'_>, params: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut encoding = Vec::new();
        match params {
            None => encoding.dict_header(0),
            Some(params) => {
                let mut scratch = Scratch::default();
                let mut walker = Walker::new(py, &mut scratch);
                let walked = walker.walk(&mut encoding, params.as_any(), 1);
                walker.into_scratch(&mut scratch);
                walked.map_err(|e| e.within(|| Segment::Name("params".into())))?;
            }
        }
        Ok(EncodedParams { encoding })
    }

    /// The encoding's length in bytes.
    fn __len__(&self) -> usize {
        self.encoding.len()
    }
}

/// One endpoint's params for one identity of the client: the dicts (a call that does not
/// stream, one that does) and their encodings.
struct EndpointParams {
    endpoint: Py<PyString>,
    params: [Py<PyDict>; 2],
    encoded: [Py<EncodedParams>; 2],
}

/// Whether two strs are equal (endpoint names: no lone surrogates).
fn same_str(a: &Bound<'_, PyString>, b: &Bound<'_, PyString>) -> bool {
    a.is(b) || matches!((a.to_str(), b.to_str()), (Ok(x), Ok(y)) if x == y)
}

/// What a [`ClientKeyer`] knows: the identity sources it was told about, and the params of
/// each endpoint met for them.
#[derive(Default)]
struct KeyerState {
    /// The cache's key builder (a `CacheKeyBuilder`) and its deriver, if it is one.
    builder: Option<(Py<PyAny>, Py<KeyDeriver>)>,
    sources: Vec<Py<PyAny>>,
    endpoints: Vec<EndpointParams>,
}

/// The common calls of one cached SDK client, split and keyed whole in the extension
/// (`ClientCache.split`): checks that the client's identity is the one it was told about
/// ([`ClientKeyer::remember`]), then does what [`KeyDeriver::client_key`] does with the
/// endpoint's params.
///
/// The identity is checked as `ClientIdentity` checks it: the attributes `names` of the
/// client's instance dict `attrs` (a missing one reads as None) compared with the sources
/// remembered, each by identity first, then by `==` (the remembered mappings are copies, so a
/// dict changed in place counts).
///
/// Locking: the state is replaced whole under a `Mutex` (held only to clone or swap the `Arc`,
/// never while Python code runs: the comparisons may run some).
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct ClientKeyer {
    attrs: Py<PyDict>,
    names: Vec<Py<PyString>>,
    state: Mutex<Arc<KeyerState>>,
}

impl ClientKeyer {
    fn state(&self) -> Arc<KeyerState> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the client's identity sources equal `state`'s.
    fn same_identity(&self, py: Python<'_>, state: &KeyerState) -> PyResult<bool> {
        if state.sources.len() != self.names.len() {
            return Ok(false);
        }
        let attrs = self.attrs.bind(py);
        for (name, kept) in self.names.iter().zip(&state.sources) {
            let kept = kept.bind(py);
            let same = match attrs.get_item(name.bind(py))? {
                Some(value) => value.is(kept) || value.eq(kept)?,
                None => kept.is_none(),
            };
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[pymethods]
impl ClientKeyer {
    /// A keyer reading the attributes `names` from the client's instance dict `attrs`;
    /// it knows no identity yet.
    #[new]
    fn new(attrs: Py<PyDict>, names: Vec<Py<PyString>>) -> Self {
        ClientKeyer {
            attrs,
            names,
            state: Mutex::new(Arc::new(KeyerState::default())),
        }
    }

    /// Tells the keyer the cache's key builder (`builder`: the `CacheKeyBuilder` and its
    /// `KeyDeriver`, or None for a key builder of another kind, whose calls it never keys),
    /// the client's identity `sources` (the attribute values `names` as read, mappings as
    /// copies: `ClientIdentity.current`) and the params of `endpoint` for it (the dicts and
    /// their encodings, for a call that does not stream and one that does). A builder or
    /// sources other than those known (compared by identity) replace them and every endpoint.
    fn remember(
        &self,
        py: Python<'_>,
        builder: Option<(Py<PyAny>, Py<KeyDeriver>)>,
        sources: &Bound<'_, PyTuple>,
        endpoint: Py<PyString>,
        params: (Py<PyDict>, Py<PyDict>),
        encoded: (Py<EncodedParams>, Py<EncodedParams>),
    ) {
        let current = self.state();
        let same_builder = match (&current.builder, &builder) {
            (Some(known), Some(given)) => known.0.is(&given.0),
            (None, None) => true,
            _ => false,
        };
        let same = same_builder
            && current.sources.len() == sources.len()
            && current
                .sources
                .iter()
                .zip(sources.iter_borrowed())
                .all(|(kept, given)| kept.is(&*given));
        let known = |e: &EndpointParams| {
            same_str(e.endpoint.bind(py), endpoint.bind(py))
                && e.encoded[0].is(&encoded.0)
                && e.encoded[1].is(&encoded.1)
        };
        if same && current.endpoints.iter().any(known) {
            return; // (told again by a call the keyer leaves to the slow path)
        }
        let mut endpoints: Vec<EndpointParams> = Vec::new();
        if same {
            for known in &current.endpoints {
                if !same_str(known.endpoint.bind(py), endpoint.bind(py)) {
                    endpoints.push(EndpointParams {
                        endpoint: known.endpoint.clone_ref(py),
                        params: [known.params[0].clone_ref(py), known.params[1].clone_ref(py)],
                        encoded: [
                            known.encoded[0].clone_ref(py),
                            known.encoded[1].clone_ref(py),
                        ],
                    });
                }
            }
        }
        endpoints.push(EndpointParams {
            endpoint,
            params: [params.0, params.1],
            encoded: [encoded.0, encoded.1],
        });
        let state = KeyerState {
            builder,
            sources: sources.iter().map(Bound::unbind).collect(),
            endpoints,
        };
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(state);
    }

    /// `(request, params, key)` of a common call to `endpoint` with the keyword arguments
    /// `kwargs`, keyed by the cache's key builder `builder`: `request` as
    /// `split_plain_kwargs` makes it, `params` the endpoint's params for `request.stream`, `key`
    /// what `builder.build(request.request, request.model_id, params)` is. None when the
    /// builder, the client's identity or the endpoint is not one remembered, or
    /// `split_plain_kwargs` returns None: the caller takes the slow path (and tells the
    /// keyer). Raises as `KeyDeriver.key` does.
    fn split<'py>(
        &self,
        py: Python<'py>,
        builder: &Bound<'py, PyAny>,
        endpoint: &Bound<'py, PyString>,
        kwargs: &Bound<'py, PyDict>,
    ) -> PyResult<Option<KeyedCall<'py>>> {
        let state = self.state();
        let deriver = match &state.builder {
            Some((known, deriver)) if known.is(builder) => deriver.get(),
            _ => return Ok(None),
        };
        let mut found = None;
        for known in &state.endpoints {
            let name = known.endpoint.bind(py);
            if same_str(name, endpoint) {
                found = Some(known);
                break;
            }
        }
        let Some(known) = found else {
            return Ok(None);
        };
        if !self.same_identity(py, &state)? {
            return Ok(None);
        }
        let encoded = [
            known.encoded[0].get().encoding.as_slice(),
            known.encoded[1].get().encoding.as_slice(),
        ];
        let Some((request, digest)) = deriver.split_digest(py, kwargs, encoded)? else {
            return Ok(None);
        };
        let key = deriver.key_of(py, digest)?;
        let params = known.params[usize::from(request.stream)].clone_ref(py);
        Ok(Some((request, params, key)))
    }
}

/// One SDK call's keyword arguments, split for the cache: `request` is what is hashed (every
/// response-shaping argument, without `stream`), `sdk_kwargs` what the SDK is given, `stream`
/// whether the call streams, `model_id` its `model` (`"default"` without one).
///
/// Built by [`split_plain_kwargs`] for the common call, or by the Python slow path
/// (`chengeta_ai.clients.request_key.split_request`).
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct Request {
    /// The hashed arguments: given, or made on first read as `sdk_kwargs` without `stream`
    /// (a call split by [`split_plain_kwargs`]: its key is hashed from `sdk_kwargs` directly,
    /// and a streamed call never reads it).
    request: PyOnceLock<Py<PyDict>>,
    /// The arguments given to the SDK.
    #[pyo3(get)]
    sdk_kwargs: Py<PyDict>,
    /// Whether the call streams (`bool(stream)`).
    #[pyo3(get)]
    stream: bool,
    /// The `model` argument, or `"default"`.
    #[pyo3(get)]
    model_id: Py<PyString>,
}

#[pymethods]
impl Request {
    #[new]
    fn new(
        py: Python<'_>,
        request: Py<PyDict>,
        sdk_kwargs: Py<PyDict>,
        stream: bool,
        model_id: Py<PyString>,
    ) -> Self {
        let made = PyOnceLock::new();
        let _ = made.set(py, request);
        Request {
            request: made,
            sdk_kwargs,
            stream,
            model_id,
        }
    }

    /// The hashed arguments (see the class).
    #[getter]
    fn request(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let made = self.request.get_or_try_init(py, || -> PyResult<_> {
            let request = self.sdk_kwargs.bind(py).copy()?;
            let stream_key = pyo3::intern!(py, "stream");
            if request.contains(stream_key)? {
                request.del_item(stream_key)?;
            }
            Ok(request.unbind())
        })?;
        Ok(made.clone_ref(py))
    }
}

/// Whether a call argument's value is of one of the exact types `split_plain_kwargs` takes.
#[inline]
fn is_plain(value: &Bound<'_, PyAny>) -> bool {
    value.is_exact_instance_of::<PyString>()
        || value.is_exact_instance_of::<PyDict>()
        || value.is_exact_instance_of::<PyList>()
        || value.is_exact_instance_of::<PyInt>()
        || value.is_exact_instance_of::<PyFloat>()
        || value.is_exact_instance_of::<PyBool>()
        || value.is_none()
        || value.is_exact_instance_of::<PyTuple>()
        || value.is_exact_instance_of::<PyBytes>()
}

/// Arguments that `split_request`'s slow path looks at whatever their value.
const SPECIAL_ARGS: [&[u8]; 4] = [b"timeout", b"extra_headers", b"extra_query", b"extra_body"];

/// `split_request`'s fast path, for the common call: every argument a value of one of the
/// exact types `str`, `int`, `float`, `bool`, `None`, `dict`, `list`, `tuple`, `bytes`, and
/// none of `timeout`, `extra_headers`, `extra_query`, `extra_body` (the arguments looked at by
/// name). Then the hashed request is `kwargs` without `stream` (a copy, made when first read:
/// see [`Request`]), and `kwargs` is what the SDK is given. Returns None for any other call
/// (the caller takes the slow path).
///
/// Runs no Python code: the checks are on exact types and the copy, the `stream` lookup and
/// its truth value are those of built-in types.
#[pyfunction]
pub fn split_plain_kwargs<'py>(
    py: Python<'py>,
    kwargs: &Bound<'py, PyDict>,
) -> PyResult<Option<Request>> {
    let mut pos: ffi::Py_ssize_t = 0;
    let (mut key, mut value) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: PyDict_Next over a live dict with the GIL held; the borrowed references it hands
    // out are used only inside the loop, in which no Python code runs (reading a str's UTF-8
    // and comparing type pointers run none).
    unsafe {
        while ffi::PyDict_Next(kwargs.as_ptr(), &mut pos, &mut key, &mut value) != 0 {
            let value = Borrowed::from_ptr(py, value);
            if !is_plain(&value) || !Borrowed::from_ptr(py, key).is_exact_instance_of::<PyString>()
            {
                return Ok(None);
            }
            match utf8_of_ptr(py, key) {
                Some(name) if !SPECIAL_ARGS.contains(&name) => {}
                _ => return Ok(None),
            }
        }
    }
    let stream = match kwargs.get_item(pyo3::intern!(py, "stream"))? {
        Some(flag) => flag.is_truthy()?,
        None => false,
    };
    let model_id = match kwargs.get_item(pyo3::intern!(py, "model"))? {
        Some(model) if model.is_exact_instance_of::<PyString>() && !model.is_empty()? => {
            // SAFETY: the exact type was checked just above.
            unsafe { model.cast_into_unchecked::<PyString>() }.unbind()
        }
        _ => pyo3::intern!(py, "default").clone().unbind(),
    };
    Ok(Some(Request {
        request: PyOnceLock::new(),
        sdk_kwargs: kwargs.clone().unbind(),
        stream,
        model_id,
    }))
}

/// Adds `hash_request` to `chengeta_ai._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hash_request, m)?)?;
    m.add_function(wrap_pyfunction!(split_plain_kwargs, m)?)?;
    m.add_class::<Request>()?;
    m.add_class::<KeyDeriver>()?;
    m.add_class::<EncodedParams>()?;
    m.add_class::<ClientKeyer>()?;
    Ok(())
}

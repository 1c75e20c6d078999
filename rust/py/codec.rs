//! PyO3 adapter of [`crate::codec`]: walks Python objects into the compact format and back.
//!
//! Supported values: `None`, `bool`, `int` (any size), `float` (bit-exact), `str`, `bytes`,
//! `list`, `tuple`, `dict` (exact builtin types only: subclasses are rejected, never coerced)
//! and instances of pydantic models registered with [`register_model`]. Model instances are
//! written from `__dict__`, `__pydantic_extra__`, `__pydantic_fields_set__` and
//! `__pydantic_private__` and rebuilt without validation (`cls.__new__(cls)` + generic
//! `object.__setattr__`), exactly as `model_construct` does.
//!
//! Decoding only builds classes present in the registry, looked up by the name in the data; it
//! never imports anything. A decoder validates the whole body ([`codec::validate`], a pure-Rust
//! walk that builds nothing) before it hands out the first item, so a stream that starts
//! decoding finishes decoding: a corrupt, planted or foreign entry is a `DecodeError` up front.
//! Entries that validated are remembered per process by BLAKE3 of their stored bytes (with the
//! registry's generation), so a hot entry is walked once, not on every hit.
//!
//! Decoded instances are built from private per-template state: `__dict__` starts as a copy of
//! a dict of the previous scalars, `__pydantic_fields_set__` as a copy of the previous set, and
//! fields sets (field names only) are not tracked by the cycle collector.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use num_bigint::BigInt;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::sync::MutexExt;
use pyo3::types::{
    PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PySet, PyString, PyTuple, PyType,
};

use crate::codec::{
    self, mask_get, mask_len, mask_set, unzigzag, CodecError, DecodeTable, FxHasher, InternTable,
    PayloadReader, Reader, Writer, INST_EXTRA_DICT, INST_FIELDS_SET_SAME, INST_KNOWN_FLAGS,
    INST_PRIVATE_DICT, MAX_DEPTH, TAG_BIGINT, TAG_BYTES, TAG_DICT, TAG_FALSE, TAG_FLOAT, TAG_INT,
    TAG_LIST, TAG_MODEL, TAG_MODEL_DEF, TAG_NONE, TAG_STR_NEW, TAG_STR_RAW, TAG_STR_REF,
    TAG_STR_SURROGATES, TAG_TRUE, TAG_TUPLE,
};
use crate::py::errors::{DecodeError, EncodeError};

/// zstd work on buffers at least this large runs with the GIL released.
const DETACH_MIN_BYTES: usize = 32 * 1024;

// ---------------------------------------------------------------------------------------------
// registry

#[derive(Default)]
struct Registry {
    by_name: HashMap<String, Py<PyType>>,
    /// Type pointer -> (name, the class's slot accessors, see [`resolve_slots`]).
    by_type: HashMap<usize, (String, Option<ClassSlots>)>,
}

// Locking: the registry lock is only ever held for map operations and reference-count changes,
// never across a call into Python, so it cannot deadlock with the GIL.
static REGISTRY: LazyLock<RwLock<Registry>> = LazyLock::new(Default::default);

/// Bumped by every new registration; part of the validation memo's key, so a verdict reached
/// under one registry is never reused under another.
static REGISTRY_GENERATION: AtomicU64 = AtomicU64::new(0);

// Locking: held only for a set lookup or insertion, never across a call into Python.
static VALIDATED: LazyLock<Mutex<codec::ValidatedMemo>> = LazyLock::new(Default::default);

fn registry_read() -> std::sync::RwLockReadGuard<'static, Registry> {
    REGISTRY.read().unwrap_or_else(|e| e.into_inner())
}

fn type_key(t: &Bound<'_, PyType>) -> usize {
    t.as_ptr() as usize
}

/// The attributes a model instance is written from, in [`SLOT_NAMES`] order.
const SLOT_DICT: usize = 0;
const SLOT_EXTRA: usize = 1;
const SLOT_FIELDS_SET: usize = 2;
const SLOT_PRIVATE: usize = 3;
const SLOT_NAMES: [&str; 4] = [
    "__dict__",
    "__pydantic_extra__",
    "__pydantic_fields_set__",
    "__pydantic_private__",
];

/// A data descriptor found on a class's MRO (pydantic's `__slots__` member descriptors, the
/// `__dict__` getset) with its `tp_descr_get` and `tp_descr_set`: reading or writing the
/// attribute through them is what `object.__getattribute__` / `object.__setattr__` do once
/// their type lookup found a data descriptor, minus the lookup (an MRO walk when the type's
/// attribute cache misses).
struct SlotAccess {
    descr: Py<PyAny>,
    get: pyo3::ffi::descrgetfunc,
    set: pyo3::ffi::descrsetfunc,
}

/// A registered class's accessors of [`SLOT_NAMES`], in that order (shared by the encoders and
/// decoders that meet the class).
type ClassSlots = Arc<[SlotAccess; 4]>;

/// Resolves [`SLOT_NAMES`] on `ty`'s MRO as `_PyType_Lookup` does (the first class whose
/// namespace holds the name); `None` unless every one is a data descriptor with a getter.
fn resolve_slots(ty: &Bound<'_, PyType>) -> Option<ClassSlots> {
    let py = ty.py();
    let mro = ty.getattr(intern!(py, "__mro__")).ok()?;
    let mro = mro.cast_into::<PyTuple>().ok()?;
    let mut out: Vec<SlotAccess> = Vec::with_capacity(4);
    for name in SLOT_NAMES {
        let mut found = None;
        for cls in mro.iter() {
            let ns = cls.getattr(intern!(py, "__dict__")).ok()?;
            if ns.contains(name).ok()? {
                found = Some(ns.get_item(name).ok()?);
                break;
            }
        }
        let descr = found?;
        let dt = descr.get_type();
        // SAFETY: `dt` is a live type object; PyType_GetSlot (stable ABI, any type on 3.10+)
        // returns the slot's function pointer or NULL. A non-NULL `tp_descr_get` slot is a
        // `descrgetfunc` by the C API's contract.
        let (get, set) = unsafe {
            (
                pyo3::ffi::PyType_GetSlot(dt.as_type_ptr(), pyo3::ffi::Py_tp_descr_get),
                pyo3::ffi::PyType_GetSlot(dt.as_type_ptr(), pyo3::ffi::Py_tp_descr_set),
            )
        };
        if get.is_null() || set.is_null() {
            return None; // not a data descriptor: the instance dict could shadow it
        }
        // SAFETY: see above (`tp_descr_set` is likewise a `descrsetfunc`).
        let (get, set): (pyo3::ffi::descrgetfunc, pyo3::ffi::descrsetfunc) = unsafe {
            (
                std::mem::transmute::<*mut std::ffi::c_void, pyo3::ffi::descrgetfunc>(get),
                std::mem::transmute::<*mut std::ffi::c_void, pyo3::ffi::descrsetfunc>(set),
            )
        };
        out.push(SlotAccess {
            descr: descr.unbind(),
            get,
            set,
        });
    }
    let slots: [SlotAccess; 4] = out.try_into().ok()?;
    Some(Arc::new(slots))
}

/// Registers a pydantic v2 model class under a stable name, written into encoded data and used
/// to find the class again when decoding. Re-registering the same (class, name) is a no-op; a
/// name bound to another class, or a class already registered under another name, is a
/// `ValueError`.
#[pyfunction]
fn register_model(py: Python<'_>, cls: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    let cls = cls
        .cast::<PyType>()
        .map_err(|_| PyTypeError::new_err("register_model: cls must be a class"))?;
    let base = py.import("pydantic")?.getattr("BaseModel")?;
    if cls.is(&base) || !cls.is_subclass(&base)? {
        return Err(PyTypeError::new_err(format!(
            "register_model: {} is not a pydantic.BaseModel subclass",
            cls.qualname()?
        )));
    }
    if name.is_empty() {
        return Err(PyValueError::new_err(
            "register_model: name must not be empty",
        ));
    }
    let key = type_key(cls);
    if registry_read()
        .by_type
        .get(&key)
        .is_some_and(|(n, _)| n == name)
    {
        return Ok(()); // registered already (the common case of repeated registrations)
    }
    // Resolved before the lock (it calls into Python); kept only if this registration is new.
    let slots = resolve_slots(cls);
    let conflict = {
        let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = reg.by_name.get(name) {
            if existing.is(cls) {
                return Ok(());
            }
            Some(format!(
                "model name {name:?} is already registered to another class"
            ))
        } else if let Some((other, _)) = reg.by_type.get(&key) {
            Some(format!(
                "class is already registered under the name {other:?}"
            ))
        } else {
            reg.by_name.insert(name.to_owned(), cls.clone().unbind());
            reg.by_type.insert(key, (name.to_owned(), slots));
            REGISTRY_GENERATION.fetch_add(1, Ordering::SeqCst);
            None
        }
    };
    match conflict {
        Some(msg) => Err(PyValueError::new_err(format!(
            "register_model({}): {msg}",
            cls.qualname()?
        ))),
        None => Ok(()),
    }
}

/// The writing side's discovery hook (see [`set_discovery_hook`]), or None.
// Locking: held only to clone or replace the reference, never across a call into Python.
static DISCOVERY_HOOK: RwLock<Option<Py<PyAny>>> = RwLock::new(None);

/// Sets (or, with None, removes) the hook the encoder calls with an unregistered pydantic
/// model class met *inside* a registered model instance (a nested value reached at run time,
/// not through annotations). The hook may register the class and return True: the encoder
/// then encodes the instance as registered; anything else keeps the "unregistered" error.
/// Top-level items of unregistered classes never reach the hook.
#[pyfunction]
#[pyo3(signature = (hook))]
fn set_discovery_hook(hook: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    if let Some(h) = &hook {
        if !h.is_callable() {
            return Err(PyTypeError::new_err(
                "the discovery hook must be callable or None",
            ));
        }
    }
    *DISCOVERY_HOOK.write().unwrap_or_else(|e| e.into_inner()) = hook.map(Bound::unbind);
    Ok(())
}

fn discovery_hook(py: Python<'_>) -> Option<Py<PyAny>> {
    DISCOVERY_HOOK
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|h| h.clone_ref(py))
}

/// `module.qualname` of a value's class (the name `register_model` uses by default).
fn full_type_name(v: &Bound<'_, PyAny>) -> String {
    let ty = v.get_type();
    let module = ty
        .module()
        .map(|m| m.to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{module}.{}", type_name(v))
}

/// The registered model classes, by name.
#[pyfunction]
fn registered_models(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    let items: Vec<(String, Py<PyType>)> = registry_read()
        .by_name
        .iter()
        .map(|(k, v)| (k.clone(), v.clone_ref(py)))
        .collect();
    for (k, v) in items {
        out.set_item(k, v)?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// encoding

enum Seg {
    Attr(String),
    Index(usize),
    Key(String),
}

/// An encoding failure: message plus the path to the value, innermost segment first.
struct EncFail {
    path: Vec<Seg>,
    msg: String,
}

impl EncFail {
    fn new(msg: impl Into<String>) -> Self {
        Self {
            path: Vec::new(),
            msg: msg.into(),
        }
    }

    fn at(mut self, seg: Seg) -> Self {
        self.path.push(seg);
        self
    }

    fn render(&self, prefix: &str) -> String {
        let mut s = prefix.to_owned();
        if !self.path.is_empty() {
            s.push(' ');
            for seg in self.path.iter().rev() {
                match seg {
                    Seg::Attr(a) => {
                        s.push('.');
                        s.push_str(a);
                    }
                    Seg::Index(i) => s.push_str(&format!("[{i}]")),
                    Seg::Key(k) => s.push_str(&format!("[{k}]")),
                }
            }
        }
        s.push_str(": ");
        s.push_str(&self.msg);
        s
    }
}

impl From<PyErr> for EncFail {
    fn from(e: PyErr) -> Self {
        Self::new(e.to_string())
    }
}

type EncResult<T = ()> = Result<T, EncFail>;

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .qualname()
        .map(|q| q.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn is_scalar(v: &Bound<'_, PyAny>) -> bool {
    v.is_none()
        || v.is_exact_instance_of::<PyString>()
        || v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyBool>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_exact_instance_of::<PyBytes>()
}

/// Whether scalar `v` can be written as "same as previous" `p`, on borrowed pointers without
/// reference counting: identity, then the same exact type and value for `str`, `int`, `bytes`
/// (C-level comparison) and `float` (by bits, so nan and -0.0 are exact). Runs no Python code.
///
/// # Safety
/// Both pointers must be valid objects for the duration of the call.
unsafe fn same_scalar_ptr(v: *mut pyo3::ffi::PyObject, p: *mut pyo3::ffi::PyObject) -> bool {
    use pyo3::ffi;
    if v == p {
        return true;
    }
    let t = ffi::Py_TYPE(v);
    if t != ffi::Py_TYPE(p) {
        return false;
    }
    if t == std::ptr::addr_of_mut!(ffi::PyFloat_Type) {
        return ffi::PyFloat_AsDouble(v).to_bits() == ffi::PyFloat_AsDouble(p).to_bits();
    }
    if t == std::ptr::addr_of_mut!(ffi::PyUnicode_Type)
        || t == std::ptr::addr_of_mut!(ffi::PyLong_Type)
        || t == std::ptr::addr_of_mut!(ffi::PyBytes_Type)
    {
        let r = ffi::PyObject_RichCompareBool(v, p, ffi::Py_EQ);
        if r < 0 {
            ffi::PyErr_Clear();
        }
        return r == 1;
    }
    false
}

/// Dict keys are builtin scalars or tuples of them: the decoder rebuilds them without calling
/// user code (a model key would run its `__hash__` on data from the cache).
fn check_key(k: &Bound<'_, PyAny>, depth: usize) -> EncResult {
    if depth > MAX_DEPTH {
        return Err(EncFail::new(format!(
            "nesting deeper than {MAX_DEPTH} levels (recursive structure?)"
        )));
    }
    if let Ok(t) = k.cast_exact::<PyTuple>() {
        for item in t.iter() {
            check_key(&item, depth + 1)?;
        }
        return Ok(());
    }
    if is_scalar(k)
        || !k
            .get_type()
            .hasattr(intern!(k.py(), "__pydantic_fields__"))?
    {
        return Ok(()); // scalars; anything else unsupported is reported by `value`
    }
    Err(EncFail::new(format!(
        "model instance '{}' as a dict key is not supported",
        type_name(k)
    )))
}

struct EncTemplate {
    fields: Vec<Py<PyString>>,
    /// `hash()` of each field name (cached in the str), to match fields-set members quickly.
    hashes: Vec<isize>,
    prev: Vec<Option<Py<PyAny>>>,
    /// Private copy of the previous instance's fields set.
    prev_fs: Option<Py<PySet>>,
}

/// A registered class met by this encoder.
struct EncClass {
    name: String,
    templates: Vec<usize>,
    /// The class's slot accessors; `None` when one of them is not a data descriptor (then
    /// every read is a generic `getattr`).
    slots: Option<ClassSlots>,
}

impl EncClass {
    fn new(name: String, slots: Option<ClassSlots>) -> Self {
        Self {
            name,
            templates: Vec::new(),
            slots,
        }
    }
}

/// Encoder state shared by `encode` and `StreamEncoder`.
#[derive(Default)]
struct Encoder {
    w: Writer,
    table: InternTable,
    templates: Vec<EncTemplate>,
    /// Registered class (by type pointer; registered classes live forever) -> its entry.
    by_type: HashMap<usize, EncClass, BuildHasherDefault<FxHasher>>,
    /// Scratch fields-set representation (field mask, other names sorted).
    fs_scratch: (Vec<u8>, Vec<String>),
    /// How many model instances enclose the value being encoded.
    in_model: u32,
}

/// `getattr(obj, name)` by `object.__getattribute__` (descriptors and instance dict, no
/// `__getattr__` hook): how the model's `__dict__` and `__pydantic_*__` slots are read, as
/// the decoder sets them with `object.__setattr__`. Falls back to a full `getattr` on failure.
fn generic_getattr<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: both pointers are valid for the call (owned by live `Bound`s);
    // PyObject_GenericGetAttr returns a new reference or NULL with an exception set.
    let got = unsafe {
        Bound::from_owned_ptr_or_err(
            obj.py(),
            pyo3::ffi::PyObject_GenericGetAttr(obj.as_ptr(), name.as_ptr()),
        )
    };
    got.or_else(|_| obj.getattr(name))
}

/// Whether two objects of the same exact scalar type (str, int, bytes) are equal: C-level
/// comparison with an identity shortcut, no Python result object.
fn scalar_eq(a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> bool {
    // SAFETY: both pointers are valid for the call; the result is -1 (error), 0 or 1.
    let r =
        unsafe { pyo3::ffi::PyObject_RichCompareBool(a.as_ptr(), b.as_ptr(), pyo3::ffi::Py_EQ) };
    if r < 0 {
        drop(PyErr::take(a.py()));
    }
    r == 1
}

/// Whether the keys of `dict`, in order, are `fields` (identity first, then equality).
fn keys_are(dict: &Bound<'_, PyDict>, fields: &[Py<PyString>]) -> bool {
    if dict.len() != fields.len() {
        return false;
    }
    let mut pos: pyo3::ffi::Py_ssize_t = 0;
    let mut key = std::ptr::null_mut();
    let mut val = std::ptr::null_mut();
    for f in fields {
        // SAFETY: `dict` is a live dict not mutated during this loop (no Python code runs
        // between calls except `__eq__` of exact str keys, which is C); `key`/`val` are
        // borrowed references valid while the dict is unchanged.
        let more = unsafe { pyo3::ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut val) };
        if more == 0 {
            return false;
        }
        if key != f.as_ptr() {
            // SAFETY: `key` is a valid borrowed reference (see above).
            let k = unsafe { Bound::from_borrowed_ptr(dict.py(), key) };
            if !k.is_exact_instance_of::<PyString>() || !scalar_eq(&k, f.bind(dict.py()).as_any()) {
                return false;
            }
        }
    }
    true
}

/// Reads slot `i` ([`SLOT_NAMES`]) of model instance `v` through its class's resolved getter
/// (`slots`), or by a generic `getattr` (no getter, or the getter failed: an unset slot).
fn read_slot<'py>(
    v: &Bound<'py, PyAny>,
    slots: Option<&ClassSlots>,
    i: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let py = v.py();
    if let Some(slots) = slots {
        let g = &slots[i];
        // SAFETY: `g.get` is the `tp_descr_get` of `g.descr`'s type (see `resolve_slots`),
        // called with that descriptor, a live instance and its type, as the interpreter
        // calls it; it returns a new reference or NULL with an exception set.
        let got = unsafe {
            (g.get)(
                g.descr.as_ptr(),
                v.as_ptr(),
                pyo3::ffi::Py_TYPE(v.as_ptr()).cast(),
            )
        };
        if !got.is_null() {
            // SAFETY: a new reference (see above).
            return Ok(unsafe { Bound::from_owned_ptr(py, got) });
        }
        drop(PyErr::take(py));
    }
    let name = match i {
        SLOT_DICT => intern!(py, "__dict__"),
        SLOT_EXTRA => intern!(py, "__pydantic_extra__"),
        SLOT_FIELDS_SET => intern!(py, "__pydantic_fields_set__"),
        _ => intern!(py, "__pydantic_private__"),
    };
    generic_getattr(v, name)
}

impl Encoder {
    fn string(&mut self, s: &Bound<'_, PyString>) -> EncResult {
        match s.to_str() {
            Ok(text) => self.w.string(&mut self.table, text),
            Err(_) => {
                let b = s.call_method1(intern!(s.py(), "encode"), ("utf-8", "surrogatepass"))?;
                let b = b.cast_into::<PyBytes>().map_err(PyErr::from)?;
                self.w.payload(TAG_STR_SURROGATES, b.as_bytes());
            }
        }
        Ok(())
    }

    fn value(&mut self, v: &Bound<'_, PyAny>, depth: usize) -> EncResult {
        if depth > MAX_DEPTH {
            return Err(EncFail::new(format!(
                "nesting deeper than {MAX_DEPTH} levels (recursive structure?)"
            )));
        }
        if let Ok(s) = v.cast_exact::<PyString>() {
            return self.string(s);
        }
        if v.is_none() {
            self.w.tag(TAG_NONE);
            return Ok(());
        }
        if let Ok(b) = v.cast_exact::<PyBool>() {
            self.w.tag(if b.is_true() { TAG_TRUE } else { TAG_FALSE });
            return Ok(());
        }
        if v.is_exact_instance_of::<PyInt>() {
            match v.extract::<i64>() {
                Ok(i) => self.w.int(i),
                Err(_) => {
                    let big: BigInt = v.extract()?;
                    self.w.payload(TAG_BIGINT, &big.to_signed_bytes_le());
                }
            }
            return Ok(());
        }
        if let Ok(f) = v.cast_exact::<PyFloat>() {
            self.w.float(f.value());
            return Ok(());
        }
        if let Ok(l) = v.cast_exact::<PyList>() {
            self.w.tag(TAG_LIST);
            self.w.varint(l.len() as u64);
            for (i, item) in l.iter().enumerate() {
                self.value(&item, depth + 1)
                    .map_err(|e| e.at(Seg::Index(i)))?;
            }
            return Ok(());
        }
        if let Ok(d) = v.cast_exact::<PyDict>() {
            self.w.tag(TAG_DICT);
            return self.dict_body(d, depth, false);
        }
        if let Ok(t) = v.cast_exact::<PyTuple>() {
            self.w.tag(TAG_TUPLE);
            self.w.varint(t.len() as u64);
            for (i, item) in t.iter().enumerate() {
                self.value(&item, depth + 1)
                    .map_err(|e| e.at(Seg::Index(i)))?;
            }
            return Ok(());
        }
        if let Ok(b) = v.cast_exact::<PyBytes>() {
            self.w.payload(TAG_BYTES, b.as_bytes());
            return Ok(());
        }
        let ty = v.get_type();
        let key = type_key(&ty);
        if self.by_type.contains_key(&key) {
            return self.nested_model(v, key, depth);
        }
        let registered = registry_read().by_type.get(&key).cloned();
        if let Some((name, slots)) = registered {
            self.by_type.insert(key, EncClass::new(name, slots));
            return self.nested_model(v, key, depth);
        }
        let name = type_name(v);
        if ty
            .hasattr(intern!(v.py(), "__pydantic_fields__"))
            .unwrap_or(false)
        {
            if self.in_model > 0 {
                if let Some(hook) = discovery_hook(v.py()) {
                    if hook.bind(v.py()).call1((&ty,))?.is_truthy()? {
                        let found = registry_read().by_type.get(&key).cloned();
                        if let Some((name, slots)) = found {
                            self.by_type.insert(key, EncClass::new(name, slots));
                            return self.nested_model(v, key, depth);
                        }
                    }
                }
            }
            return Err(EncFail::new(format!(
                "unregistered model class '{}' (register it with chengeta_ai.register_model)",
                full_type_name(v)
            )));
        }
        let base = if v.is_instance_of::<PyString>() {
            " (a str subclass)"
        } else if v.is_instance_of::<PyInt>() {
            " (an int subclass)"
        } else if v.is_instance_of::<PyDict>() {
            " (a dict subclass)"
        } else {
            ""
        };
        Err(EncFail::new(format!("unsupported type '{name}'{base}")))
    }

    /// `varint len | (key, value)*`; `attrs` renders str keys as `.key` in error paths.
    fn dict_body(&mut self, d: &Bound<'_, PyDict>, depth: usize, attrs: bool) -> EncResult {
        self.w.varint(d.len() as u64);
        for (k, val) in d.iter() {
            let seg = || match k.cast_exact::<PyString>() {
                Ok(s) if attrs => Seg::Attr(s.to_string()),
                _ => Seg::Key(
                    k.repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| "?".into()),
                ),
            };
            check_key(&k, depth + 1).map_err(|e| e.at(seg()))?;
            self.value(&k, depth + 1).map_err(|e| e.at(seg()))?;
            self.value(&val, depth + 1).map_err(|e| e.at(seg()))?;
        }
        Ok(())
    }

    /// A registered model instance, counted as an enclosing model while its fields are
    /// encoded (the discovery hook is consulted only inside one).
    fn nested_model(&mut self, v: &Bound<'_, PyAny>, key: usize, depth: usize) -> EncResult {
        self.in_model += 1;
        let out = self.model(v, key, depth);
        self.in_model -= 1;
        out
    }

    fn model(&mut self, v: &Bound<'_, PyAny>, key: usize, depth: usize) -> EncResult {
        let py = v.py();
        // One look-up of the class entry per instance (its slot accessors are shared).
        let slots = self.by_type[&key].slots.clone();
        let slots = slots.as_ref();
        let dict = read_slot(v, slots, SLOT_DICT)?;
        let dict = dict
            .cast_exact::<PyDict>()
            .map_err(|_| EncFail::new("model __dict__ is not a dict"))?;
        let n = dict.len();
        let found = self.by_type[&key]
            .templates
            .iter()
            .copied()
            .find(|&id| keys_are(dict, &self.templates[id].fields));
        let tid = match found {
            Some(id) => {
                self.w.tag(TAG_MODEL);
                self.w.varint(id as u64);
                id
            }
            None => {
                let mut fields = Vec::with_capacity(n);
                let mut hashes = Vec::with_capacity(n);
                for (k, _) in dict.iter() {
                    let s = k
                        .cast_exact::<PyString>()
                        .map_err(|_| EncFail::new("model __dict__ has a non-str key"))?;
                    hashes.push(s.hash()?);
                    fields.push(s.clone().unbind());
                }
                let name = self.by_type[&key].name.clone();
                self.w.tag(TAG_MODEL_DEF);
                self.w.string(&mut self.table, &name);
                self.w.varint(n as u64);
                for f in &fields {
                    self.string(f.bind(py))?;
                }
                let id = self.templates.len();
                self.templates.push(EncTemplate {
                    prev: (0..n).map(|_| None).collect(),
                    fields,
                    hashes,
                    prev_fs: None,
                });
                self.by_type
                    .get_mut(&key)
                    .expect("class entry")
                    .templates
                    .push(id);
                id
            }
        };

        let extra = read_slot(v, slots, SLOT_EXTRA)?;
        let fields_set = read_slot(v, slots, SLOT_FIELDS_SET)?;
        let private = read_slot(v, slots, SLOT_PRIVATE)?;
        let fields_set = fields_set.cast_exact::<PySet>().map_err(|_| {
            EncFail::new("__pydantic_fields_set__ is not a set")
                .at(Seg::Attr("__pydantic_fields_set__".into()))
        })?;
        // "Same as the previous instance's": set equality with a private copy of it, compared
        // before any member is looked at (most instances of a stream repeat the previous set).
        // Members are field names: `str`, a subclass being stored as its string value.
        let snap = self.templates[tid]
            .prev_fs
            .as_ref()
            .map(|p| p.clone_ref(py));
        let same_fs = snap.as_ref().is_some_and(|p| {
            let p = p.bind(py);
            p.len() == fields_set.len() && scalar_eq(fields_set.as_any(), p.as_any())
        });
        let mut fs_rep = std::mem::take(&mut self.fs_scratch);
        let mut fs_copy = None;
        if !same_fs {
            fs_rep.0.clear();
            fs_rep.0.resize(mask_len(n), 0);
            fs_rep.1.clear();
            let t = &self.templates[tid];
            // the private copy holds exact `str` members only
            let copy = PySet::empty(py)?;
            for name in fields_set.iter() {
                let s = name
                    .cast::<PyString>()
                    .map_err(|_| EncFail::new("__pydantic_fields_set__ holds a non-str"))?;
                // A str subclass is its string value (what the decoder rebuilds, and what the
                // "same" test above compares equal to).
                let s = if s.is_exact_instance_of::<PyString>() {
                    s.clone()
                } else {
                    PyString::new(py, s.to_str()?)
                };
                let h = s.hash()?;
                copy.add(&s)?;
                let pos = (0..n).find(|&i| {
                    let f = t.fields[i].bind(py);
                    s.is(f) || (t.hashes[i] == h && scalar_eq(s.as_any(), f.as_any()))
                });
                match pos {
                    Some(i) => mask_set(&mut fs_rep.0, i),
                    None => fs_rep.1.push(s.to_str()?.to_owned()),
                }
            }
            fs_rep.1.sort_unstable();
            fs_copy = Some(copy.unbind());
        }
        let mut flags = 0u8;
        if same_fs {
            flags |= INST_FIELDS_SET_SAME;
        }
        let extra = if extra.is_none() {
            None
        } else {
            flags |= INST_EXTRA_DICT;
            Some(
                extra
                    .cast_into_exact::<PyDict>()
                    .map_err(|_| EncFail::new("__pydantic_extra__ is neither None nor a dict"))?,
            )
        };
        let private = if private.is_none() {
            None
        } else {
            flags |= INST_PRIVATE_DICT;
            Some(
                private
                    .cast_into_exact::<PyDict>()
                    .map_err(|_| EncFail::new("__pydantic_private__ is neither None nor a dict"))?,
            )
        };
        self.w.tag(flags);
        let mask_at = self.w.structure.len();
        self.w.structure.resize(mask_at + mask_len(n), 0);
        let mut pos: pyo3::ffi::Py_ssize_t = 0;
        for i in 0..n {
            let (mut kp, mut vp) = (std::ptr::null_mut(), std::ptr::null_mut());
            // SAFETY: `dict` is a live dict; PyDict_Next stays in bounds even if the dict changed
            // since the last call. The borrowed value is compared with `same_scalar_ptr`, which
            // runs no Python code, and made owned (`Bound`) before anything else can run.
            let same = unsafe {
                if pyo3::ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut kp, &mut vp) == 0 {
                    return Err(EncFail::new("model __dict__ changed size while encoding"));
                }
                match &self.templates[tid].prev[i] {
                    Some(p) => same_scalar_ptr(vp, p.as_ptr()),
                    None => false,
                }
            };
            if same {
                mask_set(&mut self.w.structure[mask_at..], i);
                continue;
            }
            // SAFETY: borrowed references from PyDict_Next, still valid (see above).
            let (k, val) = unsafe {
                (
                    Bound::from_borrowed_ptr(py, kp),
                    Bound::from_borrowed_ptr(py, vp),
                )
            };
            self.value(&val, depth + 1)
                .map_err(|e| e.at(Seg::Attr(k.to_string())))?;
            self.templates[tid].prev[i] = is_scalar(&val).then(|| val.unbind());
        }
        if dict.len() != n {
            return Err(EncFail::new("model __dict__ changed size while encoding"));
        }
        if flags & INST_FIELDS_SET_SAME == 0 {
            self.w.structure.extend_from_slice(&fs_rep.0);
            self.w.varint(fs_rep.1.len() as u64);
            for s in &fs_rep.1 {
                self.w.string(&mut self.table, s);
            }
        }
        self.fs_scratch = fs_rep;
        // This instance's fields set becomes the template's (also when it was "same": a nested
        // instance of the template may have replaced it).
        self.templates[tid].prev_fs = fs_copy.or(snap);
        if let Some(extra) = extra {
            self.dict_body(&extra, depth, true)?;
        }
        if let Some(private) = private {
            self.dict_body(&private, depth, false)
                .map_err(|e| e.at(Seg::Attr("__pydantic_private__".into())))?;
        }
        Ok(())
    }
}

fn check_level(level: i32) -> PyResult<()> {
    if !(-7..=22).contains(&level) {
        return Err(PyValueError::new_err(format!(
            "zstd level must be in -7..=22, got {level}"
        )));
    }
    Ok(())
}

/// Frames a finished writer, compressing with the GIL released when the body is large.
fn pack<'py>(
    py: Python<'py>,
    w: &Writer,
    sequence: bool,
    count: u64,
    compress_min_bytes: usize,
    level: i32,
) -> PyResult<Bound<'py, PyBytes>> {
    let body = codec::build_body(w);
    let compressed = if body.len() >= compress_min_bytes {
        let r = if body.len() >= DETACH_MIN_BYTES {
            py.detach(|| codec::zstd_compress(&body, level))
        } else {
            codec::zstd_compress(&body, level)
        };
        Some(r.map_err(|e| EncodeError::new_err(e.to_string()))?)
            .filter(|c| c.len() < body.len() && codec::expansion_ok(c.len(), body.len()))
    } else {
        None
    };
    let out = codec::frame(&body, compressed.as_deref(), sequence, count);
    Ok(PyBytes::new(py, &out))
}

/// Seeds the validation memo with an encoding this process just wrote: the encoder's output
/// is valid by construction (every tag, count and reference it writes is one the decoder reads,
/// and every class it names was registered under `generation`), so the first hit of an entry
/// this process stored is not walked again. Entries written elsewhere are still validated
/// whole on their first hit here.
fn remember_valid(py: Python<'_>, generation: u64, data: &[u8]) {
    if data.len() < codec::MEMO_MIN_BYTES {
        return;
    }
    let key = if data.len() >= DETACH_MIN_BYTES {
        py.detach(|| codec::memo_key(generation, data))
    } else {
        codec::memo_key(generation, data)
    };
    VALIDATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
}

/// Encodes one value into compact bytes (zstd-compressed when the body is at least
/// `compress_min_bytes` long). Raises `EncodeError` on unsupported input.
#[pyfunction]
#[pyo3(signature = (value, *, compress_min_bytes = 2048, level = 3))]
fn encode<'py>(
    py: Python<'py>,
    value: &Bound<'py, PyAny>,
    compress_min_bytes: usize,
    level: i32,
) -> PyResult<Bound<'py, PyBytes>> {
    check_level(level)?;
    let mut enc = Encoder::default();
    enc.value(value, 0)
        .map_err(|e| EncodeError::new_err(e.render("value")))?;
    pack(py, &enc.w, false, 1, compress_min_bytes, level)
}

struct EncState {
    enc: Encoder,
    count: u64,
    poisoned: Option<String>,
    finished: bool,
}

/// Encodes a sequence of items incrementally: `push` does the per-item work, `finish` frames
/// (and compresses) the result. After an `EncodeError` the encoder is poisoned.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct StreamEncoder {
    // Locking: every method locks with `lock_py_attached`, which detaches while waiting, so a
    // holder that calls into Python (attribute reads on models) cannot deadlock with the GIL.
    state: Mutex<EncState>,
    compress_min_bytes: usize,
    level: i32,
}

#[pymethods]
impl StreamEncoder {
    #[new]
    #[pyo3(signature = (*, compress_min_bytes = 2048, level = 3))]
    fn new(compress_min_bytes: usize, level: i32) -> PyResult<Self> {
        check_level(level)?;
        Ok(Self {
            state: Mutex::new(EncState {
                enc: Encoder::default(),
                count: 0,
                poisoned: None,
                finished: false,
            }),
            compress_min_bytes,
            level,
        })
    }

    /// Appends one item and returns `nbytes` after it (saves a second call per item). Raises
    /// `EncodeError` (with the item number and path) on unsupported input, after which the
    /// encoder is poisoned.
    fn push(&self, py: Python<'_>, item: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.push_item(py, item)
            .map(|(total, _)| total)
            .map_err(EncodeError::new_err)
    }

    /// Why the encoder cannot take items any more: the message of the `EncodeError` that
    /// poisoned it, or that it was finished; None while it can.
    #[getter]
    fn error(&self, py: Python<'_>) -> Option<String> {
        let st = self
            .state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner());
        st.poisoned.clone().or_else(|| {
            st.finished
                .then(|| "StreamEncoder already finished".to_owned())
        })
    }

    /// The encoded sequence. The encoder cannot be used afterwards.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let (w, count) = {
            let mut st = self
                .state
                .lock_py_attached(py)
                .unwrap_or_else(|e| e.into_inner());
            if st.finished {
                return Err(EncodeError::new_err("StreamEncoder already finished"));
            }
            if let Some(msg) = &st.poisoned {
                return Err(EncodeError::new_err(format!(
                    "StreamEncoder poisoned by: {msg}"
                )));
            }
            st.finished = true;
            let enc = std::mem::take(&mut st.enc);
            (enc.w, st.count)
        };
        // Read before packing: every class this encoding names was registered by then.
        let generation = REGISTRY_GENERATION.load(Ordering::SeqCst);
        let out = pack(py, &w, true, count, self.compress_min_bytes, self.level)?;
        remember_valid(py, generation, out.as_bytes());
        Ok(out)
    }

    /// Items pushed so far.
    #[getter]
    fn count(&self, py: Python<'_>) -> u64 {
        self.state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .count
    }

    /// Uncompressed body bytes written so far.
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> usize {
        self.state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .enc
            .w
            .len()
    }
}

impl StreamEncoder {
    /// `push` for Rust callers (`ChunkLog.record`): encodes one item and returns `(nbytes after
    /// it, bytes it added)`, or the message `push` raises (the encoder is poisoned by then,
    /// unless it was finished or poisoned before).
    pub(crate) fn push_item(
        &self,
        py: Python<'_>,
        item: &Bound<'_, PyAny>,
    ) -> Result<(usize, usize), String> {
        let mut st = self
            .state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner());
        if st.finished {
            return Err("StreamEncoder already finished".to_owned());
        }
        if let Some(msg) = &st.poisoned {
            return Err(format!("StreamEncoder poisoned by: {msg}"));
        }
        let n = st.count;
        let before = st.enc.w.len();
        match st.enc.value(item, 0) {
            Ok(()) => {
                st.count += 1;
                let total = st.enc.w.len();
                Ok((total, total - before))
            }
            Err(e) => {
                let msg = e.render(&format!("chunk {n}"));
                st.poisoned = Some(msg.clone());
                Err(msg)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// decoding

enum DErr {
    Codec(CodecError),
    Py(PyErr),
}

impl From<CodecError> for DErr {
    fn from(e: CodecError) -> Self {
        Self::Codec(e)
    }
}

impl From<PyErr> for DErr {
    fn from(e: PyErr) -> Self {
        Self::Py(e)
    }
}

type DResult<T> = Result<T, DErr>;

fn corrupt(msg: impl Into<String>) -> DErr {
    DErr::Codec(CodecError::Corrupt(msg.into()))
}

struct DecTemplate {
    cls: Py<PyType>,
    maker: Maker,
    /// The class's slot accessors (from the registry), or `None`: generic `setattr`.
    slots: Option<ClassSlots>,
    fields: Vec<Py<PyString>>,
    prev: Vec<Option<Py<PyAny>>>,
    /// Private to the decoder, never handed out: every field in order, holding its previous
    /// scalar (or a stale value / `None` where a mask bit may not point). An instance's
    /// `__dict__` starts as a copy of it (one memcpy for the dict's table), then only the
    /// fields that changed are set. `None` when field names repeat (planted data): then every
    /// instance's dict is built field by field.
    base: Option<Py<PyDict>>,
    /// Fields whose value in `base` is not their `prev`: a scalar that changed is written to
    /// the instance only (most such fields change on every instance: `content`, OpenAI's
    /// `obfuscation`), and `base` is brought up to date when the value next repeats.
    stale: Vec<bool>,
    /// Private copy of the previous instance's fields set: the next one is a copy of it.
    prev_fs: Option<Py<PySet>>,
    /// Instances begun so far (see [`codec`]'s validator): a change while reading a field means
    /// its value held an instance of this same template, which updated `prev` in between.
    seq: u64,
}

/// A new set with the members of `set` (`set(set)`: copies the hash table, no rehashing).
fn copy_set<'py>(set: &Bound<'py, PySet>) -> PyResult<Bound<'py, PySet>> {
    // SAFETY: `set` is a live set; PySet_New returns a new reference or NULL with an exception.
    unsafe {
        Bound::from_owned_ptr_or_err(set.py(), pyo3::ffi::PySet_New(set.as_ptr()))
            .map(|o| o.cast_into_unchecked())
    }
}

/// A new dict with the items of `dict` (`dict.copy()`).
fn copy_dict<'py>(dict: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    // SAFETY: `dict` is a live dict; PyDict_Copy returns a new reference or NULL with an
    // exception.
    unsafe {
        Bound::from_owned_ptr_or_err(dict.py(), pyo3::ffi::PyDict_Copy(dict.as_ptr()))
            .map(|o| o.cast_into_unchecked())
    }
}

/// How instances of a decoded class are made: what `cls.__new__(cls)` does (`model_construct`'s
/// first step), resolved once per template.
#[derive(Clone, Copy)]
enum Maker {
    /// The class's `tp_alloc`, when its `__new__` is `object.__new__` and it is not abstract:
    /// `object.__new__(cls)` is then `tp_alloc(cls, 0)` plus the check for abstract methods
    /// and an empty instance `__dict__` (on 3.11/3.12) that the decoder replaces at once (with
    /// a dict built from it first); `tp_alloc` alone leaves the instance with no dict, a state
    /// CPython supports (it is what `PyType_GenericNew` makes), until `__dict__` is set.
    Alloc(pyo3::ffi::allocfunc),
    /// The class's `tp_new` (a `__new__` of its own, or abstract): called as `cls()` would.
    New(pyo3::ffi::newfunc),
}

fn instance_maker(cls: &Bound<'_, PyType>) -> PyResult<Maker> {
    use pyo3::ffi;
    let tp = cls.as_type_ptr();
    // SAFETY: `tp` and `PyBaseObject_Type` are live type objects. `PyType_GetSlot` (stable ABI,
    // any type on 3.10+) returns a slot's function pointer or NULL; `tp_new` slots are
    // `newfunc`s and `tp_alloc` slots `allocfunc`s by the C API's contract. `PyType_GetFlags`
    // reads the type's flags.
    unsafe {
        let new = ffi::PyType_GetSlot(tp, ffi::Py_tp_new);
        if new.is_null() {
            return Err(PyTypeError::new_err("model class cannot be instantiated"));
        }
        let object_new = ffi::PyType_GetSlot(
            std::ptr::addr_of_mut!(ffi::PyBaseObject_Type),
            ffi::Py_tp_new,
        );
        let alloc = ffi::PyType_GetSlot(tp, ffi::Py_tp_alloc);
        let abstract_ = ffi::PyType_GetFlags(tp) & ffi::Py_TPFLAGS_IS_ABSTRACT != 0;
        Ok(if new == object_new && !alloc.is_null() && !abstract_ {
            Maker::Alloc(std::mem::transmute::<*mut std::ffi::c_void, ffi::allocfunc>(alloc))
        } else {
            Maker::New(std::mem::transmute::<*mut std::ffi::c_void, ffi::newfunc>(
                new,
            ))
        })
    }
}

/// A new instance of `cls`, made by `maker` (from [`instance_maker`] for this `cls`).
fn new_instance<'py>(cls: &Bound<'py, PyType>, maker: Maker) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let tp = cls.as_type_ptr();
    // SAFETY: `tp` points to a live type object (owned by `cls`) and `maker` holds one of its
    // own slots. `tp_alloc(tp, 0)` returns a new, zeroed instance (tracked by the collector for
    // a GC type, as `object.__new__` returns it) or NULL with an exception; `tp_new` is called
    // with that type, an empty argument tuple and no keywords, which is what `cls.__new__(cls)`
    // does, and returns a new reference or NULL with an exception set.
    unsafe {
        let obj = match maker {
            Maker::Alloc(alloc) => alloc(tp, 0),
            Maker::New(new) => new(tp, PyTuple::empty(py).as_ptr(), std::ptr::null_mut()),
        };
        Bound::from_owned_ptr_or_err(py, obj)
    }
}

struct DecTables {
    strings: DecodeTable<Py<PyString>>,
    /// Strings defined so far, when they come from a shared table ([`Opened::strings`]).
    shared_len: usize,
    templates: Vec<DecTemplate>,
}

struct Dec<'a, 't> {
    s: Reader<'a>,
    d: PayloadReader<'a>,
    t: &'t mut DecTables,
    /// The whole intern table of this body, from a decoder that read it to the end: a new
    /// string is taken from it (its payload skipped), not built again.
    shared: Option<&'a [Py<PyString>]>,
}

/// Sets an attribute with `object.__setattr__` semantics (bypassing the model's own
/// `__setattr__`, which would validate), as pydantic's `model_construct` does.
fn generic_setattr(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // SAFETY: all three pointers are valid, owned by live `Bound`s for the whole call;
    // PyObject_GenericSetAttr does not steal references and returns -1 with an exception set on
    // failure.
    let rc =
        unsafe { pyo3::ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    if rc < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

/// Sets a slot through its data descriptor's `tp_descr_set`: what `object.__setattr__` does
/// once its type lookup found that descriptor (see [`SlotAccess`]).
fn set_slot(obj: &Bound<'_, PyAny>, slot: &SlotAccess, value: &Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: `slot.set` is the `tp_descr_set` of `slot.descr`'s type (see `resolve_slots`),
    // called with that descriptor, a live instance of a class whose MRO resolves the name to
    // it, and a live value, as the interpreter calls it; it does not steal references and
    // returns -1 with an exception set on failure.
    let rc = unsafe { (slot.set)(slot.descr.as_ptr(), obj.as_ptr(), value.as_ptr()) };
    if rc < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

impl<'a> Dec<'a, '_> {
    fn string<'py>(&mut self, py: Python<'py>, tag: u8) -> DResult<Option<Bound<'py, PyString>>> {
        Ok(Some(match tag {
            TAG_STR_REF => {
                let i = self.s.varint("string reference")?;
                match self.shared {
                    Some(shared) => usize::try_from(i)
                        .ok()
                        .filter(|&i| i < self.t.shared_len)
                        .map(|i| shared[i].bind(py).clone())
                        .ok_or(CodecError::BadReference("string reference", i))?,
                    None => self.t.strings.get(i)?.bind(py).clone(),
                }
            }
            TAG_STR_NEW => match self.shared {
                Some(shared) => {
                    self.d.len_prefixed("string")?;
                    let s = shared
                        .get(self.t.shared_len)
                        .ok_or_else(|| corrupt("intern table overflow"))?;
                    self.t.shared_len += 1;
                    s.bind(py).clone()
                }
                None => {
                    let s = PyString::new(py, self.d.str("string")?);
                    self.t.strings.push(s.clone().unbind())?;
                    s
                }
            },
            TAG_STR_RAW => PyString::new(py, self.d.str("string")?),
            TAG_STR_SURROGATES => {
                let b = PyBytes::new(py, self.d.len_prefixed("string")?);
                PyString::from_encoded_object(&b, Some(c"utf-8"), Some(c"surrogatepass"))
                    .map_err(|_| CodecError::InvalidUtf8)?
            }
            _ => return Ok(None),
        }))
    }

    fn str_value<'py>(&mut self, py: Python<'py>, what: &str) -> DResult<Bound<'py, PyString>> {
        let tag = self.s.u8("tag")?;
        self.string(py, tag)?
            .ok_or_else(|| corrupt(format!("{what} is not a string (tag {tag})")))
    }

    fn value<'py>(&mut self, py: Python<'py>, depth: usize) -> DResult<Bound<'py, PyAny>> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep.into());
        }
        let tag = self.s.u8("tag")?;
        if let Some(s) = self.string(py, tag)? {
            return Ok(s.into_any());
        }
        Ok(match tag {
            TAG_NONE => py.None().into_bound(py),
            TAG_FALSE => PyBool::new(py, false).to_owned().into_any(),
            TAG_TRUE => PyBool::new(py, true).to_owned().into_any(),
            TAG_INT => PyInt::new(py, unzigzag(self.s.varint("int")?)).into_any(),
            TAG_BIGINT => BigInt::from_signed_bytes_le(self.d.len_prefixed("big int")?)
                .into_pyobject(py)?
                .into_any(),
            TAG_FLOAT => PyFloat::new(py, f64::from_bits(self.d.u64_le("float")?)).into_any(),
            TAG_BYTES => PyBytes::new(py, self.d.len_prefixed("bytes")?).into_any(),
            TAG_LIST | TAG_TUPLE => {
                let n = self
                    .s
                    .count(if tag == TAG_LIST { "list" } else { "tuple" }, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(py, depth + 1)?);
                }
                if tag == TAG_LIST {
                    PyList::new(py, items)?.into_any()
                } else {
                    PyTuple::new(py, items)?.into_any()
                }
            }
            TAG_DICT => self.dict_body(py, depth)?.into_any(),
            TAG_MODEL_DEF => {
                let name = self.str_value(py, "model name")?;
                let name = name.to_str().map_err(|_| CodecError::InvalidUtf8)?;
                let (cls, slots) = {
                    let reg = registry_read();
                    let cls = reg.by_name.get(name).map(|c| c.clone_ref(py));
                    let slots = cls.as_ref().and_then(|c| {
                        reg.by_type
                            .get(&(c.as_ptr() as usize))
                            .and_then(|(_, s)| s.clone())
                    });
                    (cls, slots)
                };
                let cls = cls.ok_or_else(|| {
                    corrupt(format!(
                        "unknown model class name {name:?} (not registered)"
                    ))
                })?;
                let n = self.s.count("model fields", 1)?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    fields.push(self.str_value(py, "field name")?.unbind());
                }
                let tid = self.t.templates.len();
                if tid >= codec::INTERN_MAX_ENTRIES {
                    return Err(corrupt("too many model templates"));
                }
                let base = PyDict::new(py);
                for f in &fields {
                    base.set_item(f.bind(py), py.None())?;
                }
                let maker = instance_maker(cls.bind(py))?;
                self.t.templates.push(DecTemplate {
                    maker,
                    cls,
                    slots,
                    prev: (0..n).map(|_| None).collect(),
                    base: (base.len() == n).then(|| base.unbind()),
                    stale: vec![false; n],
                    fields,
                    prev_fs: None,
                    seq: 0,
                });
                self.model_body(py, tid, depth)?
            }
            TAG_MODEL => {
                let id = self.s.varint("model template")?;
                if id >= self.t.templates.len() as u64 {
                    return Err(CodecError::BadReference("model template", id).into());
                }
                self.model_body(py, id as usize, depth)?
            }
            t => return Err(CodecError::UnknownTag(t).into()),
        })
    }

    fn dict_body<'py>(&mut self, py: Python<'py>, depth: usize) -> DResult<Bound<'py, PyDict>> {
        let n = self.s.count("dict", 2)?;
        let d = PyDict::new(py);
        for _ in 0..n {
            let k = self.value(py, depth + 1)?;
            let v = self.value(py, depth + 1)?;
            d.set_item(&k, v)
                .map_err(|e| corrupt(format!("invalid dict key: {e}")))?;
        }
        Ok(d)
    }

    fn model_body<'py>(
        &mut self,
        py: Python<'py>,
        tid: usize,
        depth: usize,
    ) -> DResult<Bound<'py, PyAny>> {
        let flags = self.s.u8("model flags")?;
        if flags & !INST_KNOWN_FLAGS != 0 {
            return Err(corrupt(format!("unknown model flags 0x{flags:02x}")));
        }
        let n = self.t.templates[tid].fields.len();
        let fields_set = if flags & INST_FIELDS_SET_SAME != 0 {
            let prev = self.t.templates[tid]
                .prev_fs
                .as_ref()
                .ok_or(CodecError::BadReference(
                    "previous fields set of template",
                    tid as u64,
                ))?;
            Some(copy_set(prev.bind(py))?)
        } else {
            None
        };
        let mask = self.s.bytes(mask_len(n), "same-field mask")?;
        let mut seq = {
            let t = &mut self.t.templates[tid];
            t.seq = t.seq.wrapping_add(1);
            t.seq
        };
        let base = self.t.templates[tid].base.as_ref().map(|b| b.clone_ref(py));
        // With a base, the copy already holds every unchanged field's value, as long as no
        // field's value held an instance of this template (`nested`), which updates `prev`.
        let dict = match &base {
            Some(b) => copy_dict(b.bind(py))?,
            None => PyDict::new(py),
        };
        let mut nested = base.is_none();
        let mut saw_nested = false;
        for i in 0..n {
            if mask_get(mask, i) {
                let t = &mut self.t.templates[tid];
                if nested || t.stale[i] {
                    let val = t.prev[i].as_ref().ok_or(CodecError::BadReference(
                        "previous value of field",
                        i as u64,
                    ))?;
                    let (field, val) = (t.fields[i].bind(py), val.bind(py));
                    dict.set_item(field, val)?;
                    if t.stale[i] {
                        // repeating now: the copies of the next instances will hold it
                        if let Some(b) = &base {
                            b.bind(py).set_item(field, val)?;
                        }
                        t.stale[i] = false;
                    }
                }
                continue;
            }
            let v = self.value(py, depth + 1)?;
            let t = &mut self.t.templates[tid];
            let field = t.fields[i].bind(py);
            dict.set_item(field, &v)?;
            if t.seq != seq {
                seq = t.seq;
                nested = true;
                saw_nested = true;
            }
            if is_scalar(&v) {
                t.stale[i] = base.is_some();
                t.prev[i] = Some(v.unbind());
            } else {
                t.prev[i] = None;
            }
        }
        let fields_set = match fields_set {
            Some(fs) => {
                if saw_nested {
                    // A nested instance replaced the previous fields set; the encoder's next
                    // reference is to this instance's.
                    self.t.templates[tid].prev_fs = Some(copy_set(&fs)?.unbind());
                }
                fs
            }
            None => {
                let fs_mask = self.s.bytes(mask_len(n), "fields-set mask")?;
                let fs = PySet::empty(py)?;
                for i in 0..n {
                    if mask_get(fs_mask, i) {
                        fs.add(self.t.templates[tid].fields[i].bind(py))?;
                    }
                }
                let others = self.s.count("fields-set names", 1)?;
                for _ in 0..others {
                    fs.add(self.str_value(py, "fields-set name")?)?;
                }
                self.t.templates[tid].prev_fs = Some(copy_set(&fs)?.unbind());
                fs
            }
        };
        let extra = if flags & INST_EXTRA_DICT != 0 {
            self.dict_body(py, depth)?.into_any()
        } else {
            py.None().into_bound(py)
        };
        let private = if flags & INST_PRIVATE_DICT != 0 {
            self.dict_body(py, depth)?.into_any()
        } else {
            py.None().into_bound(py)
        };
        // SAFETY: `fields_set` is a live set we own. Untracking is what CPython does for
        // containers of atomic values: its members are exact `str` (field names), so it is in
        // no reference cycle and the collector need not visit it (a model keeps 3 such sets per
        // OpenAI chunk alive; fewer tracked objects mean fewer, shorter full collections when
        // a consumer keeps every chunk). pydantic only ever adds field names to it; an object
        // that can form a cycle added later would only be invisible to the cycle collector.
        unsafe { pyo3::ffi::PyObject_GC_UnTrack(fields_set.as_ptr().cast()) };
        let t = &self.t.templates[tid];
        let obj = new_instance(t.cls.bind(py), t.maker)?;
        match &t.slots {
            Some(slots) => {
                set_slot(&obj, &slots[SLOT_DICT], &dict)?;
                set_slot(&obj, &slots[SLOT_FIELDS_SET], &fields_set)?;
                set_slot(&obj, &slots[SLOT_EXTRA], &extra)?;
                set_slot(&obj, &slots[SLOT_PRIVATE], &private)?;
            }
            None => {
                generic_setattr(&obj, intern!(py, "__dict__"), &dict)?;
                generic_setattr(&obj, intern!(py, "__pydantic_fields_set__"), &fields_set)?;
                generic_setattr(&obj, intern!(py, "__pydantic_extra__"), &extra)?;
                generic_setattr(&obj, intern!(py, "__pydantic_private__"), &private)?;
            }
        }
        Ok(obj)
    }
}

struct DecState {
    opened: Arc<Opened>,
    /// Strings come from `opened.strings` (set when this decoder began).
    shared: bool,
    s_pos: usize,
    s_end: usize,
    l_pos: usize,
    l_end: usize,
    d_pos: usize,
    remaining: u64,
    tables: DecTables,
    error: Option<String>,
}

impl DecState {
    fn take<'py>(&mut self, py: Python<'py>, n: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if let Some(msg) = &self.error {
            return Err(DecodeError::new_err(msg.clone()));
        }
        let k = (n as u64).min(self.remaining) as usize;
        let mut out = Vec::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let body = &self.opened.body[..];
        let mut dec = Dec {
            s: Reader::at(&body[..self.s_end], self.s_pos),
            d: PayloadReader {
                lengths: Reader::at(&body[..self.l_end], self.l_pos),
                data: Reader::at(body, self.d_pos),
            },
            t: &mut self.tables,
            shared: if self.shared {
                self.opened.strings.get().map(Vec::as_slice)
            } else {
                None
            },
        };
        let mut result: DResult<()> = Ok(());
        for _ in 0..k {
            match dec.value(py, 0) {
                Ok(v) => out.push(v),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let (s_pos, l_pos, d_pos) = (
            dec.s.position(),
            dec.d.lengths.position(),
            dec.d.data.position(),
        );
        let (s_left, d_left) = (dec.s.remaining(), dec.d.remaining());
        self.s_pos = s_pos;
        self.l_pos = l_pos;
        self.d_pos = d_pos;
        self.remaining -= out.len() as u64;
        if result.is_ok() && self.remaining == 0 && s_left + d_left != 0 {
            result = Err(CodecError::TrailingBytes(s_left + d_left).into());
        }
        if result.is_ok() && self.remaining == 0 && !self.shared {
            if let Some(&key) = self.opened.memo_key.get() {
                // Read to the end without an error: the table is this body's whole table,
                // which every later decoder of this remembered body can share (the first to
                // finish gives it; the memo counts its size).
                let strings = std::mem::take(&mut self.tables.strings).into_items();
                let size = strings
                    .iter()
                    .map(|s| STR_OVERHEAD + 4 * s.bind(py).len().unwrap_or(0))
                    .sum();
                if self.opened.strings.set(strings).is_ok() {
                    let gone = opened_memo().grow(key, &self.opened, size);
                    drop(gone);
                }
            }
        }
        match result {
            Ok(()) => Ok(out),
            Err(DErr::Codec(e)) => {
                let msg = e.to_string();
                self.error = Some(msg.clone());
                Err(DecodeError::new_err(msg))
            }
            Err(DErr::Py(e)) => {
                self.error = Some(format!("decoding failed: {e}"));
                Err(e)
            }
        }
    }
}

/// Lazily decodes compact bytes. The body is decompressed (at most `max_decoded_bytes`, default
/// 1 GiB, and at most 256x the compressed size plus 1 MiB) and validated whole up front, so a
/// corrupt entry raises `DecodeError` here; items are built only as `take`/iteration asks.
#[pyclass(frozen, module = "chengeta_ai._core")]
pub struct StreamDecoder {
    // Locking: `lock_py_attached` detaches while waiting; the holder may call into Python
    // (model construction, dict key hashing).
    state: Mutex<DecState>,
    sequence: bool,
    count: u64,
}

/// Whether `name` is a registered model class. Takes only the registry's Rust lock, so it may
/// run with the GIL released.
fn is_registered(name: &str) -> bool {
    registry_read().by_name.contains_key(name)
}

/// A decompressed and validated body: what every decoder of the same stored bytes starts from.
struct Opened {
    header: codec::Header,
    body: Vec<u8>,
    /// The body's intern table as Python strings, from the first decoder that read it to the
    /// end (strings are immutable: handing the same objects to every replay is invisible).
    strings: std::sync::OnceLock<Vec<Py<PyString>>>,
    /// Its key in [`IdentityMemo`], once remembered there (only then is `strings` set).
    memo_key: std::sync::OnceLock<(usize, usize)>,
    layout: codec::BodyLayout,
    /// Registry generation the body validated under.
    generation: u64,
}

/// Opens, decompresses and validates an encoding (pure Rust: safe without the GIL). An entry
/// of at least [`codec::MEMO_MIN_BYTES`] whose exact bytes validated before under the same
/// registry generation (BLAKE3 key, see [`codec::memo_key`]) is not walked again.
fn open_validated(data: &[u8], max_decoded: u64) -> Result<Opened, CodecError> {
    // The generation is read before validating. Registrations only ever add classes, so a
    // verdict reached while one raced with the walk stays true under the later registry too.
    let generation = REGISTRY_GENERATION.load(Ordering::SeqCst);
    let (header, body) = codec::open_with(data, max_decoded, codec::zstd_decompress)?;
    let layout = codec::split_body(&body, header.count)?;
    let opened = |body| Opened {
        header,
        body,
        strings: std::sync::OnceLock::new(),
        memo_key: std::sync::OnceLock::new(),
        layout: layout.clone(),
        generation,
    };
    if data.len() < codec::MEMO_MIN_BYTES {
        codec::validate(&body, &layout, header.count, is_registered)?;
        return Ok(opened(body));
    }
    let key = codec::memo_key(generation, data);
    let known = VALIDATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key);
    if !known {
        codec::validate(&body, &layout, header.count, is_registered)?;
        VALIDATED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
    }
    Ok(opened(body))
}

/// Most stored `bytes` objects [`IdentityMemo`] keeps opened.
pub const IDENTITY_MEMO_ENTRIES: usize = 256;
/// Most bytes [`IdentityMemo`] keeps alive (stored bytes + decompressed bodies); a larger entry
/// is never remembered.
pub const IDENTITY_MEMO_BYTES: usize = 32 << 20;

struct Remembered {
    /// The stored bytes, held (never read): while remembered, no other object can have its
    /// address, and a `bytes` object never changes, so its check and decompression stay true.
    _data: Py<PyBytes>,
    opened: Arc<Opened>,
    cost: usize,
}

/// Opened bodies by the identity of the stored `bytes` object (and the payload's offset in it)
/// that a caller vouches will be handed back again (an in-process backend returns the object it
/// stores): its next decoder skips the hash, the decompression and the walk. Bounded by
/// [`IDENTITY_MEMO_ENTRIES`] and [`IDENTITY_MEMO_BYTES`]; the oldest is forgotten first.
#[derive(Default)]
struct IdentityMemo {
    map: HashMap<(usize, usize), Remembered, BuildHasherDefault<FxHasher>>,
    order: std::collections::VecDeque<(usize, usize)>,
    bytes: usize,
}

impl IdentityMemo {
    /// Inserts, returning what had to be forgotten (dropped by the caller after the lock).
    fn insert(&mut self, key: (usize, usize), r: Remembered) -> Vec<Remembered> {
        let mut gone = Vec::new();
        if r.cost > IDENTITY_MEMO_BYTES {
            gone.push(r);
            return gone;
        }
        self.bytes += r.cost;
        if let Some(old) = self.map.insert(key, r) {
            self.bytes -= old.cost;
            gone.push(old);
        } else {
            self.order.push_back(key);
        }
        while self.map.len() > IDENTITY_MEMO_ENTRIES || self.bytes > IDENTITY_MEMO_BYTES {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.cost;
                gone.push(old);
            }
        }
        gone
    }

    /// Counts `extra` more bytes for `key` if it still holds `opened` (its shared strings),
    /// forgetting the oldest entries (this one included) beyond the bounds.
    fn grow(&mut self, key: (usize, usize), opened: &Arc<Opened>, extra: usize) -> Vec<Remembered> {
        match self.map.get_mut(&key) {
            Some(r) if Arc::ptr_eq(&r.opened, opened) => {
                r.cost += extra;
                self.bytes += extra;
            }
            _ => return Vec::new(),
        }
        let mut gone = Vec::new();
        while self.bytes > IDENTITY_MEMO_BYTES {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.cost;
                gone.push(old);
            }
        }
        gone
    }
}

/// What a shared string is counted as besides 4 bytes per character (CPython's `str` header
/// with its hash and, for non-ASCII text, a UTF-8 copy; an estimate that errs high).
const STR_OVERHEAD: usize = 80;

// Locking: held only for a map lookup, insertion or eviction (reference counts change under
// it, but evicted objects are dropped after it is released), never across a call into Python.
static OPENED: LazyLock<Mutex<IdentityMemo>> = LazyLock::new(Default::default);

fn opened_memo() -> std::sync::MutexGuard<'static, IdentityMemo> {
    OPENED.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_decoder(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    offset: usize,
    max_decoded: Option<u64>,
    remember: bool,
) -> PyResult<StreamDecoder> {
    let max_decoded = max_decoded.unwrap_or(codec::DEFAULT_MAX_DECODED_BYTES);
    let backed: PyBackedBytes = data.extract()?;
    if offset > backed.len() {
        return Err(PyValueError::new_err(format!(
            "offset {offset} is beyond the {} bytes of data",
            backed.len()
        )));
    }
    let payload = &backed[offset..];
    // Only an exact `bytes` object is immutable (a bytearray could change under its address).
    let key = (remember && data.is_exact_instance_of::<PyBytes>())
        .then(|| (data.as_ptr() as usize, offset));
    let known = key.and_then(|k| {
        let memo = opened_memo();
        let r = memo.map.get(&k)?;
        let o = &r.opened;
        // Valid under this registry, and within this caller's cap as a fresh open would be.
        let fits =
            o.header.body_len <= codec::body_limit(payload.len(), o.header.compressed, max_decoded);
        (o.generation == REGISTRY_GENERATION.load(Ordering::SeqCst) && fits).then(|| Arc::clone(o))
    });
    let opened = match known {
        Some(o) => o,
        None => {
            // One detach covers decompression and validation; small entries keep the GIL
            // (re-taking it can cost a switch interval when other threads are busy).
            let opened = if payload.len() >= DETACH_MIN_BYTES / 4 {
                py.detach(|| open_validated(payload, max_decoded))
            } else {
                open_validated(payload, max_decoded)
            };
            let opened = Arc::new(opened.map_err(|e| DecodeError::new_err(e.to_string()))?);
            if let (Some(k), true) = (key, payload.len() >= codec::MEMO_MIN_BYTES) {
                let _ = opened.memo_key.set(k);
                let r = Remembered {
                    _data: data.cast::<PyBytes>()?.clone().unbind(),
                    opened: Arc::clone(&opened),
                    cost: backed.len() + opened.body.len(),
                };
                let gone = opened_memo().insert(k, r);
                drop(gone);
            }
            opened
        }
    };
    let layout = opened.layout.clone();
    let (sequence, count) = (opened.header.sequence, opened.header.count);
    Ok(StreamDecoder {
        state: Mutex::new(DecState {
            s_pos: layout.structure.start,
            s_end: layout.structure.end,
            l_pos: layout.lengths.start,
            l_end: layout.lengths.end,
            d_pos: layout.data,
            remaining: opened.header.count,
            shared: opened.strings.get().is_some(),
            tables: DecTables {
                strings: DecodeTable::new(),
                shared_len: 0,
                templates: Vec::new(),
            },
            error: None,
            opened,
        }),
        sequence,
        count,
    })
}

#[pymethods]
impl StreamDecoder {
    #[new]
    #[pyo3(signature = (data, *, offset = 0, max_decoded_bytes = None, remember = false))]
    fn new(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        offset: usize,
        max_decoded_bytes: Option<u64>,
        remember: bool,
    ) -> PyResult<Self> {
        open_decoder(py, data, offset, max_decoded_bytes, remember)
    }

    /// True for `StreamEncoder` output, False for `encode()` output.
    #[getter]
    fn is_sequence(&self) -> bool {
        self.sequence
    }

    /// Number of items (1 for a single value).
    #[getter]
    fn count(&self) -> u64 {
        self.count
    }

    /// Items not yet decoded.
    #[getter]
    fn remaining(&self, py: Python<'_>) -> u64 {
        self.state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .remaining
    }

    /// The next up to `n` decoded items; `[]` at the end. Raises `DecodeError` on corrupt data.
    fn take<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .take(py, n)?;
        PyList::new(py, items)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mut items = self
            .state
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .take(py, 1)?;
        Ok(items.pop())
    }
}

/// Decodes compact bytes: a single value, or the list of items of a sequence. The decoded body
/// is bounded by `max_decoded_bytes` (default 1 GiB) as in `StreamDecoder`.
#[pyfunction]
#[pyo3(signature = (data, *, max_decoded_bytes = None))]
fn decode<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    max_decoded_bytes: Option<u64>,
) -> PyResult<Bound<'py, PyAny>> {
    let dec = open_decoder(py, data, 0, max_decoded_bytes, false)?;
    let mut st = dec.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut items = st.take(py, usize::MAX)?;
    if dec.sequence {
        Ok(PyList::new(py, items)?.into_any())
    } else {
        items
            .pop()
            .ok_or_else(|| DecodeError::new_err("empty single-value encoding"))
    }
}

/// Adds the codec's functions and classes to `chengeta_ai._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(register_model, m)?)?;
    m.add_function(wrap_pyfunction!(registered_models, m)?)?;
    m.add_function(wrap_pyfunction!(set_discovery_hook, m)?)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_class::<StreamEncoder>()?;
    m.add_class::<StreamDecoder>()?;
    Ok(())
}

//! `AttrReader`: one attribute of one Python object, read once per chunk without the generic
//! attribute lookup (the type's method-resolution lookup, then the instance's), so that a
//! value the Python side changes at any moment is still read at every chunk, cheaply.

use std::os::raw::c_void;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyType};
use pyo3::{ffi, intern, PyTraverseError, PyVisit};

/// Where the attribute is read from, decided once from the object's type.
enum Source {
    /// The instance's `__dict__` (nothing on the type takes precedence over it).
    Dict(Py<PyDict>),
    /// A `__slots__` member, through its descriptor's `__get__`.
    Member {
        descr: Py<PyAny>,
        get: ffi::descrgetfunc,
    },
    /// Anything else: `getattr`.
    Generic,
}

/// Reads `obj.<name>` as `getattr` would, for a plain object.
///
/// For an instance of a class with the generic attribute lookup (no `__getattribute__` or
/// `__getattr__` of its own), the source is chosen once: a `__slots__` member is read through
/// its descriptor; an attribute nothing on the class overrides with a data descriptor is read
/// from the instance's `__dict__` (the object the interpreter itself writes `obj.name = v`
/// into), falling back to `getattr` when it is missing there. Every read sees the latest
/// value written by any thread. Anything else, or an object whose class was changed since
/// (`obj.__class__ = ...`), is read with `getattr`. Not supported: replacing the instance's
/// `__dict__` or the class's attributes after the reader was made (nothing in the package
/// does either to the objects it reads this way: flights and their states).
pub(crate) struct AttrReader {
    obj: Py<PyAny>,
    ty: Py<PyType>,
    name: Py<PyString>,
    source: Source,
}

impl AttrReader {
    pub(crate) fn new(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>) -> PyResult<Self> {
        let ty = obj.get_type();
        let source = plan(obj, &ty, name)?;
        Ok(AttrReader {
            obj: obj.clone().unbind(),
            ty: ty.unbind(),
            name: name.clone().unbind(),
            source,
        })
    }

    /// `getattr(obj, name)`.
    #[inline]
    pub(crate) fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let obj = self.obj.bind(py);
        if obj.get_type().as_ptr() == self.ty.as_ptr() {
            match &self.source {
                Source::Dict(dict) => {
                    if let Some(value) = dict.bind(py).get_item(self.name.bind(py))? {
                        return Ok(value);
                    }
                }
                Source::Member { descr, get } => {
                    // SAFETY: `get` is the tp_descr_get slot of `descr`'s type (a member
                    // descriptor of `ty`), called with live objects as `getattr` would; it
                    // returns a new reference or NULL with an exception (unset slot).
                    let value =
                        unsafe { get(descr.as_ptr(), obj.as_ptr(), self.ty.as_ptr().cast()) };
                    return unsafe { Bound::from_owned_ptr_or_err(py, value) };
                }
                Source::Generic => {}
            }
        }
        obj.getattr(self.name.bind(py))
    }

    /// The references the garbage collector must see (the reader's owner's `__traverse__`).
    pub(crate) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.obj)?;
        visit.call(&self.ty)?;
        match &self.source {
            Source::Dict(dict) => visit.call(dict),
            Source::Member { descr, .. } => visit.call(descr),
            Source::Generic => Ok(()),
        }
    }
}

/// Where `obj.<name>` comes from under the generic lookup (`PyObject_GenericGetAttr`).
fn plan(
    obj: &Bound<'_, PyAny>,
    ty: &Bound<'_, PyType>,
    name: &Bound<'_, PyString>,
) -> PyResult<Source> {
    let py = obj.py();
    // SAFETY: PyType_GetSlot reads a slot of a live type object (static types too, 3.10+).
    let getattro = unsafe { ffi::PyType_GetSlot(ty.as_type_ptr(), ffi::Py_tp_getattro) };
    if getattro != ffi::PyObject_GenericGetAttr as *mut c_void {
        return Ok(Source::Generic); // `__getattribute__` / `__getattr__` of its own
    }
    // the first definition along the MRO, as the interpreter's lookup finds it
    let mut found = None;
    for base in ty.mro().iter() {
        let namespace = base.getattr(intern!(py, "__dict__"))?;
        if namespace.contains(name)? {
            found = Some(namespace.get_item(name)?);
            break;
        }
    }
    if let Some(attr) = found {
        let attr_type = attr.get_type();
        let member_type = py
            .import(intern!(py, "types"))?
            .getattr(intern!(py, "MemberDescriptorType"))?;
        if attr_type.is(&member_type) {
            // SAFETY: as above; a member descriptor's type always has tp_descr_get.
            let slot =
                unsafe { ffi::PyType_GetSlot(attr_type.as_type_ptr(), ffi::Py_tp_descr_get) };
            if slot.is_null() {
                return Ok(Source::Generic);
            }
            // SAFETY: the tp_descr_get slot has the descrgetfunc signature.
            let get: ffi::descrgetfunc = unsafe { std::mem::transmute(slot) };
            return Ok(Source::Member {
                descr: attr.unbind(),
                get,
            });
        }
        if attr_type.hasattr(intern!(py, "__set__"))?
            || attr_type.hasattr(intern!(py, "__delete__"))?
        {
            return Ok(Source::Generic); // a data descriptor (a property) wins over the instance
        }
    }
    match obj.getattr(intern!(py, "__dict__")) {
        Ok(dict) => match dict.cast_into::<PyDict>() {
            Ok(dict) => Ok(Source::Dict(dict.unbind())),
            Err(_) => Ok(Source::Generic),
        },
        Err(_) => Ok(Source::Generic), // no instance dict
    }
}

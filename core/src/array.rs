//! n-dimensional arrays as hypha-rpc carries them (`_rtype: "ndarray"`, spec §5.2):
//! raw C-order little-endian bytes, a shape and a numpy dtype string.
//!
//! [`NdArray::from_array`], [`NdArray::view`] and [`NdArray::to_array`] convert to and
//! from `ndarray` arrays of any [`Element`] type, without copying the elements where the
//! memory layout allows (see the comment above [`Element`] for when that is).

use bytes::Bytes;
use ndarray::{Array, Array1, ArrayD, ArrayView, CowArray, Dimension, Ix1, IxDyn};
use num_complex::Complex;

use crate::value::TypedArray;

/// A numpy dtype, as `str(dtype)` names it on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// `bool` (one byte per element, 0 or 1).
    Bool,
    /// `int8`.
    Int8,
    /// `int16`.
    Int16,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `uint8`.
    UInt8,
    /// `uint16`.
    UInt16,
    /// `uint32`.
    UInt32,
    /// `uint64`.
    UInt64,
    /// `float16`: carried through as bytes; Rust has no native element type for it.
    Float16,
    /// `float32`.
    Float32,
    /// `float64`.
    Float64,
    /// `complex64`: pairs of float32 (re, im).
    Complex64,
    /// `complex128`: pairs of float64 (re, im).
    Complex128,
    /// Any other dtype string numpy sends (`<U5`, `datetime64[ns]`, ...). Kept verbatim so
    /// that forwarding is lossless; converting it to an `ndarray` is a typed error.
    Other(String),
}

impl DType {
    /// Parses a dtype string. Never fails: unknown strings become [`DType::Other`].
    pub fn parse(s: &str) -> DType {
        match s {
            "bool" => DType::Bool,
            "int8" => DType::Int8,
            "int16" => DType::Int16,
            "int32" => DType::Int32,
            "int64" => DType::Int64,
            "uint8" => DType::UInt8,
            "uint16" => DType::UInt16,
            "uint32" => DType::UInt32,
            "uint64" => DType::UInt64,
            "float16" => DType::Float16,
            "float32" => DType::Float32,
            "float64" => DType::Float64,
            "complex64" => DType::Complex64,
            "complex128" => DType::Complex128,
            other => DType::Other(other.to_owned()),
        }
    }

    /// The wire name (`str(dtype)` in numpy).
    pub fn as_str(&self) -> &str {
        match self {
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::UInt8 => "uint8",
            DType::UInt16 => "uint16",
            DType::UInt32 => "uint32",
            DType::UInt64 => "uint64",
            DType::Float16 => "float16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Complex64 => "complex64",
            DType::Complex128 => "complex128",
            DType::Other(s) => s,
        }
    }

    /// Bytes per element, when the dtype has a fixed size we know.
    pub fn item_size(&self) -> Option<usize> {
        Some(match self {
            DType::Bool | DType::Int8 | DType::UInt8 => 1,
            DType::Int16 | DType::UInt16 | DType::Float16 => 2,
            DType::Int32 | DType::UInt32 | DType::Float32 => 4,
            DType::Int64 | DType::UInt64 | DType::Float64 | DType::Complex64 => 8,
            DType::Complex128 => 16,
            DType::Other(_) => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An n-dimensional array in wire form: C order, little-endian elements.
///
/// `data` is usually a slice of the received frame, so holding an `NdArray` keeps that
/// frame alive; convert to an owned `ndarray::ArrayD` if you need to release it.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    /// Element type.
    pub dtype: DType,
    /// Shape; `[]` is a numpy scalar (one element).
    pub shape: Vec<usize>,
    /// The elements, C order, little-endian.
    pub data: Bytes,
}

impl NdArray {
    /// Number of elements (`product(shape)`, 1 for a scalar), or `None` on overflow.
    pub fn len(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Checks that `data` holds exactly `len * item_size` bytes (when the dtype size is
    /// known). A peer that lies about the shape gets an error, not an out-of-bounds view.
    pub fn check_layout(&self) -> Result<(), ArrayError> {
        let Some(item) = self.dtype.item_size() else { return Ok(()) };
        let expected = self.len().and_then(|n| n.checked_mul(item)).ok_or(ArrayError::ShapeOverflow)?;
        if expected != self.data.len() {
            return Err(ArrayError::SizeMismatch {
                dtype: self.dtype.to_string(),
                shape: self.shape.clone(),
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }
}

/// Errors about array layout and conversion.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ArrayError {
    /// `product(shape) * item_size` does not fit in `usize`.
    #[error("ndarray shape overflows the address space")]
    ShapeOverflow,
    /// The byte length does not match shape and dtype.
    #[error("ndarray of dtype {dtype} and shape {shape:?} needs {expected} bytes, got {actual}")]
    SizeMismatch {
        /// dtype name
        dtype: String,
        /// declared shape
        shape: Vec<usize>,
        /// bytes the shape implies
        expected: usize,
        /// bytes present
        actual: usize,
    },
    /// The dtype has no Rust element type (e.g. `<U5`, `float16`).
    #[error("unsupported ndarray dtype {0:?}")]
    UnsupportedDtype(String),
    /// The array's dtype is not the one the caller asked for.
    #[error("ndarray dtype mismatch: array is {actual}, requested {requested}")]
    DtypeMismatch {
        /// dtype of the array
        actual: String,
        /// dtype of the requested element type
        requested: String,
    },
    /// A `bool` array holds a byte other than 0 or 1. numpy never produces one, so the
    /// payload is corrupt or mislabelled; Rust's `bool` cannot represent it.
    #[error("bool ndarray holds byte {byte:#04x} at element {index} (only 0 and 1 are valid)")]
    InvalidBool {
        /// element index (C order) of the first bad byte
        index: usize,
        /// the byte found there
        byte: u8,
    },
    /// `ndarray` refused the shape (e.g. more than `isize::MAX` elements).
    #[error("invalid ndarray shape: {0}")]
    InvalidShape(String),
}

// ---------------------------------------------------------------------------------------
// Conversions with `ndarray`
// ---------------------------------------------------------------------------------------
//
// The wire layout (C order, little-endian, elements back to back) is exactly the memory
// layout of a standard-layout `ndarray::Array<T, _>` of a primitive `T` on a
// little-endian host. So both directions can usually avoid copying the elements:
//
// * sending: the array's `Vec<T>` becomes the owner of a `Bytes` (`Bytes::from_owner`),
//   so the encoder writes straight from the buffer the user filled;
// * receiving: `data` is a slice of the received frame; if it happens to be aligned for
//   `T` we hand out a borrowed view of it. msgpack puts a `bin` payload wherever the
//   preceding bytes end, so misalignment is common: then we copy once into an aligned
//   `Vec<T>`. Callers see a `CowArray` either way.
//
// Big-endian hosts always take the copy path, with a byte swap.

/// Element types that can travel in an [`NdArray`]: the numpy dtypes that have an exact
/// Rust counterpart.
///
/// Sealed: the conversions rely on each type's byte layout, which we vouch for only for
/// the types listed here (`i8`..`i64`, `u8`..`u64`, `f32`, `f64`, `bool`,
/// `Complex<f32>` = `complex64`, `Complex<f64>` = `complex128`). `float16` and the
/// numpy dtypes in [`DType::Other`] have no element type; converting them is
/// [`ArrayError::UnsupportedDtype`].
pub trait Element: sealed::Sealed {
    /// The numpy dtype this type is sent as.
    const DTYPE: DType;
}

mod sealed {
    use super::ArrayError;
    use bytes::Bytes;

    /// The byte-level operations behind [`super::Element`]. Private so that the set of
    /// element types stays closed.
    pub trait Sealed: Copy + Send + Sync + 'static {
        /// Bytes per element on the wire.
        const SIZE: usize;
        /// Takes ownership of elements and exposes them as wire bytes, without copying
        /// when the in-memory layout already is the wire layout.
        fn vec_into_bytes(v: Vec<Self>) -> Bytes;
        /// Appends the wire form of `s` to `out` (one copy).
        fn extend_wire(s: &[Self], out: &mut Vec<u8>);
        /// Reinterprets wire bytes as elements without copying, when this host, the
        /// type and the alignment of `bytes` allow it. `None` means "copy instead".
        fn try_borrow(bytes: &[u8]) -> Option<&[Self]>;
        /// Decodes wire bytes into elements (one copy). `bytes.len()` is a multiple of
        /// `SIZE` (checked by the caller).
        fn decode(bytes: &[u8]) -> Result<Vec<Self>, ArrayError>;
    }
}

/// A `Vec` that a `Bytes` owns: keeps the allocation and exposes it as bytes.
struct VecOwner<T>(Vec<T>);

impl<T: bytemuck::NoUninit> AsRef<[u8]> for VecOwner<T> {
    fn as_ref(&self) -> &[u8] {
        // T -> u8 never fails: u8 has alignment 1 and every size is a multiple of 1.
        bytemuck::cast_slice(&self.0)
    }
}

/// Primitive numbers with a fixed little-endian encoding; complex numbers are pairs.
trait Prim: Copy {
    const SIZE: usize;
    fn put_le(self, out: &mut Vec<u8>);
    /// `b.len() == SIZE` is guaranteed by the callers (`chunks_exact`).
    fn get_le(b: &[u8]) -> Self;
}

macro_rules! prim_element {
    ($($t:ty => $dtype:ident),* $(,)?) => {$(
        impl Prim for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }

        impl sealed::Sealed for $t {
            const SIZE: usize = std::mem::size_of::<$t>();

            fn vec_into_bytes(v: Vec<Self>) -> Bytes {
                if cfg!(target_endian = "little") {
                    Bytes::from_owner(VecOwner(v))
                } else {
                    let mut out = Vec::with_capacity(v.len() * <Self as sealed::Sealed>::SIZE);
                    Self::extend_wire(&v, &mut out);
                    Bytes::from(out)
                }
            }

            fn extend_wire(s: &[Self], out: &mut Vec<u8>) {
                if cfg!(target_endian = "little") {
                    out.extend_from_slice(bytemuck::cast_slice(s));
                } else {
                    out.reserve(s.len() * <Self as sealed::Sealed>::SIZE);
                    s.iter().for_each(|x| x.put_le(out));
                }
            }

            fn try_borrow(bytes: &[u8]) -> Option<&[Self]> {
                if cfg!(target_endian = "little") {
                    bytemuck::try_cast_slice(bytes).ok()
                } else {
                    None
                }
            }

            fn decode(bytes: &[u8]) -> Result<Vec<Self>, ArrayError> {
                if cfg!(target_endian = "little") {
                    // Copies into a fresh, aligned allocation whatever `bytes`' alignment.
                    let mut v = vec![<$t>::default(); bytes.len() / <Self as Prim>::SIZE];
                    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
                    match dst.len() == bytes.len() {
                        true => dst.copy_from_slice(bytes),
                        false => return Err(ArrayError::InvalidShape("partial element".into())),
                    }
                    Ok(v)
                } else {
                    Ok(bytes.chunks_exact(<Self as Prim>::SIZE).map(<$t>::get_le).collect())
                }
            }
        }

        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
        }
    )*};
}

prim_element!(
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    u8 => UInt8, u16 => UInt16, u32 => UInt32, u64 => UInt64,
    f32 => Float32, f64 => Float64,
);

// Complex numbers are numpy's (re, im) pairs, which is exactly `num_complex::Complex`'s
// `repr(C)` layout; with num-complex's `bytemuck` feature it is `Pod`, so on little-endian
// hosts complex arrays move and borrow without copies like the real types.
macro_rules! complex_element {
    ($($t:ty => $dtype:ident),* $(,)?) => {$(
        impl sealed::Sealed for Complex<$t> {
            const SIZE: usize = 2 * <$t as Prim>::SIZE;

            fn vec_into_bytes(v: Vec<Self>) -> Bytes {
                if cfg!(target_endian = "little") {
                    Bytes::from_owner(VecOwner(v))
                } else {
                    let mut out = Vec::with_capacity(v.len() * <Self as sealed::Sealed>::SIZE);
                    Self::extend_wire(&v, &mut out);
                    Bytes::from(out)
                }
            }

            fn extend_wire(s: &[Self], out: &mut Vec<u8>) {
                if cfg!(target_endian = "little") {
                    out.extend_from_slice(bytemuck::cast_slice(s));
                } else {
                    out.reserve(s.len() * <Self as sealed::Sealed>::SIZE);
                    for c in s {
                        c.re.put_le(out);
                        c.im.put_le(out);
                    }
                }
            }

            fn try_borrow(bytes: &[u8]) -> Option<&[Self]> {
                if cfg!(target_endian = "little") {
                    bytemuck::try_cast_slice(bytes).ok()
                } else {
                    None
                }
            }

            fn decode(bytes: &[u8]) -> Result<Vec<Self>, ArrayError> {
                let half = <$t as Prim>::SIZE;
                Ok(bytes
                    .chunks_exact(2 * half)
                    .map(|c| {
                        let (re, im) = c.split_at(half);
                        Complex::new(<$t>::get_le(re), <$t>::get_le(im))
                    })
                    .collect())
            }
        }

        impl Element for Complex<$t> {
            const DTYPE: DType = DType::$dtype;
        }
    )*};
}

complex_element!(f32 => Complex64, f64 => Complex128);

// numpy's bool is one byte, 0 or 1: the same as Rust's `bool`, except that Rust must
// never see any other byte in a `bool`. Sending reinterprets (bool -> u8 is always
// valid, so no copy); receiving validates every byte first (bytemuck's checked cast),
// and reports the first bad byte as a typed error.
impl sealed::Sealed for bool {
    const SIZE: usize = 1;

    fn vec_into_bytes(v: Vec<Self>) -> Bytes {
        Bytes::from_owner(VecOwner(v))
    }

    fn extend_wire(s: &[Self], out: &mut Vec<u8>) {
        out.extend(s.iter().map(|&b| u8::from(b)));
    }

    fn try_borrow(bytes: &[u8]) -> Option<&[Self]> {
        bytemuck::checked::try_cast_slice(bytes).ok()
    }

    fn decode(bytes: &[u8]) -> Result<Vec<Self>, ArrayError> {
        bytes
            .iter()
            .enumerate()
            .map(|(index, &byte)| match byte {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(ArrayError::InvalidBool { index, byte }),
            })
            .collect()
    }
}

impl Element for bool {
    const DTYPE: DType = DType::Bool;
}

/// Checks that `dtype` is the dtype of `T`, naming unsupported dtypes separately so that
/// a caller can tell "wrong type requested" from "no Rust type exists".
fn check_dtype<T: Element>(dtype: &DType) -> Result<(), ArrayError> {
    match dtype {
        DType::Float16 | DType::Other(_) => Err(ArrayError::UnsupportedDtype(dtype.to_string())),
        d if *d == T::DTYPE => Ok(()),
        d => Err(ArrayError::DtypeMismatch { actual: d.to_string(), requested: T::DTYPE.to_string() }),
    }
}

/// Borrows `data` as `shape` elements of `T` when possible, else decodes a copy. The
/// caller has checked dtype and byte length.
fn cow_from_bytes<'a, T: Element, D: Dimension>(
    shape: D,
    data: &'a [u8],
) -> Result<CowArray<'a, T, D>, ArrayError> {
    let shape_err = |e: ndarray::ShapeError| ArrayError::InvalidShape(e.to_string());
    if let Some(slice) = T::try_borrow(data) {
        return Ok(CowArray::from(ArrayView::from_shape(shape, slice).map_err(shape_err)?));
    }
    let elems = T::decode(data)?;
    Ok(CowArray::from(Array::from_shape_vec(shape, elems).map_err(shape_err)?))
}

impl NdArray {
    /// Wraps an owned `ndarray` array for sending, without copying its elements when
    /// the array is in standard (C) layout on a little-endian host: the array's buffer
    /// becomes the owner of `data`. Other layouts (transposed, strided) are copied once
    /// into C order.
    pub fn from_array<T: Element, D: Dimension>(a: Array<T, D>) -> NdArray {
        let shape = a.shape().to_vec();
        let len = a.len();
        if !a.is_standard_layout() {
            return Self::from_view(a.view());
        }
        let (vec, offset) = a.into_raw_vec_and_offset();
        let start = offset.unwrap_or(0).saturating_mul(T::SIZE);
        let end = start.saturating_add(len.saturating_mul(T::SIZE));
        let all = T::vec_into_bytes(vec);
        // A standard-layout array occupies `len` consecutive elements from `offset` (a
        // sliced array may own more); the check only guards that ndarray invariant.
        let data = if end <= all.len() { all.slice(start..end) } else { Bytes::new() };
        NdArray { dtype: T::DTYPE, shape, data }
    }

    /// Copies a borrowed array (any layout) into a new `NdArray`, in C order. Use
    /// [`NdArray::from_array`] when you can give the array away: it avoids the copy.
    pub fn from_view<T: Element, D: Dimension>(a: ArrayView<'_, T, D>) -> NdArray {
        let mut out = Vec::with_capacity(a.len() * T::SIZE);
        match a.as_slice() {
            Some(s) => T::extend_wire(s, &mut out),
            // `iter` walks in logical C order whatever the strides are.
            None => a.iter().for_each(|x| T::extend_wire(std::slice::from_ref(x), &mut out)),
        }
        NdArray { dtype: T::DTYPE, shape: a.shape().to_vec(), data: Bytes::from(out) }
    }

    /// Copies a slice into a 1-D `NdArray` (shape `[len]`).
    pub fn from_slice<T: Element>(s: &[T]) -> NdArray {
        let mut out = Vec::with_capacity(std::mem::size_of_val(s));
        T::extend_wire(s, &mut out);
        NdArray { dtype: T::DTYPE, shape: vec![s.len()], data: Bytes::from(out) }
    }

    /// Views the elements as an `ndarray` array of `T`.
    ///
    /// Borrows `data` (no copy) when it is suitably aligned for `T` on a little-endian
    /// host, which is the case for arrays built with [`NdArray::from_array`]. Arrays
    /// received from a peer usually sit at an arbitrary offset in the frame, so
    /// expect an owned copy for multi-byte element types; `CowArray` hides the
    /// difference. `bool` data is validated byte by byte (0/1 only).
    ///
    /// Errors: `dtype` is not `T`'s ([`ArrayError::DtypeMismatch`]) or has no Rust type
    /// ([`ArrayError::UnsupportedDtype`]); the byte length disagrees with the shape
    /// ([`ArrayError::SizeMismatch`], checked before anything is allocated).
    pub fn view<T: Element>(&self) -> Result<CowArray<'_, T, IxDyn>, ArrayError> {
        check_dtype::<T>(&self.dtype)?;
        self.check_layout()?;
        cow_from_bytes(IxDyn(&self.shape), &self.data)
    }

    /// Converts to an owned `ndarray` array (a copy unless [`NdArray::view`] had to copy
    /// anyway). Use it to release the received frame that `data` points into.
    pub fn to_array<T: Element>(&self) -> Result<ArrayD<T>, ArrayError> {
        Ok(self.view::<T>()?.into_owned())
    }
}

impl TypedArray {
    /// The dtypes a JS peer can turn into a TypedArray (spec §5.2). Others would reach
    /// JS as an unreadable map, so building one is refused.
    const JS_DTYPES: [DType; 8] = [
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::UInt8,
        DType::UInt16,
        DType::UInt32,
        DType::Float32,
        DType::Float64,
    ];

    /// Wraps a 1-D array for a JS peer, without copying in C layout (see
    /// [`NdArray::from_array`]). Errors with [`ArrayError::UnsupportedDtype`] for
    /// element types JS has no TypedArray for here (64-bit ints, bool, complex).
    pub fn from_array1<T: Element>(a: Array1<T>) -> Result<TypedArray, ArrayError> {
        if !Self::JS_DTYPES.contains(&T::DTYPE) {
            return Err(ArrayError::UnsupportedDtype(T::DTYPE.to_string()));
        }
        let nd = NdArray::from_array(a);
        Ok(TypedArray { dtype: nd.dtype, data: nd.data })
    }

    /// Views the elements as a 1-D array; borrowing and errors as in [`NdArray::view`]
    /// (a byte length that is not a multiple of the element size is a size mismatch).
    pub fn view<T: Element>(&self) -> Result<CowArray<'_, T, Ix1>, ArrayError> {
        check_dtype::<T>(&self.dtype)?;
        let len = self.data.len() / T::SIZE;
        if len * T::SIZE != self.data.len() {
            return Err(ArrayError::SizeMismatch {
                dtype: self.dtype.to_string(),
                shape: vec![len],
                expected: len * T::SIZE,
                actual: self.data.len(),
            });
        }
        cow_from_bytes(Ix1(len), &self.data)
    }

    /// Converts to an owned 1-D array.
    pub fn to_array1<T: Element>(&self) -> Result<Array1<T>, ArrayError> {
        Ok(self.view::<T>()?.into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for s in [
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "float16",
            "float32",
            "float64",
            "complex64",
            "complex128",
            "<U5",
        ] {
            assert_eq!(DType::parse(s).as_str(), s);
        }
        assert_eq!(DType::parse("<U5"), DType::Other("<U5".into()));
    }

    #[test]
    fn layout_is_checked() {
        let a = NdArray { dtype: DType::Float32, shape: vec![2, 3], data: Bytes::from(vec![0u8; 24]) };
        assert!(a.check_layout().is_ok());
        let b = NdArray { data: Bytes::from(vec![0u8; 23]), ..a.clone() };
        assert!(matches!(b.check_layout(), Err(ArrayError::SizeMismatch { .. })));
        let c = NdArray { shape: vec![usize::MAX, 2], ..a };
        assert_eq!(c.check_layout(), Err(ArrayError::ShapeOverflow));
    }
}

#[cfg(test)]
mod conversion_tests {
    use super::*;
    use ndarray::{arr0, array, Array3, ShapeBuilder};
    use proptest::prelude::*;

    /// Round trip through `from_array` (owned) and `from_view` (borrowed), checking the
    /// dtype, the shape and the elements.
    fn round_trip<T: Element + PartialEq + std::fmt::Debug>(a: ArrayD<T>) {
        let nd = NdArray::from_view(a.view());
        assert_eq!(nd.dtype, T::DTYPE);
        assert_eq!(nd.shape, a.shape());
        nd.check_layout().unwrap();
        assert_eq!(nd.to_array::<T>().unwrap(), a);
        let nd2 = NdArray::from_array(a.clone());
        assert_eq!(nd2, nd);
        assert_eq!(nd2.view::<T>().unwrap(), a);
    }

    #[test]
    fn every_dtype_round_trips() {
        round_trip(array![[-1i8, 2], [i8::MIN, i8::MAX]].into_dyn());
        round_trip(array![-1i16, i16::MIN, i16::MAX].into_dyn());
        round_trip(array![-1i32, i32::MIN, i32::MAX].into_dyn());
        round_trip(array![-1i64, i64::MIN, i64::MAX].into_dyn());
        round_trip(array![0u8, 255].into_dyn());
        round_trip(array![0u16, u16::MAX].into_dyn());
        round_trip(array![0u32, u32::MAX].into_dyn());
        round_trip(array![0u64, u64::MAX].into_dyn());
        round_trip(array![1.5f32, -0.0, f32::INFINITY].into_dyn());
        round_trip(array![1.5f64, f64::MIN_POSITIVE, f64::NEG_INFINITY].into_dyn());
        round_trip(array![Complex::new(1.0f32, -2.0), Complex::new(0.5, 3.0)].into_dyn());
        round_trip(array![[Complex::new(1.0f64, -2.0)], [Complex::new(0.25, 1e300)]].into_dyn());
        round_trip(array![true, false, true].into_dyn());
        round_trip(ArrayD::<f64>::zeros(IxDyn(&[2, 0, 3])));
    }

    #[test]
    fn wire_bytes_are_little_endian_c_order() {
        let nd = NdArray::from_array(array![[1u16, 2], [3, 0x0405]]);
        assert_eq!(&nd.data[..], &[1, 0, 2, 0, 3, 0, 5, 4]);
        let nd = NdArray::from_array(array![Complex::new(1.0f32, 2.0)]);
        assert_eq!(&nd.data[..4], &1.0f32.to_le_bytes());
        assert_eq!(&nd.data[4..], &2.0f32.to_le_bytes());
        let nd = NdArray::from_array(array![true, false]);
        assert_eq!(&nd.data[..], &[1, 0]);
    }

    #[test]
    fn three_d_array() {
        let a = Array3::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 100 + j * 10 + k) as i32);
        let nd = NdArray::from_array(a.clone());
        assert_eq!(nd.shape, vec![2, 3, 4]);
        // Element [1, 2, 3] sits at C-order index 1*12 + 2*4 + 3 = 23.
        assert_eq!(&nd.data[23 * 4..24 * 4], &123i32.to_le_bytes());
        assert_eq!(nd.to_array::<i32>().unwrap(), a.into_dyn());
    }

    #[test]
    fn transposed_and_fortran_arrays_are_written_in_c_order() {
        let a = array![[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let t = a.clone().reversed_axes(); // [[1,4],[2,5],[3,6]], not standard layout
        assert!(!t.is_standard_layout());
        let nd = NdArray::from_array(t.clone());
        assert_eq!(nd.shape, vec![3, 2]);
        let back = nd.to_array::<f64>().unwrap();
        assert_eq!(back, t.into_dyn());
        assert_eq!(back.as_slice().unwrap(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);

        let f = Array::from_shape_vec((2, 2).f(), vec![1u8, 2, 3, 4]).unwrap(); // [[1,3],[2,4]]
        assert_eq!(&NdArray::from_array(f).data[..], &[1, 3, 2, 4]);
    }

    #[test]
    fn sliced_standard_array_keeps_only_its_elements() {
        let a = Array::from_shape_vec((3, 2), vec![1i64, 2, 3, 4, 5, 6]).unwrap();
        let tail = a.slice_move(ndarray::s![1.., ..]); // [[3,4],[5,6]], offset 2 in its Vec
        assert!(tail.is_standard_layout());
        let nd = NdArray::from_array(tail);
        assert_eq!(nd.shape, vec![2, 2]);
        assert_eq!(nd.to_array::<i64>().unwrap().into_raw_vec_and_offset().0, vec![3, 4, 5, 6]);
    }

    #[test]
    fn scalar_shape() {
        let nd = NdArray::from_array(arr0(2.5f32));
        assert_eq!(nd.shape, Vec::<usize>::new());
        assert_eq!(nd.data.len(), 4);
        let v = nd.view::<f32>().unwrap();
        assert_eq!(v.ndim(), 0);
        assert_eq!(v.first(), Some(&2.5));
    }

    #[test]
    fn from_array_does_not_copy() {
        let v: Vec<f64> = (0..24).map(f64::from).collect();
        let ptr = v.as_ptr() as *const u8;
        let a = Array::from_shape_vec((2, 3, 4), v).unwrap();
        let nd = NdArray::from_array(a);
        assert_eq!(nd.data.as_ptr(), ptr);

        let v = vec![true, false, true];
        let ptr = v.as_ptr() as *const u8;
        assert_eq!(NdArray::from_array(Array1::from(v)).data.as_ptr(), ptr);

        let v = vec![Complex::new(1.0f32, 2.0), Complex::new(-3.0, 0.5)];
        let ptr = v.as_ptr() as *const u8;
        assert_eq!(NdArray::from_array(Array1::from(v)).data.as_ptr(), ptr);
    }

    #[test]
    fn aligned_view_borrows() {
        let nd = NdArray::from_array(Array::from_shape_vec((2, 2), vec![1u32, 2, 3, 4]).unwrap());
        let v = nd.view::<u32>().unwrap();
        assert!(v.is_view());
        assert_eq!(v.as_ptr() as *const u8, nd.data.as_ptr());
        // bool is validated, then borrowed too.
        let nd = NdArray::from_array(array![true, false]);
        let v = nd.view::<bool>().unwrap();
        assert!(v.is_view());
        assert_eq!(v.as_ptr() as *const u8, nd.data.as_ptr());
        // complex128 borrows as (re, im) pairs.
        let nd = NdArray::from_array(array![Complex::new(1.0f64, -1.0), Complex::new(0.5, 2.0)]);
        let v = nd.view::<Complex<f64>>().unwrap();
        assert!(v.is_view());
        assert_eq!(v[[1]], Complex::new(0.5, 2.0));
    }

    #[test]
    fn misaligned_data_is_copied_correctly() {
        let values = [1.25f64, -2.5, 1e-300, f64::MAX];
        let mut buf = vec![0xAAu8; 8 + 32];
        let base = buf.as_ptr() as usize;
        // An offset that leaves the payload misaligned for f64, whatever the allocator did.
        let off = (1..8).find(|o| !(base + o).is_multiple_of(std::mem::align_of::<f64>())).unwrap();
        for (i, x) in values.iter().enumerate() {
            buf[off + 8 * i..off + 8 * (i + 1)].copy_from_slice(&x.to_le_bytes());
        }
        let data = Bytes::from(buf).slice(off..off + 32);
        let nd = NdArray { dtype: DType::Float64, shape: vec![2, 2], data };
        let v = nd.view::<f64>().unwrap();
        assert!(!v.is_view(), "misaligned data cannot be borrowed as f64");
        assert_eq!(v, array![[1.25, -2.5], [1e-300, f64::MAX]].into_dyn());
    }

    #[test]
    fn errors() {
        let nd = NdArray::from_array(array![1i32, 2]);
        assert_eq!(
            nd.view::<i64>().unwrap_err(),
            ArrayError::DtypeMismatch { actual: "int32".into(), requested: "int64".into() }
        );
        assert!(matches!(nd.view::<u32>(), Err(ArrayError::DtypeMismatch { .. })));
        let short = NdArray { shape: vec![3], ..nd.clone() };
        assert!(matches!(
            short.to_array::<i32>(),
            Err(ArrayError::SizeMismatch { expected: 12, actual: 8, .. })
        ));
        let huge = NdArray { shape: vec![usize::MAX, 4], ..nd.clone() };
        assert_eq!(huge.view::<i32>().unwrap_err(), ArrayError::ShapeOverflow);
        let half = NdArray { dtype: DType::Float16, shape: vec![1], data: Bytes::from_static(&[0, 60]) };
        assert_eq!(half.view::<f32>().unwrap_err(), ArrayError::UnsupportedDtype("float16".into()));
        let text = NdArray { dtype: DType::parse("<U5"), shape: vec![1], data: Bytes::from_static(b"x") };
        assert_eq!(text.view::<u8>().unwrap_err(), ArrayError::UnsupportedDtype("<U5".into()));
        let bad = NdArray { dtype: DType::Bool, shape: vec![3], data: Bytes::from_static(&[1, 0, 2]) };
        assert_eq!(bad.view::<bool>().unwrap_err(), ArrayError::InvalidBool { index: 2, byte: 2 });
        assert!(bad.to_array::<bool>().unwrap_err().to_string().contains("0x02"));
    }

    #[test]
    fn typed_array_round_trip() {
        let ta = TypedArray::from_array1(array![1.5f32, 2.5, -1.0]).unwrap();
        assert_eq!(ta.dtype, DType::Float32);
        assert_eq!(ta.data.len(), 12);
        assert_eq!(ta.to_array1::<f32>().unwrap(), array![1.5f32, 2.5, -1.0]);
        assert!(matches!(ta.view::<f64>(), Err(ArrayError::DtypeMismatch { .. })));
        assert_eq!(
            TypedArray::from_array1(array![1i64]).unwrap_err(),
            ArrayError::UnsupportedDtype("int64".into())
        );
        let ragged = TypedArray { dtype: DType::Int16, data: Bytes::from_static(&[1, 2, 3]) };
        assert!(matches!(ragged.view::<i16>(), Err(ArrayError::SizeMismatch { .. })));
    }

    #[test]
    fn from_slice_is_one_dimensional() {
        let nd = NdArray::from_slice(&[7u16, 8, 9]);
        assert_eq!(nd.shape, vec![3]);
        assert_eq!(nd.to_array::<u16>().unwrap(), array![7u16, 8, 9].into_dyn());
    }

    /// A random shape (up to 4 axes of up to 4) with matching random elements.
    fn shaped_f64() -> impl Strategy<Value = (Vec<usize>, Vec<f64>)> {
        proptest::collection::vec(0usize..5, 0..5).prop_flat_map(|shape| {
            let n: usize = shape.iter().product();
            (Just(shape), proptest::collection::vec(any::<f64>(), n))
        })
    }

    proptest! {
        #[test]
        fn f64_arrays_of_random_shape((shape, elems) in shaped_f64(), transpose in any::<bool>()) {
            let mut a = ArrayD::from_shape_vec(IxDyn(&shape), elems).unwrap();
            if transpose {
                a = a.reversed_axes();
            }
            let nd = NdArray::from_array(a.clone());
            prop_assert_eq!(&nd.shape, &a.shape().to_vec());
            prop_assert!(nd.check_layout().is_ok());
            let back = nd.to_array::<f64>().unwrap();
            // Compare bit patterns: NaN != NaN otherwise.
            let bits = |x: &ArrayD<f64>| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&back), bits(&a));
            prop_assert_eq!(back.shape(), a.shape());
        }
    }
}

// ---------------------------------------------------------------------------------------
// serde: the `_rtype: "ndarray"` wire map
// ---------------------------------------------------------------------------------------
//
// So that an `NdArray` can sit inside user structs, maps and lists that go through
// `serde_value` (the typed client API): it serializes to exactly the map that
// `codec::encode` produces for `Value::NdArray`, and deserializes from that map, which is
// also what `serde_value` presents for a decoded `Value::NdArray`. A JS `typedarray` map
// is accepted as a 1-D array.

impl serde::Serialize for NdArray {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("_rtype", "ndarray")?;
        m.serialize_entry("_rvalue", &RawBytes(&self.data))?;
        m.serialize_entry("_rshape", &self.shape)?;
        m.serialize_entry("_rdtype", self.dtype.as_str())?;
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for NdArray {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(NdArrayVisitor)
    }
}

struct NdArrayVisitor;

impl<'de> serde::de::Visitor<'de> for NdArrayVisitor {
    type Value = NdArray;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an ndarray (`_rtype: \"ndarray\"` map)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NdArray, A::Error> {
        use serde::de::Error;
        let mut rtype: Option<String> = None;
        let mut data: Option<OwnedBytes> = None;
        let mut shape: Option<Vec<usize>> = None;
        let mut dtype: Option<String> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "_rtype" => rtype = Some(map.next_value::<String>()?),
                "_rvalue" => data = Some(map.next_value::<OwnedBytes>()?),
                "_rshape" => shape = Some(map.next_value::<Vec<usize>>()?),
                "_rdtype" => dtype = Some(map.next_value::<String>()?),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let data = Bytes::from(data.ok_or_else(|| A::Error::missing_field("_rvalue"))?.0);
        let dtype = DType::parse(&dtype.ok_or_else(|| A::Error::missing_field("_rdtype"))?);
        let shape = match rtype.as_deref() {
            Some("ndarray") => shape.ok_or_else(|| A::Error::missing_field("_rshape"))?,
            Some("typedarray") => vec![dtype.item_size().map_or(0, |s| data.len() / s)],
            other => return Err(A::Error::custom(format!("expected an ndarray, got _rtype {other:?}"))),
        };
        let array = NdArray { dtype, shape, data };
        array.check_layout().map_err(A::Error::custom)?;
        Ok(array)
    }
}

/// Serializes a slice with `serialize_bytes` (msgpack `bin`, `Value::Bytes`).
struct RawBytes<'a>(&'a [u8]);

impl serde::Serialize for RawBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A byte buffer from `bytes` (or a sequence of `u8`).
struct OwnedBytes(Vec<u8>);

impl<'de> serde::Deserialize<'de> for OwnedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OwnedBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<OwnedBytes, E> {
                Ok(OwnedBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<OwnedBytes, E> {
                Ok(OwnedBytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OwnedBytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(OwnedBytes(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

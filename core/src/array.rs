//! n-dimensional arrays as hypha-rpc carries them (`_rtype: "ndarray"`, spec §5.2):
//! raw C-order little-endian bytes, a shape and a numpy dtype string.

use bytes::Bytes;

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

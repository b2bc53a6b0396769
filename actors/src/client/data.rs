//! Typed n-dimensional arrays and byte buffers for service functions and calls.
//!
//! Two ways to move numeric data, with different trade-offs:
//!
//! * [`NdArrayOf<T, D>`]: a typed `ndarray::Array<T, D>` (any [`Element`] dtype: `bool`,
//!   `i8`..`i64`, `u8`..`u64`, `f32`, `f64`, `Complex<f32>`, `Complex<f64>`; any fixed
//!   dimension or `IxDyn`). As a top-level argument or result it goes straight to and
//!   from [`Value::NdArray`]: sending moves the array's buffer
//!   into the frame encoder without a copy, receiving copies once into an aligned `Vec`.
//!   Nested inside a serde struct, map or list it serializes as the `_rtype: "ndarray"`
//!   wire map (one extra copy each way), so `Vec<NdArrayOf<f32>>` or a struct field work.
//! * [`NdArray`] (the core's type-erased array): any dtype numpy sends, including
//!   `float16` and strings, kept as bytes; zero-copy in both directions; convert with
//!   [`NdArray::view`] / [`NdArray::to_array`].
//!
//! Bytes: `bytes::Bytes` and `serde_bytes::ByteBuf` are Python `bytes`. At top level both
//! move without copying (a received `Bytes` is a slice of the frame).
//!
//! Why a wrapper rather than `ndarray`'s own serde support: `ndarray`'s serde format is
//! `{v, dim, data}`, which no hypha peer understands, and enabling it would make every
//! nested array silently take that form.

use std::any::Any;

use bytes::Bytes;
use hypha_core::array::{Element, NdArray};
use hypha_core::value::TypedArray;
use hypha_core::Value;
use ndarray::{Array, Dimension, IxDyn};
use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::Error;

/// Runs `$m!` with every element type.
macro_rules! for_each_element {
    ($m:ident) => {
        $m!(
            f32,
            f64,
            u8,
            i8,
            i16,
            i32,
            i64,
            u16,
            u32,
            u64,
            bool,
            num_complex::Complex<f32>,
            num_complex::Complex<f64>
        )
    };
}

/// A typed `ndarray` array as a hypha value: numpy's `ndarray` on the Python side.
/// See the [module docs](self) for when it copies.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArrayOf<T: Element, D: Dimension = IxDyn>(pub Array<T, D>);

impl<T: Element, D: Dimension> NdArrayOf<T, D> {
    /// The array.
    pub fn into_inner(self) -> Array<T, D> {
        self.0
    }

    /// Converts a received [`NdArray`]: the dtype must be `T`'s and the number of
    /// dimensions must fit `D`.
    pub fn from_ndarray(a: &NdArray) -> Result<Self, Error> {
        let owned = a.view::<T>().map_err(|e| Error::Convert(e.to_string()))?.into_owned();
        owned.into_dimensionality::<D>().map(NdArrayOf).map_err(|e| {
            Error::Convert(format!(
                "ndarray of shape {:?} does not fit the requested dimension: {e}",
                a.shape
            ))
        })
    }

    /// The wire form, without copying the elements of a standard-layout array.
    pub fn into_ndarray(self) -> NdArray {
        NdArray::from_array(self.0)
    }
}

impl<T: Element, D: Dimension> From<Array<T, D>> for NdArrayOf<T, D> {
    fn from(a: Array<T, D>) -> Self {
        NdArrayOf(a)
    }
}

impl<T: Element, D: Dimension> std::ops::Deref for NdArrayOf<T, D> {
    type Target = Array<T, D>;
    fn deref(&self) -> &Array<T, D> {
        &self.0
    }
}

impl<T: Element, D: Dimension> std::ops::DerefMut for NdArrayOf<T, D> {
    fn deref_mut(&mut self) -> &mut Array<T, D> {
        &mut self.0
    }
}

/// The `_rtype: "ndarray"` wire map (used when the array is nested in serde data).
impl<T: Element, D: Dimension> Serialize for NdArrayOf<T, D> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        NdArray::from_view(self.0.view()).serialize(s)
    }
}

impl<'de, T: Element, D: Dimension> Deserialize<'de> for NdArrayOf<T, D> {
    fn deserialize<De: Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        let wire = NdArray::deserialize(d)?;
        NdArrayOf::from_ndarray(&wire).map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------
// Top-level fast paths, used by `codec::to_value` / `codec::from_value`
// ---------------------------------------------------------------------------------------

/// `T` is one of the types with a copy-free conversion: the value, if so. `slot` is
/// taken when it matches.
///
/// Generic (not `&mut dyn Any`) so that each caller's copy knows `T`: every `downcast_mut`
/// below is then a comparison of two constant type ids, folded away at compile time,
/// instead of a virtual call per candidate type (over a hundred of them, paid by every
/// result of a plain type such as an integer).
#[inline]
pub(crate) fn fast_to_value<T: 'static>(slot: &mut Option<T>) -> Option<Result<Value, Error>> {
    let slot: &mut dyn Any = slot;
    if let Some(v) = slot.downcast_mut::<Option<Value>>() {
        return v.take().map(Ok);
    }
    if let Some(v) = slot.downcast_mut::<Option<NdArray>>() {
        return v.take().map(|a| Ok(Value::NdArray(Box::new(a))));
    }
    if let Some(v) = slot.downcast_mut::<Option<Bytes>>() {
        return v.take().map(|b| Ok(Value::Bytes(b)));
    }
    if let Some(v) = slot.downcast_mut::<Option<serde_bytes::ByteBuf>>() {
        return v.take().map(|b| Ok(Value::Bytes(Bytes::from(b.into_vec()))));
    }
    macro_rules! arrays {
        ($($t:ty),*) => {$(
            if let Some(r) = arrays!(@dims $t; IxDyn, ndarray::Ix0, ndarray::Ix1, ndarray::Ix2,
                ndarray::Ix3, ndarray::Ix4, ndarray::Ix5, ndarray::Ix6) {
                return Some(r);
            }
        )*};
        (@dims $t:ty; $($d:ty),*) => {{
            let mut out = None;
            $(
                if out.is_none() {
                    if let Some(v) = slot.downcast_mut::<Option<NdArrayOf<$t, $d>>>() {
                        out = v.take().map(|a| Ok(Value::NdArray(Box::new(a.into_ndarray()))));
                    }
                }
            )*
            out
        }};
    }
    for_each_element!(arrays);
    None
}

/// The other direction: fills `out` when `T` has a copy-free (or single-copy)
/// conversion; gives the value back when it does not. Generic for the same reason as
/// [`fast_to_value`].
#[inline]
pub(crate) fn fast_from_value<T: 'static>(v: Value, out: &mut Option<T>) -> Result<Result<(), Error>, Value> {
    let out: &mut dyn Any = out;
    if let Some(slot) = out.downcast_mut::<Option<Value>>() {
        *slot = Some(v);
        return Ok(Ok(()));
    }
    if let Some(slot) = out.downcast_mut::<Option<NdArray>>() {
        return Ok(match v {
            Value::NdArray(a) => {
                *slot = Some(*a);
                Ok(())
            }
            Value::TypedArray(t) => {
                *slot = Some(typed_to_nd(*t));
                Ok(())
            }
            other => Err(Error::Convert(format!("expected an ndarray, got {}", other.kind()))),
        });
    }
    if let Some(slot) = out.downcast_mut::<Option<Bytes>>() {
        return match v {
            Value::Bytes(b) | Value::MemoryView(b) => {
                *slot = Some(b);
                Ok(Ok(()))
            }
            other => Err(other),
        };
    }
    if let Some(slot) = out.downcast_mut::<Option<serde_bytes::ByteBuf>>() {
        return match v {
            Value::Bytes(b) | Value::MemoryView(b) => {
                *slot = Some(serde_bytes::ByteBuf::from(Vec::from(b)));
                Ok(Ok(()))
            }
            other => Err(other),
        };
    }
    let array = match v {
        Value::NdArray(a) => *a,
        Value::TypedArray(t) => typed_to_nd(*t),
        other => return Err(other),
    };
    macro_rules! arrays {
        ($($t:ty),*) => {$(
            if let Some(r) = arrays!(@dims $t; IxDyn, ndarray::Ix0, ndarray::Ix1, ndarray::Ix2,
                ndarray::Ix3, ndarray::Ix4, ndarray::Ix5, ndarray::Ix6) {
                return Ok(r);
            }
        )*};
        (@dims $t:ty; $($d:ty),*) => {{
            let mut done = None;
            $(
                if done.is_none() {
                    if let Some(slot) = out.downcast_mut::<Option<NdArrayOf<$t, $d>>>() {
                        done = Some(NdArrayOf::<$t, $d>::from_ndarray(&array).map(|a| *slot = Some(a)));
                    }
                }
            )*
            done
        }};
    }
    for_each_element!(arrays);
    // Not a fast type: hand the array back in its decoded form for serde.
    Err(Value::NdArray(Box::new(array)))
}

fn typed_to_nd(t: TypedArray) -> NdArray {
    let len = t.dtype.item_size().map_or(0, |s| t.data.len() / s.max(1));
    NdArray { dtype: t.dtype, shape: vec![len], data: t.data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::codec::{from_value, to_value};
    use hypha_core::array::DType;
    use ndarray::{arr2, Array1, Array2, ArrayD};
    use num_complex::Complex;

    #[test]
    fn top_level_arrays_go_straight_to_ndarray_values() {
        let a = arr2(&[[1.0f32, 2.0], [3.0, 4.0]]);
        let v = to_value(NdArrayOf(a.clone())).unwrap();
        let Value::NdArray(nd) = &v else { panic!("not an ndarray: {v:?}") };
        assert_eq!(nd.dtype, DType::Float32);
        assert_eq!(nd.shape, vec![2, 2]);
        let back: NdArrayOf<f32, ndarray::Ix2> = from_value(v.clone()).unwrap();
        assert_eq!(back.0, a);
        let dyn_back: NdArrayOf<f32> = from_value(v.clone()).unwrap();
        assert_eq!(dyn_back.0, a.clone().into_dyn());
        let e = from_value::<NdArrayOf<f64>>(v.clone()).unwrap_err();
        assert!(e.to_string().contains("dtype mismatch"), "{e}");
        let e = from_value::<NdArrayOf<f32, ndarray::Ix1>>(v).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn every_element_type_round_trips() {
        fn rt<T: Element + PartialEq + std::fmt::Debug>(items: Vec<T>) {
            let a = Array1::from(items);
            let v = to_value(NdArrayOf(a.clone())).unwrap();
            let back: NdArrayOf<T, ndarray::Ix1> = from_value(v).unwrap();
            assert_eq!(back.0, a);
        }
        rt(vec![true, false]);
        rt(vec![-1i8, 2]);
        rt(vec![-1i16, 2]);
        rt(vec![-1i32, 2]);
        rt(vec![i64::MIN, 2]);
        rt(vec![255u8, 2]);
        rt(vec![65535u16, 2]);
        rt(vec![u32::MAX, 2]);
        rt(vec![u64::MAX, 2]);
        rt(vec![1.5f32, -2.0]);
        rt(vec![1.5f64, -2.0]);
        rt(vec![Complex::new(1.0f32, -1.0)]);
        rt(vec![Complex::new(1.0f64, -1.0)]);
    }

    #[test]
    fn nested_arrays_use_the_wire_map() {
        #[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
        struct Frame {
            name: String,
            pixels: NdArrayOf<u8, ndarray::Ix2>,
            stack: Vec<NdArrayOf<f64>>,
        }
        let f = Frame {
            name: "x".into(),
            pixels: NdArrayOf(Array2::from_shape_vec((2, 3), vec![1, 2, 3, 4, 5, 6]).unwrap()),
            stack: vec![NdArrayOf(ArrayD::from_elem(IxDyn(&[2, 1, 2]), 0.5))],
        };
        let v = to_value(f.clone()).unwrap_or_else(|e| panic!("{e}"));
        let m = v.as_map().unwrap();
        let px = m["pixels"].as_map().unwrap();
        assert_eq!(px["_rtype"], Value::from("ndarray"));
        assert_eq!(px["_rdtype"], Value::from("uint8"));
        let back: Frame = from_value(v).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn bytes_move_without_copies() {
        let b = Bytes::from(vec![1u8, 2, 3]);
        let v = to_value(b.clone()).unwrap();
        let Value::Bytes(inner) = &v else { panic!() };
        assert_eq!(inner.as_ptr(), b.as_ptr());
        let back: Bytes = from_value(v).unwrap();
        assert_eq!(back.as_ptr(), b.as_ptr());
        let buf: serde_bytes::ByteBuf = from_value(Value::Bytes(b)).unwrap();
        assert_eq!(buf.as_slice(), &[1, 2, 3]);
    }
}

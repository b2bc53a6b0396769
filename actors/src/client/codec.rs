//! Conversion between user types and [`Value`], and binding of received arguments to a
//! function's parameters.
//!
//! This is the client's codec stage. It is a set of functions rather than an actor
//! because of where the work can run: the `_rtype` and msgpack encoding must happen
//! inside the endpoint (encoding registers callbacks in the call's session, decoding
//! needs the call's context), while the serde conversion below needs no shared state at
//! all, so it runs in whichever task holds the data: the caller's task before a call is
//! sent, the service actor's handler future when a call arrives. Neither path touches the
//! connection actor's thread of control, which is what a codec actor would have bought.
//!
//! Two conversions pass [`Value`] through unchanged instead of going through serde:
//! a `Value` may hold live objects (functions, generators, custom values) that serde
//! cannot represent, and a handler that asks for a `Value` wants exactly what came.

use hypha_core::serde_value;
use hypha_core::{Map, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Error;

/// Converts a serializable value. A [`Value`] is taken as is; the types with a copy-free
/// form ([`NdArray`](hypha_core::NdArray), [`NdArrayOf`](super::data::NdArrayOf),
/// `bytes::Bytes`, `serde_bytes::ByteBuf`) become their typed values directly; anything
/// else goes through serde.
pub fn to_value<T: Serialize + 'static>(v: T) -> Result<Value, Error> {
    let mut slot = Some(v);
    if let Some(fast) = super::data::fast_to_value(&mut slot) {
        return fast;
    }
    match slot {
        Some(t) => Ok(serde_value::to_value(&t)?),
        None => Err(Error::Convert("internal: value taken by a fast path".into())),
    }
}

/// Converts a value into a deserializable type. A [`Value`] target takes it as is; the
/// types with a copy-free form (see [`to_value`]) take it directly; anything else goes
/// through serde.
pub fn from_value<T: DeserializeOwned + 'static>(v: Value) -> Result<T, Error> {
    let mut out: Option<T> = None;
    match super::data::fast_from_value(v, &mut out) {
        Ok(done) => {
            done?;
            out.ok_or_else(|| Error::Convert("internal: fast path produced nothing".into()))
        }
        Err(v) => Ok(serde_value::from_value(v)?),
    }
}

/// Merges keyword arguments into positional ones by parameter name, as a Python callee
/// binds them (and as the JS callee maps them to its parameter list, spec §5.8), and
/// fills missing arguments from the declared defaults.
///
/// * positional arguments fill the first parameters;
/// * each keyword fills the parameter of that name; a name that is not a parameter, or
///   one that is also given positionally, is an error with Python's `TypeError` text;
/// * a parameter left unfilled takes its default (`defaults[i]`) if it has one;
///   otherwise it is `Nil` when a later parameter is filled (a missing required argument
///   then fails its conversion with a clear message), and left out at the end (so an
///   `Option` parameter sees "absent").
///
/// `function` names the function in the messages.
pub fn bind_arguments(
    function: &str,
    params: &[String],
    defaults: &[Option<Value>],
    args: Vec<Value>,
    kwargs: Option<Map>,
) -> Result<Vec<Value>, Error> {
    let kwargs = kwargs.filter(|k| !k.is_empty());
    if kwargs.is_none() && args.len() >= params.len() {
        return Ok(args);
    }
    if kwargs.is_some() && args.len() > params.len() {
        return Err(Error::Arguments(format!(
            "{function}() takes {} positional arguments but {} were given",
            params.len(),
            args.len()
        )));
    }
    let mut slots: Vec<Option<Value>> = params.iter().map(|_| None).collect();
    let given = args.len();
    for (slot, v) in slots.iter_mut().zip(args) {
        *slot = Some(v);
    }
    for (name, value) in kwargs.unwrap_or_default() {
        let Some(i) = params.iter().position(|p| *p == name) else {
            return Err(Error::Arguments(format!(
                "{function}() got an unexpected keyword argument '{name}'"
            )));
        };
        if i < given {
            return Err(Error::Arguments(format!("{function}() got multiple values for argument '{name}'")));
        }
        slots[i] = Some(value);
    }
    for (slot, default) in slots.iter_mut().zip(defaults) {
        if slot.is_none() {
            slot.clone_from(default);
        }
    }
    let filled = slots.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
    Ok(slots.into_iter().take(filled).map(Option::unwrap_or_default).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::map;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn values_pass_through_unconverted() {
        let v = Value::from("x");
        assert_eq!(to_value(v.clone()).unwrap(), v);
        assert_eq!(from_value::<Value>(v.clone()).unwrap(), v);
        assert_eq!(to_value(3_i32).unwrap(), Value::Int(3));
        assert_eq!(from_value::<String>(v).unwrap(), "x");
    }

    #[test]
    fn kwargs_bind_by_name() {
        let p = names(&["a", "b", "c"]);
        let none = [None, None, None];
        let out = bind_arguments("f", &p, &none, vec![Value::from(1)], Some(map! {"c" => 3})).unwrap();
        assert_eq!(out, vec![Value::from(1), Value::Nil, Value::from(3)]);
        let out = bind_arguments("f", &p, &none, vec![], Some(map! {"a" => 1})).unwrap();
        assert_eq!(out, vec![Value::from(1)]);
        let err = bind_arguments("f", &p, &none, vec![], Some(map! {"z" => 1})).unwrap_err();
        assert_eq!(err.to_string(), "f() got an unexpected keyword argument 'z'");
        let err = bind_arguments("f", &p, &none, vec![Value::from(1)], Some(map! {"a" => 1})).unwrap_err();
        assert_eq!(err.to_string(), "f() got multiple values for argument 'a'");
    }

    #[test]
    fn defaults_fill_missing_arguments() {
        let p = names(&["a", "b", "c"]);
        let d = [None, Some(Value::from(2)), Some(Value::from(3))];
        let out = bind_arguments("f", &p, &d, vec![Value::from(1)], None).unwrap();
        assert_eq!(out, vec![Value::from(1), Value::from(2), Value::from(3)]);
        let out = bind_arguments("f", &p, &d, vec![], Some(map! {"a" => 9, "c" => 7})).unwrap();
        assert_eq!(out, vec![Value::from(9), Value::from(2), Value::from(7)]);
    }
}

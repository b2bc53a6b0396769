//! The `_rtype` codec (spec §5): decoded [`Value`]s <-> wire-form values.
//!
//! CONTRACT (scaffold; the implementation replaces the `unimplemented!` bodies but keeps
//! these names and shapes, which the session table and the drivers depend on).

use crate::value::{LocalFunction, LocalGenerator, RemoteMethod, Value};

/// Where the encoder puts local objects that must stay callable by the peer.
///
/// The session table implements it: functions passed as call arguments go into the call
/// session (and die with it), functions in results into the result session, `_rintf`
/// maps become local services. Keeping this a trait keeps the codec free of session state
/// and testable on its own.
pub trait ObjectSink {
    /// Stores a local function and returns how to describe it.
    ///
    /// `session` is the session the value is being encoded into (`None` outside a call:
    /// then only functions that belong to a registered service can be encoded, as
    /// upstream asserts).
    fn store_function(
        &mut self,
        session: Option<&str>,
        function: &LocalFunction,
    ) -> Result<StoredFunction, CodecError>;

    /// Stores a local generator (`S[oid]` and `S[oid + ":close"]`, spec §6) and returns the
    /// `(next, close)` method paths.
    fn store_generator(
        &mut self,
        session: Option<&str>,
        generator: &LocalGenerator,
    ) -> Result<(String, String), CodecError>;

    /// Registers a `_rintf` interface (spec §5.5) made of `members` (the map's callables
    /// under keys that do not start with `_`) as a local service, allowed only for the
    /// target of the current top-level session, and returns the new service id
    /// (`_rintf_<random>`). The sink adds the `_dispose` member itself.
    fn register_interface(
        &mut self,
        session: Option<&str>,
        members: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError>;

    /// Wraps a remote method that cannot be forwarded as is (its `_rserver` differs from
    /// ours, spec §5.3) as a local session function that relays calls, and returns the
    /// method path under which it was stored.
    fn store_forwarder(&mut self, session: Option<&str>, method: &RemoteMethod)
        -> Result<String, CodecError>;
}

/// How a stored local function is described on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFunction {
    /// `_rmethod`: `<session>.<objid>[#name]` or `services.<id>.<path>`.
    pub method: String,
    /// True when the function is a member of a registered service (annotated): then the
    /// descriptor also carries `_rasync: false` and the schema, as Python emits.
    pub is_service_function: bool,
}

/// Errors of the `_rtype` codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Placeholder until the codec lands.
    #[error("{0}")]
    Other(String),
}

/// Encodes a decoded value into wire form.
pub fn encode(_value: &Value) -> Result<Value, CodecError> {
    unimplemented!("scaffold")
}

/// Decodes a wire-form value.
pub fn decode(_wire: Value) -> Result<Value, CodecError> {
    unimplemented!("scaffold")
}

//! Interface actors: one per `_rintf` object (spec §5.5), running its member functions.
//!
//! A `_rintf` map passed as an argument becomes, on encode, a local `_rintf_<id>` service
//! allowed only for the peer it was sent to; the peer may call its members long after the
//! call that carried it returned. The core stores the members as local functions; ours
//! are thin forwarders ([`forwarding`]) that send each call to the object's
//! [`InterfaceActor`], which runs the user function in its own context, concurrently with
//! the object's other calls and off the registry's context.
//!
//! # End of life
//!
//! The forwarders hold the actor's address, and the endpoint holds the forwarders in the
//! `_rintf_` service (a user's [`Value`] of the object holds them too). The service goes
//! when the peer calls `_dispose`, when that peer disconnects (`client_disconnected`),
//! when the user unregisters it ([`UnregisterInterface`]), or when the connection closes;
//! once neither the endpoint nor the user holds the object, the last address is gone and
//! the actor stops after its running calls finish. Each encode of the same object makes a
//! new `_rintf_` service (as upstream does); they share the one actor.

use std::collections::HashSet;
use std::sync::Arc;

use actix::prelude::*;
use hypha_core::{ErrorValue, Function, Value};

use super::service::{run_guarded, DynFunction, Invocation, LocalHandler};
use super::session_registry::SessionRegistry;
use super::Error;

/// Calls one interface runs at once before it rejects more (a peer looping over a stored
/// interface cannot pile up unbounded work).
pub const MAX_RUNNING: usize = 1024;

/// Run one member function.
#[derive(Message)]
#[rtype(result = "Result<Value, ErrorValue>")]
pub struct RunMember {
    /// The user's function.
    pub func: DynFunction,
    /// Its arguments.
    pub invocation: Invocation,
}

/// Runs the member functions of one `_rintf` object. See the module documentation.
pub struct InterfaceActor {
    /// A label for logs.
    label: String,
    /// Calls running now.
    running: usize,
}

impl InterfaceActor {
    /// An actor for the object labelled `label` (logs only).
    pub fn new(label: impl Into<String>) -> Self {
        Self { label: label.into(), running: 0 }
    }
}

impl Actor for InterfaceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAX_RUNNING);
        tracing::debug!(interface = %self.label, "interface actor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::debug!(interface = %self.label, "interface actor stopped");
    }
}

impl Handler<RunMember> for InterfaceActor {
    type Result = ResponseActFuture<Self, Result<Value, ErrorValue>>;

    fn handle(&mut self, msg: RunMember, _: &mut Context<Self>) -> Self::Result {
        if self.running >= MAX_RUNNING {
            let error = Error::Overloaded(format!("interface {}", self.label)).to_error_value();
            return Box::pin(fut::ready(Err(error)));
        }
        self.running += 1;
        Box::pin(run_guarded(msg.func, msg.invocation).into_actor(self).map(|result, act, _| {
            act.running -= 1;
            result
        }))
    }
}

/// Wraps a member function so that calls run on `actor`. The wrapper is what the
/// endpoint stores in the `_rintf_` service.
pub fn forwarding(actor: Addr<InterfaceActor>, func: DynFunction) -> DynFunction {
    Arc::new(move |invocation: Invocation| {
        let request = actor.send(RunMember { func: func.clone(), invocation });
        Box::pin(async move {
            match request.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(Error::from(error)),
                Err(_) => Err(Error::Closed),
            }
        })
    })
}

/// Removes every `_rintf_` service made from an object (found by the identity of its
/// member handlers), as upstream's `unregister_service(obj["_rintf_service_id"])` does.
/// No server notification: these services were never registered there. Returns the
/// removed service ids.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct UnregisterInterface {
    /// The object's member handlers (identity: [`hypha_core::Handler::id`]).
    pub handlers: Vec<hypha_core::Handler>,
}

impl Handler<UnregisterInterface> for SessionRegistry {
    type Result = Vec<String>;

    fn handle(&mut self, msg: UnregisterInterface, ctx: &mut Context<Self>) -> Vec<String> {
        let ours: HashSet<usize> = msg.handlers.iter().map(hypha_core::Handler::id).collect();
        let ids: Vec<String> = self
            .endpoint()
            .table()
            .services()
            .filter(|(id, _)| id.starts_with(hypha_core::session::RINTF_PREFIX))
            .filter(|(_, service)| {
                service.api.values().any(|v| match v {
                    Value::Function(f) => match f.as_ref() {
                        Function::Local(lf) => ours.contains(&lf.handler.id()),
                        Function::Remote(_) => false,
                    },
                    _ => false,
                })
            })
            .map(|(id, _)| id.to_owned())
            .collect();
        for id in &ids {
            if let Err(e) = self.endpoint_mut().unregister_service(id) {
                tracing::debug!(%id, error = %e, "interface already gone");
            }
        }
        self.drive(ctx);
        ids
    }
}

/// The handler of one member, as the public API builds it: a [`LocalHandler`] without a
/// service (the registry runs it directly; it forwards to the actor).
pub fn member_handler(actor: &Addr<InterfaceActor>, func: DynFunction) -> LocalHandler {
    LocalHandler { service: None, func: forwarding(actor.clone(), func) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The actor lives while a forwarder (the `_rintf_` service's member, or the user's
    /// object) holds it, and stops when the last one goes.
    #[actix_rt::test]
    async fn actor_stops_with_its_last_member() {
        let actor = InterfaceActor::new("test").start();
        let weak = actor.downgrade();
        let func: DynFunction = Arc::new(|_inv: Invocation| Box::pin(async { Ok(Value::Nil) }));
        let member = member_handler(&actor, func);
        drop(actor);
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        assert!(weak.upgrade().is_some(), "alive while a member holds it");
        drop(member);
        for _ in 0..100 {
            if weak.upgrade().is_none() {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the interface actor did not stop");
    }
}

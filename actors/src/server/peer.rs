//! The driving loop shared by the server's native RPC peers (the workspace manager and
//! the login service): each is an actix actor that owns a `hypha_core::endpoint::Endpoint`
//! and differs from the others only in what it does with the endpoint's events.

use std::time::Instant;

use actix::prelude::*;
use hypha_core::endpoint::{Endpoint, Event};

use super::router::{RouteOutcome, RouteSender};
use super::ServerState;

/// An actor that drives an [`Endpoint`] through the router.
///
/// Implementors give access to their parts and handle events; [`NativePeer::drive`]
/// does the rest: it sends every queued frame as the peer's own address, feeds a
/// router refusal (the target just left) back as the reject it is, drains the events,
/// repeats until the endpoint is quiet, and keeps one actor timer armed at the
/// endpoint's next deadline (call timeouts, heartbeats of long calls, sweeps).
pub(crate) trait NativePeer: Actor<Context = Context<Self>> + Sized {
    /// A short name for logs.
    const LABEL: &'static str;

    /// The endpoint, the server state (for the router) and this peer's route identity.
    fn parts(&mut self) -> (&mut Endpoint, &ServerState, &RouteSender);

    /// The armed timer: its deadline and the handle that cancels it.
    fn timer(&mut self) -> &mut Option<(Instant, SpawnHandle)>;

    /// Handles one event of the endpoint.
    fn on_event(&mut self, ctx: &mut Context<Self>, event: Event);

    /// Sends, handles and re-arms until the endpoint has nothing left to do now.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        loop {
            let now = Instant::now();
            let mut busy = false;
            let (endpoint, state, sender) = self.parts();
            while let Some(frame) = endpoint.poll_transmit() {
                busy = true;
                match state.router.route(sender, &frame, now) {
                    RouteOutcome::Rejected { reject, error } => {
                        tracing::debug!(%error, peer = Self::LABEL, "call refused by the router");
                        endpoint.handle_frame(now, reject);
                    }
                    RouteOutcome::Dropped(reason) => {
                        tracing::debug!(%reason, peer = Self::LABEL, "frame dropped")
                    }
                    RouteOutcome::Delivered(_) => {}
                }
            }
            while let Some(event) = self.parts().0.poll_event() {
                busy = true;
                self.on_event(ctx, event);
            }
            if !busy {
                break;
            }
        }
        self.arm(ctx);
    }

    /// Keeps one timer at the endpoint's earliest deadline (an earlier armed one stays).
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let Some(deadline) = self.parts().0.poll_timeout() else { return };
        if let Some((at, handle)) = *self.timer() {
            if at <= deadline {
                return;
            }
            ctx.cancel_future(handle);
        }
        let after = deadline.saturating_duration_since(Instant::now());
        let handle = ctx.run_later(after, |act: &mut Self, ctx| {
            *act.timer() = None;
            act.parts().0.handle_timeout(Instant::now());
            act.drive(ctx);
        });
        *self.timer() = Some((deadline, handle));
    }
}

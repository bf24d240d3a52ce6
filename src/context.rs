//! The application context: what every front door (RESP connections, the HTTP sidecar) and
//! the server share, built once at start-up (`server::build`) and handed down.
//!
//! Owns nothing of its own: it bundles the engine, the router, the control plane's
//! rebalancer, the validated config and the per-process figures. Modules below the front
//! doors never see it (the layer test keeps it so).

use crate::config::Config;
use crate::counter::Engine;
use crate::rebalance::Rebalancer;
use crate::resp::Limits;
use crate::router::Router;
use crate::shutdown::ShutdownTrigger;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

/// What every connection and the sidecar share.
pub struct Context {
    pub config: Config,
    pub router: Arc<Router>,
    pub engine: Arc<Engine>,
    pub limits: Limits,
    /// Bytes all client connections may hold in their read buffers at once.
    pub input_budget: Arc<crate::resp::budget::InputBudget>,
    pub started: Instant,
    pub started_unix: u64,
    pub next_client_id: AtomicU64,
    pub shutdown: ShutdownTrigger,
    pub rebalancer: Arc<Rebalancer>,
    pub users: crate::auth::Users,
    /// `admin_token` as read at start-up (a secret may come from the environment or a file).
    pub admin_token: Option<String>,
}

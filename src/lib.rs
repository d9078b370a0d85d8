//! callgate: a policy gateway for outbound AI phone calls.
//!
//! Many internal tenants share one Ringyo calling account through callgate. Each tenant calls
//! `POST /v1/calls` exactly as it would call the upstream, with its own key; callgate
//! authenticates it, validates the request, enforces the tenant's policy, redacts personal data
//! and forwards the call with the account's key. The request path is in [`stack`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod calls;
pub mod clock;
pub mod config;
pub mod consents;
pub mod dryrun;
pub mod error;
pub mod hexstr;
pub mod lifecycle;
pub mod listen;
pub mod metrics;
pub mod optouts;
pub mod phone;
pub mod policy;
pub mod relay;
pub mod reload;
pub mod server;
pub mod simulator;
pub mod stack;
pub mod stages;
pub mod state;
pub mod suspensions;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod upstream;

//! The control API: the one crate that knows JSON. It holds the wire types, the table of
//! API errors, the axum router (which calls a [`router::ControlPlane`] that the server
//! implements), the OpenAPI document that the router is built from and serves at
//! `/v1/openapi.json`, and a typed client for the CLI and the tests. It knows nothing of
//! SQL, processes or files.

pub mod client;
pub mod error;
pub mod exec;
mod exposition;
mod extract;
mod openapi;
pub mod router;
pub mod wire;

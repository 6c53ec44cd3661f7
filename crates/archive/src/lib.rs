//! Packing and unpacking of app bundles. The CLI uses [`pack`] to turn an app
//! directory into a deterministic gzip'd tar (so that the same files always
//! give the same bytes, and therefore the same content address), and the
//! server uses [`unpack`] to turn an uploaded archive into a revision
//! directory. Because uploaded archives are untrusted, [`unpack`] refuses
//! anything that could write to, or point at, a path outside the destination
//! directory, as well as device files and archives that exceed the server's
//! size limits. [`pack`] needs the `pack` feature, which is on by default.

#[cfg(feature = "pack")]
mod pack;
mod unpack;

#[cfg(feature = "pack")]
pub use pack::{PackError, Packed, pack};
pub use unpack::{Limits, UnpackError, Unpacked, unpack};

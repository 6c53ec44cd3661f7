//! Arbitrary bytes as a `hangar.toml`: parsing must never panic, and every
//! error must be one printable line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hangar_fuzz::check_manifest(data));

//! Arbitrary bytes as an uploaded .tar.gz: unpacking must never panic, write
//! outside its directory or past its limits, or print unsafe errors.
#![no_main]

use archive::Limits;
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_unpacked_bytes: 64 * 1024, max_entries: 64 };

fuzz_target!(|data: &[u8]| hangar_fuzz::check_unpack(data, &LIMITS));

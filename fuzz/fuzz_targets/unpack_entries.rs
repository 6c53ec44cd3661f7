//! A tar built from arbitrary entries (files, directories, symlinks, hard
//! links and odd types, with clashing, long and hostile names), gzip'd and
//! unpacked, with the same checks as the `unpack` target.
#![no_main]

use hangar_fuzz::ArchiveSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|spec: ArchiveSpec| hangar_fuzz::check_unpack(&spec.to_tar_gz(), &spec.limits()));

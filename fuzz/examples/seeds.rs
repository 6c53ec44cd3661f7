//! Writes the seed corpora in `fuzz/seeds/`: `cargo run --example seeds` in
//! `fuzz/`. Every seed is made here, from fixed data or a fixed
//! pseudo-random sequence, so running it again gives the same files.

use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use hangar_fuzz::{ArchiveSpec, KindSpec, NameEncoding, Part, append_raw, gzip, pax_record};
use tar::EntryType;

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for target in ["manifest", "unpack", "unpack_entries"] {
        let dir = seeds.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
    }
    for (name, text) in MANIFESTS {
        fs::write(seeds.join("manifest").join(format!("{name}.toml")), text).unwrap();
    }
    for (name, archive) in archives() {
        fs::write(seeds.join("unpack").join(format!("{name}.tar.gz")), archive).unwrap();
    }
    for (name, bytes) in entry_specs() {
        fs::write(seeds.join("unpack_entries").join(name), bytes).unwrap();
    }
}

/// Manifests that are valid, that have each kind of mistake the parser
/// reports, and that use TOML's rarer syntax.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "full",
        r#"name = "echo"                      # app name
command = ["python3", "server.py"]
build = ["python3", "-m", "pip", "install", "-r", "requirements.txt"]
health_path = "/healthz"
env = { MODEL = "tiny", _DEBUG = "1" }

[scaling]
keep_alive = 30
min_concurrency = 1
max_concurrency = 4
concurrency_buffer = 2
concurrency_buffer_perc = 50
scaling_delay = 5
request_timeout = 120

[runner]
max_multiplexing = 8
startup_timeout = 300
machine_type = "gpu-a10"
termination_grace_period = 20
"#,
    ),
    ("minimal", "command = [\"./server\"]\n"),
    (
        "dotted",
        "command = ['./server', '--port', \"8080\"]\nscaling.keep_alive = 5\nrunner.machine_type = 'cpu'\n[env]\n\"MY VAR\" = \"x\"\nA_1 = '''multi\nline'''\n",
    ),
    (
        "mistakes",
        "name = \"Bad_Name\"\ncommand = []\nhealth_path = \"no slash\"\ncolour = 1\n[scaling]\nmin_concurrency = 9\nmax_concurrency = 2\nkeep_alive = -1\nrequest_timeout = 1.5\n[runner]\nmachine_type = \"tpu\"\nmax_multiplexing = 0\n",
    ),
    (
        "types",
        "command = [1, true, 2024-01-01T00:00:00Z]\nbuild = \"make\"\nenv = [\"A\"]\nscaling = 3\n[[runner]]\nx = { y = [inf, nan, 0x1F, 0o17, 0b11, 1_000] }\n",
    ),
    ("syntax", "command = [\"a\"\n[scaling\nkeep_alive = = 5\n\"unterminated\n"),
    // toml_edit 0.23 panicked on this.
    ("descend-path", "==v\n.= "),
];

/// Archives like the CLI makes and like an attacker might.
fn archives() -> Vec<(&'static str, Vec<u8>)> {
    let app = build(&[
        ("app/", EntryType::Directory, "", b""),
        ("app/hangar.toml", EntryType::Regular, "", b"command = [\"python3\", \"server.py\"]\n"),
        ("app/server.py", EntryType::Regular, "", b"print('hello')\n"),
        ("app/static/", EntryType::Directory, "", b""),
        ("app/static/index.html", EntryType::Regular, "", b"<p>hi</p>"),
    ]);
    let links = build(&[
        ("d/", EntryType::Directory, "", b""),
        ("d/f", EntryType::Regular, "", b"data"),
        ("d/up", EntryType::Symlink, "..", b""),
        ("s", EntryType::Symlink, "d/f", b""),
        ("dangling", EntryType::Symlink, "nowhere/at/all", b""),
        ("h", EntryType::Link, "d/f", b""),
        ("h2", EntryType::Link, "h", b""),
        ("d/f", EntryType::Link, "d/f", b""),
    ]);
    let hostile = build(&[
        ("../evil", EntryType::Regular, "", b"x"),
        ("/etc/x", EntryType::Regular, "", b"x"),
        ("out", EntryType::Symlink, "../../outside", b""),
        ("a/b/s1", EntryType::Symlink, "../..", b""),
        ("s2", EntryType::Symlink, "a/b/s1/..", b""),
        ("dev", EntryType::Char, "", b""),
        ("fifo", EntryType::Fifo, "", b""),
    ]);
    let mut long = tar::Builder::new(Vec::new());
    let long_name = format!("{}/{}\0", "d".repeat(120), "f".repeat(255));
    append_raw(&mut long, b"././@LongLink", EntryType::GNULongName, b"", long_name.as_bytes(), 0o644);
    append_raw(&mut long, b"placeholder", EntryType::Regular, b"", b"long", 0o644);
    let mut pax = pax_record(b"path", b"pax/name/of/the/link");
    pax.extend(pax_record(b"linkpath", b"../target"));
    append_raw(&mut long, b"pax", EntryType::XHeader, b"", &pax, 0o644);
    append_raw(&mut long, b"placeholder", EntryType::Symlink, b"", b"", 0o777);
    append_raw(&mut long, b"global", EntryType::XGlobalHeader, b"", &pax_record(b"comment", b"anything"), 0o644);
    let long = gzip(&long.into_inner().unwrap());
    let limits = build(&[
        ("big", EntryType::Regular, "", &[7u8; 70 * 1024]),
        ("dir-with-data/", EntryType::Directory, "", &[0u8; 4096]),
    ]);
    vec![
        ("app", app),
        ("links", links),
        ("hostile", hostile),
        ("long-names", long),
        ("over-limits", limits),
        ("empty", gzip(&[0u8; 1024])),
    ]
}

/// A gzip'd tar of `(name, type, link target, data)` entries.
fn build(entries: &[(&str, EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        append_raw(&mut builder, name.as_bytes(), *kind, link.as_bytes(), data, 0o755);
    }
    gzip(&builder.into_inner().unwrap())
}

/// Inputs for the structured target. Arbitrary's decoding cannot be run
/// backwards, so these are found instead: pseudo-random byte strings from a
/// fixed sequence, each kept because it decodes to an archive with a
/// feature that the seeds kept so far lack.
fn entry_specs() -> Vec<(String, Vec<u8>)> {
    let features: &[Feature] = &[
        ("file-in-dir", |a| {
            a.entries.iter().any(|e| matches!(e.kind, KindSpec::File(_)) && e.path.parts.len() >= 2)
                && a.entries.iter().any(|e| matches!(e.kind, KindSpec::Dir))
        }),
        ("symlink", |a| a.entries.iter().any(|e| matches!(e.kind, KindSpec::Symlink(_)))),
        ("hard-link", |a| a.entries.iter().any(|e| matches!(e.kind, KindSpec::HardLink(_)))),
        ("dir-with-data", |a| a.entries.iter().any(|e| matches!(e.kind, KindSpec::DirWithData(_)))),
        ("other-type", |a| a.entries.iter().any(|e| matches!(e.kind, KindSpec::Other { .. }))),
        ("pax", |a| a.entries.iter().any(|e| matches!(e.encoding, NameEncoding::Pax))),
        ("gnu-long", |a| {
            a.entries.iter().any(|e| {
                matches!(e.encoding, NameEncoding::GnuLong) && e.path.parts.iter().any(|p| matches!(p, Part::Long(_)))
            })
        }),
        ("dot-dot", |a| a.entries.iter().any(|e| e.path.parts.iter().any(|p| matches!(p, Part::DotDot)))),
        ("many-entries", |a| a.entries.len() >= 6),
    ];
    let mut random = SplitMix64(0x6861_6e67_6172);
    let mut seeds = Vec::new();
    for (name, has) in features {
        let bytes = loop {
            let len = 64 + (random.next() % 448) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
            if let Ok(spec) = ArchiveSpec::arbitrary_take_rest(Unstructured::new(&bytes))
                && has(&spec)
            {
                break bytes;
            }
        };
        seeds.push((name.to_string(), bytes));
    }
    seeds
}

/// A name for a seed and a test of whether an archive has what it is named for.
type Feature = (&'static str, fn(&ArchiveSpec) -> bool);

/// A small, fixed pseudo-random sequence (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

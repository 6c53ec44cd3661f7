//! The `hangar.toml` app manifest: its typed form, parsing and validation.
//!
//! Parsing walks the `toml_edit` document by hand instead of deserialising it
//! so that every problem in the file can be reported in one pass, each with
//! the dotted key and the line it is on. Users fix all their mistakes at once
//! instead of playing whack-a-mole with one error per deploy.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use toml_edit::{Document, Item, Key, TableLike, Value};

/// The largest number of seconds any duration in a manifest may be (ten years).
pub const MAX_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// The file name of the manifest, used as the prefix of every error message.
pub const MANIFEST_FILE: &str = "hangar.toml";

/// The longest app name accepted, so that a name fits in a DNS label.
const MAX_APP_NAME_LEN: usize = 63;

/// The largest accepted `concurrency_buffer_perc`; anything above is almost
/// certainly a typo and would make the autoscaler provision absurd capacity.
const MAX_BUFFER_PERC: u32 = 1000;

/// A parsed and validated `hangar.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The app name, if the file names one; the CLI's `--app-name` overrides it.
    pub name: Option<String>,
    /// The program and arguments that start the HTTP server.
    pub command: Vec<String>,
    /// An optional command run once when the revision is built.
    pub build: Option<Vec<String>>,
    /// The path polled to decide whether a runner is healthy.
    pub health_path: String,
    /// Extra environment variables for the build and the runners.
    pub env: BTreeMap<String, String>,
    /// Autoscaling settings, which can be changed without a new revision.
    pub scaling: Scaling,
    /// Settings that are tied to the code of the revision.
    pub runner: RunnerSpec,
    /// `[runner] secrets`: the only team secrets its runners receive; `None`: all of them.
    pub secrets: Option<Vec<String>>,
    /// `[runner] health_*`: how its runners' health is checked; unset ones take the
    /// server's defaults.
    pub health: HealthSettings,
}

/// How a revision's runners are health-checked once they serve. Seconds; `None` takes
/// the server's default (`--health-interval`, `--failure-threshold`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthSettings {
    /// Time between checks.
    pub interval: Option<u64>,
    /// How long one check may take.
    pub timeout: Option<u64>,
    /// Failed checks in a row after which a runner is given up.
    pub failure_threshold: Option<u32>,
    /// After a runner is first healthy, failed checks do not count for this long.
    pub start_period: Option<u64>,
}

/// Autoscaling settings from `[scaling]`. Durations are in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaling {
    /// How long an idle runner is kept before it is stopped.
    pub keep_alive: u64,
    /// The number of runners kept even when there is no traffic.
    pub min_concurrency: u32,
    /// The most runners that may exist at once.
    pub max_concurrency: u32,
    /// Spare runners kept on top of what current traffic needs.
    pub concurrency_buffer: u32,
    /// Spare capacity as a percentage of what current traffic needs.
    pub concurrency_buffer_perc: u32,
    /// How long demand must persist before scaling up.
    pub scaling_delay: u64,
    /// How long a single request may take before it is cut off.
    pub request_timeout: u64,
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            keep_alive: 60,
            min_concurrency: 0,
            max_concurrency: 10,
            concurrency_buffer: 0,
            concurrency_buffer_perc: 0,
            scaling_delay: 0,
            request_timeout: 3600,
        }
    }
}

/// Runner settings from `[runner]`. Durations are in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSpec {
    /// How many requests one runner handles concurrently.
    pub max_multiplexing: u32,
    /// How long a new runner may take to become healthy.
    pub startup_timeout: u64,
    /// Which of the server's machine types runners are placed on: one name, or several
    /// separated by commas in order of preference (the first with room wins).
    pub machine_type: String,
    /// Whole GPUs each runner holds; `None`: as many as its machine type gives.
    pub num_gpus: Option<u32>,
    /// How long a runner is given to exit after being asked to stop.
    pub termination_grace_period: u64,
}

impl Default for RunnerSpec {
    fn default() -> Self {
        Self {
            max_multiplexing: 1,
            startup_timeout: 600,
            machine_type: "cpu".to_owned(),
            num_gpus: None,
            termination_grace_period: 10,
        }
    }
}

impl RunnerSpec {
    /// The machine types a runner may be placed on, in order of preference.
    pub fn machine_types(&self) -> impl Iterator<Item = &str> {
        machine_type_list(&self.machine_type)
    }
}

/// The names in a `machine_type` value as it is stored: comma-separated, in order of
/// preference.
pub fn machine_type_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
}

/// One problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The dotted key, e.g. `scaling.keep_alive`; empty for TOML syntax errors.
    pub key: String,
    /// The 1-based line, when the problem can be tied to one.
    pub line: Option<usize>,
    /// What is wrong, phrased to follow the key.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MANIFEST_FILE)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a manifest, ordered by line. Never empty when
/// returned by [`Manifest::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses and validates a manifest, reporting every problem at once.
    ///
    /// `machine_types` lists the machine types the server defines; `None`
    /// skips that check, because the CLI does not know them.
    pub fn parse(source: &str, machine_types: Option<&[&str]>) -> Result<Manifest, ManifestErrors> {
        let document = match Document::parse(source) {
            Ok(document) => document,
            Err(error) => {
                let checker = Checker::new(source);
                // The parser's message is a single sentence; newlines are
                // flattened anyway so that the one-line-per-error format holds.
                let message = error.message().replace('\n', " ");
                return Err(ManifestErrors(vec![ManifestError {
                    key: String::new(),
                    line: checker.line_of(error.span()),
                    message: format!("invalid TOML: {message}"),
                }]));
            }
        };

        let mut checker = Checker::new(source);
        let manifest = checker.manifest(document.as_table(), machine_types);
        let mut errors = checker.errors;
        if errors.is_empty() {
            Ok(manifest)
        } else {
            // A stable sort keeps errors on the same line in the order they
            // were found; errors without a line (missing keys) go last.
            errors.sort_by_key(|e| (e.line.is_none(), e.line));
            Err(ManifestErrors(errors))
        }
    }
}

/// Checks an app name: 1 to 63 lowercase ASCII letters, digits and '-',
/// starting with a letter or digit and not ending with '-'. The rules are
/// those of a DNS label, because app names end up in host names.
pub fn validate_app_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("app name must not be empty".to_owned());
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("app name {name:?} may only contain lowercase letters, digits and '-'"));
    }
    // Only ASCII is left at this point, so the byte length is the character count.
    if name.len() > MAX_APP_NAME_LEN {
        return Err(format!("app name {name:?} is too long ({} characters, at most {MAX_APP_NAME_LEN})", name.len()));
    }
    if name.starts_with('-') {
        return Err(format!("app name {name:?} must start with a lowercase letter or digit"));
    }
    if name.ends_with('-') {
        return Err(format!("app name {name:?} must not end with '-'"));
    }
    Ok(())
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`. Anything
/// else cannot be referenced from a shell and is rejected by some runtimes.
pub fn validate_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("environment variable name must not be empty".to_owned());
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("environment variable name {name:?} may only contain letters, digits and '_'"));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("environment variable name {name:?} must not start with a digit"));
    }
    Ok(())
}

/// Where a value sits in the file: its dotted key and its line.
#[derive(Debug, Clone)]
struct Loc {
    key: String,
    line: Option<usize>,
}

impl Loc {
    /// The location of an array element, which reuses the array's line when
    /// the element has no span of its own.
    fn element(&self, index: usize, line: Option<usize>) -> Loc {
        Loc { key: format!("{}[{index}]", self.key), line: line.or(self.line) }
    }
}

/// Walks a parsed document, building the manifest and collecting errors.
struct Checker<'s> {
    source: &'s str,
    errors: Vec<ManifestError>,
}

impl<'s> Checker<'s> {
    fn new(source: &'s str) -> Self {
        Self { source, errors: Vec::new() }
    }

    /// Turns a byte span into a 1-based line number.
    fn line_of(&self, span: Option<Range<usize>>) -> Option<usize> {
        let start = span?.start.min(self.source.len());
        let newlines = self.source.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count();
        Some(newlines + 1)
    }

    fn error(&mut self, loc: &Loc, message: impl Into<String>) {
        self.errors.push(ManifestError { key: loc.key.clone(), line: loc.line, message: message.into() });
    }

    /// The location of `key` inside the table at `parent`. The key's own span
    /// is preferred because it is where the user wrote the name; the value's
    /// span is the fallback for keys the parser did not record a span for.
    fn loc(&self, parent: &str, key: &Key, item: &Item) -> Loc {
        let mut path = parent.to_owned();
        if !path.is_empty() {
            path.push('.');
        }
        push_key_segment(&mut path, key.get());
        let line = self.line_of(key.span()).or_else(|| self.line_of(item.span()));
        Loc { key: path, line }
    }

    fn manifest(&mut self, root: &dyn TableLike, machine_types: Option<&[&str]>) -> Manifest {
        let mut manifest = Manifest {
            name: None,
            command: Vec::new(),
            build: None,
            health_path: "/health".to_owned(),
            env: BTreeMap::new(),
            scaling: Scaling::default(),
            runner: RunnerSpec::default(),
            secrets: None,
            health: HealthSettings::default(),
        };
        let mut saw_command = false;

        for (key, item) in entries(root) {
            let loc = self.loc("", key, item);
            match key.get() {
                "name" => {
                    if let Some(name) = self.string(&loc, item) {
                        match validate_app_name(name) {
                            Ok(()) => manifest.name = Some(name.to_owned()),
                            Err(message) => self.error(&loc, message),
                        }
                    }
                }
                "command" => {
                    saw_command = true;
                    if let Some(command) = self.command(&loc, item) {
                        manifest.command = command;
                    }
                }
                "build" => manifest.build = self.command(&loc, item),
                "health_path" => {
                    if let Some(path) = self.string(&loc, item) {
                        match check_health_path(path) {
                            Ok(()) => manifest.health_path = path.to_owned(),
                            Err(message) => self.error(&loc, message),
                        }
                    }
                }
                "env" => manifest.env = self.env(&loc, item),
                "scaling" => manifest.scaling = self.scaling(&loc, item),
                "runner" => {
                    let (secrets, health) = (&mut manifest.secrets, &mut manifest.health);
                    manifest.runner = self.runner(&loc, item, machine_types, secrets, health);
                }
                _ => self.error(&loc, "unknown key"),
            }
        }

        if !saw_command {
            let loc = Loc { key: "command".to_owned(), line: None };
            self.error(&loc, r#"is required, e.g. command = ["python3", "server.py"]"#);
        }
        manifest
    }

    fn scaling(&mut self, loc: &Loc, item: &Item) -> Scaling {
        let mut scaling = Scaling::default();
        let Some(table) = self.table(loc, item) else {
            return scaling;
        };
        // The min/max comparison is only meaningful when both values parsed;
        // otherwise a typo in one would also be reported as a conflict.
        let mut min_loc = None;
        let mut max_ok = true;

        for (key, item) in entries(table) {
            let loc = self.loc(&loc.key, key, item);
            match key.get() {
                "keep_alive" => set(&mut scaling.keep_alive, self.u64(&loc, item, 0)),
                "min_concurrency" => {
                    if let Some(v) = self.u32(&loc, item, 0, u32::MAX) {
                        scaling.min_concurrency = v;
                        min_loc = Some(loc);
                    }
                }
                "max_concurrency" => match self.u32(&loc, item, 0, u32::MAX) {
                    Some(v) => scaling.max_concurrency = v,
                    None => max_ok = false,
                },
                "concurrency_buffer" => set(&mut scaling.concurrency_buffer, self.u32(&loc, item, 0, u32::MAX)),
                "concurrency_buffer_perc" => {
                    set(&mut scaling.concurrency_buffer_perc, self.u32(&loc, item, 0, MAX_BUFFER_PERC))
                }
                "scaling_delay" => set(&mut scaling.scaling_delay, self.u64(&loc, item, 0)),
                "request_timeout" => set(&mut scaling.request_timeout, self.u64(&loc, item, 1)),
                _ => self.error(&loc, "unknown key"),
            }
        }

        if let Some(min_loc) = min_loc
            && max_ok
            && scaling.min_concurrency > scaling.max_concurrency
        {
            self.error(
                &min_loc,
                format!(
                    "min_concurrency ({}) must not exceed max_concurrency ({})",
                    scaling.min_concurrency, scaling.max_concurrency
                ),
            );
        }
        scaling
    }

    fn runner(
        &mut self,
        loc: &Loc,
        item: &Item,
        machine_types: Option<&[&str]>,
        secrets: &mut Option<Vec<String>>,
        health: &mut HealthSettings,
    ) -> RunnerSpec {
        let mut runner = RunnerSpec::default();
        let Some(table) = self.table(loc, item) else {
            return runner;
        };

        for (key, item) in entries(table) {
            let loc = self.loc(&loc.key, key, item);
            match key.get() {
                "max_multiplexing" => set(&mut runner.max_multiplexing, self.u32(&loc, item, 1, u32::MAX)),
                "startup_timeout" => set(&mut runner.startup_timeout, self.u64(&loc, item, 1)),
                "machine_type" => {
                    if let Some(names) = self.machine_types(&loc, item) {
                        match names.iter().try_for_each(|name| check_machine_type(name, machine_types)) {
                            Ok(()) => runner.machine_type = names.join(","),
                            Err(message) => self.error(&loc, message),
                        }
                    }
                }
                "num_gpus" => runner.num_gpus = self.u32(&loc, item, 0, MAX_GPUS),
                "termination_grace_period" => set(&mut runner.termination_grace_period, self.u64(&loc, item, 0)),
                "secrets" => *secrets = self.secret_names(&loc, item),
                "health_interval" => health.interval = self.u64(&loc, item, 1),
                "health_timeout" => health.timeout = self.u64(&loc, item, 1),
                "health_failure_threshold" => health.failure_threshold = self.u32(&loc, item, 1, 1000),
                "health_start_period" => health.start_period = self.u64(&loc, item, 0),
                _ => self.error(&loc, "unknown key"),
            }
        }
        runner
    }

    fn env(&mut self, loc: &Loc, item: &Item) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(table) = self.table(loc, item) else {
            return env;
        };
        for (key, item) in entries(table) {
            let loc = self.loc(&loc.key, key, item);
            let name_ok = match validate_env_name(key.get()) {
                Ok(()) => true,
                Err(message) => {
                    self.error(&loc, message);
                    false
                }
            };
            // The value is checked even when the name is bad, so that both
            // mistakes on one line are reported together.
            if let Some(value) = self.string(&loc, item)
                && name_ok
            {
                env.insert(key.get().to_owned(), value.to_owned());
            }
        }
        env
    }

    /// Parses `command` or `build`: a non-empty array of strings whose first
    /// element (the program) is not empty.
    fn command(&mut self, loc: &Loc, item: &Item) -> Option<Vec<String>> {
        let Some(array) = item.as_array() else {
            self.error(loc, format!("expected an array of strings, got {}", describe(item)));
            return None;
        };
        if array.is_empty() {
            self.error(loc, "must not be empty");
            return None;
        }
        let mut words = Vec::with_capacity(array.len());
        let mut ok = true;
        for (index, value) in array.iter().enumerate() {
            match value.as_str() {
                Some(word) => words.push(word.to_owned()),
                None => {
                    let element = loc.element(index, self.line_of(value.span()));
                    self.error(&element, format!("expected a string, got {}", describe_value(value)));
                    ok = false;
                }
            }
        }
        if ok && words[0].is_empty() {
            let first = array.get(0).and_then(Value::span);
            self.error(&loc.element(0, self.line_of(first)), "the program name must not be empty");
            ok = false;
        }
        ok.then_some(words)
    }

    /// Accepts both `[section]` tables and inline tables, which users treat as
    /// interchangeable.
    fn table<'i>(&mut self, loc: &Loc, item: &'i Item) -> Option<&'i dyn TableLike> {
        let table = item.as_table_like();
        if table.is_none() {
            self.error(loc, format!("expected a table, got {}", describe(item)));
        }
        table
    }

    /// `machine_type`: a name, or a non-empty array of distinct names.
    fn machine_types<'i>(&mut self, loc: &Loc, item: &'i Item) -> Option<Vec<&'i str>> {
        let Some(array) = item.as_array() else {
            if item.as_str().is_none() {
                self.error(loc, format!("expected a string or an array of strings, got {}", describe(item)));
            }
            return item.as_str().map(|name| vec![name]);
        };
        let names: Option<Vec<&str>> = array.iter().map(|v| v.as_str()).collect();
        let Some(names) = names.filter(|n| !n.is_empty()) else {
            self.error(loc, "expected a string or a non-empty array of strings");
            return None;
        };
        if let Some(name) = names.iter().enumerate().find_map(|(i, name)| names[..i].contains(name).then_some(name)) {
            self.error(loc, format!("machine type {name:?} is listed twice"));
            return None;
        }
        Some(names)
    }

    /// An array of secret names (environment variable names), each once; may be empty.
    fn secret_names(&mut self, loc: &Loc, item: &Item) -> Option<Vec<String>> {
        let Some(names) = item.as_array().and_then(|a| a.iter().map(|v| v.as_str()).collect::<Option<Vec<&str>>>())
        else {
            self.error(loc, format!("expected an array of secret names, got {}", describe(item)));
            return None;
        };
        for (i, name) in names.iter().enumerate() {
            if let Err(message) = validate_env_name(name) {
                self.error(loc, message);
                return None;
            }
            if names[..i].contains(name) {
                self.error(loc, format!("secret {name:?} is listed twice"));
                return None;
            }
        }
        Some(names.into_iter().map(str::to_owned).collect())
    }

    fn string<'i>(&mut self, loc: &Loc, item: &'i Item) -> Option<&'i str> {
        let string = item.as_str();
        if string.is_none() {
            self.error(loc, format!("expected a string, got {}", describe(item)));
        }
        string
    }

    /// Parses an integer in `min..=max`.
    fn integer(&mut self, loc: &Loc, item: &Item, min: u64, max: u64) -> Option<u64> {
        let Some(value) = item.as_integer() else {
            self.error(loc, format!("expected an integer, got {}", describe(item)));
            return None;
        };
        let Ok(value) = u64::try_from(value) else {
            let message = if min == 0 {
                format!("must be a non-negative integer, got {value}")
            } else {
                format!("must be at least {min}, got {value}")
            };
            self.error(loc, message);
            return None;
        };
        if value < min {
            self.error(loc, format!("must be at least {min}, got {value}"));
            return None;
        }
        if value > max {
            self.error(loc, format!("must be at most {max}, got {value}"));
            return None;
        }
        Some(value)
    }

    /// A number of seconds. Capped at ten years so that no caller can overflow when
    /// it adds one to a clock reading.
    fn u64(&mut self, loc: &Loc, item: &Item, min: u64) -> Option<u64> {
        self.integer(loc, item, min, MAX_SECONDS)
    }

    fn u32(&mut self, loc: &Loc, item: &Item, min: u32, max: u32) -> Option<u32> {
        let value = self.integer(loc, item, min.into(), max.into())?;
        // The range check above guarantees the value fits.
        u32::try_from(value).ok()
    }
}

/// Overwrites a default only when the value was valid, so that a bad value
/// leaves the default in place while its error is reported.
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

/// The entries of a table with their keys, which carry the spans that the
/// plain `(&str, &Item)` iterator lacks.
fn entries(table: &dyn TableLike) -> Vec<(&Key, &Item)> {
    table.iter().filter_map(|(name, _)| table.get_key_value(name)).collect()
}

fn check_health_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("must start with '/', got {path:?}"));
    }
    // The path goes verbatim into an HTTP request line, where whitespace and
    // control characters would corrupt the request.
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("must not contain whitespace or control characters, got {path:?}"));
    }
    Ok(())
}

/// The most GPUs a runner may ask for.
pub const MAX_GPUS: u32 = 1024;

fn check_machine_type(machine_type: &str, known: Option<&[&str]>) -> Result<(), String> {
    if machine_type.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if machine_type.contains(',') {
        return Err(format!("machine type {machine_type:?} must not contain a comma"));
    }
    match known {
        Some(known) if !known.contains(&machine_type) => {
            let defined = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
            Err(format!("unknown machine type {machine_type:?} (this server defines: {defined})"))
        }
        _ => Ok(()),
    }
}

/// Appends one key segment, quoting it when it is not a TOML bare key so the
/// dotted path stays unambiguous (e.g. `env."MY VAR"`).
fn push_key_segment(path: &mut String, segment: &str) {
    let bare = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        path.push_str(segment);
    } else {
        path.push_str(&format!("{segment:?}"));
    }
}

/// Names the type of an item with an article, for "expected X, got Y".
fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(value) => describe_value(value),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn describe_value(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    /// The machine types the test "server" defines.
    const MACHINE_TYPES: &[&str] = &["cpu", "gpu-a10"];

    /// Removes the leading newline and the common indentation, so that test
    /// manifests can be indented with the code while line 1 of the manifest
    /// is its first real line.
    fn dedent(source: &str) -> String {
        let source = source.strip_prefix('\n').unwrap_or(source);
        let indent =
            source.lines().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
        source.lines().map(|l| l.get(indent..).unwrap_or("").trim_end()).collect::<Vec<_>>().join("\n") + "\n"
    }

    fn render(source: &str, machine_types: Option<&[&str]>) -> String {
        match Manifest::parse(&dedent(source), machine_types) {
            Ok(manifest) => format!("{manifest:#?}"),
            Err(errors) => errors.to_string(),
        }
    }

    fn check(source: &str, expect: Expect) {
        expect.assert_eq(&render(source, Some(MACHINE_TYPES)));
    }

    fn check_without_machine_types(source: &str, expect: Expect) {
        expect.assert_eq(&render(source, None));
    }

    #[test]
    fn full_example() {
        check(
            r#"
            name = "echo"                      # app name
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
            expect![[r#"
                Manifest {
                    name: Some(
                        "echo",
                    ),
                    command: [
                        "python3",
                        "server.py",
                    ],
                    build: Some(
                        [
                            "python3",
                            "-m",
                            "pip",
                            "install",
                            "-r",
                            "requirements.txt",
                        ],
                    ),
                    health_path: "/healthz",
                    env: {
                        "MODEL": "tiny",
                        "_DEBUG": "1",
                    },
                    scaling: Scaling {
                        keep_alive: 30,
                        min_concurrency: 1,
                        max_concurrency: 4,
                        concurrency_buffer: 2,
                        concurrency_buffer_perc: 50,
                        scaling_delay: 5,
                        request_timeout: 120,
                    },
                    runner: RunnerSpec {
                        max_multiplexing: 8,
                        startup_timeout: 300,
                        machine_type: "gpu-a10",
                        num_gpus: None,
                        termination_grace_period: 20,
                    },
                    secrets: None,
                    health: HealthSettings {
                        interval: None,
                        timeout: None,
                        failure_threshold: None,
                        start_period: None,
                    },
                }"#]],
        );
    }

    #[test]
    fn defaults_fill_in() {
        check(
            r#"command = ["./server"]"#,
            expect![[r#"
                Manifest {
                    name: None,
                    command: [
                        "./server",
                    ],
                    build: None,
                    health_path: "/health",
                    env: {},
                    scaling: Scaling {
                        keep_alive: 60,
                        min_concurrency: 0,
                        max_concurrency: 10,
                        concurrency_buffer: 0,
                        concurrency_buffer_perc: 0,
                        scaling_delay: 0,
                        request_timeout: 3600,
                    },
                    runner: RunnerSpec {
                        max_multiplexing: 1,
                        startup_timeout: 600,
                        machine_type: "cpu",
                        num_gpus: None,
                        termination_grace_period: 10,
                    },
                    secrets: None,
                    health: HealthSettings {
                        interval: None,
                        timeout: None,
                        failure_threshold: None,
                        start_period: None,
                    },
                }"#]],
        );
    }

    #[test]
    fn dotted_keys_and_env_section() {
        check(
            r#"
            command = ["./server"]
            scaling.keep_alive = 5
            runner = { machine_type = "cpu" }

            [env]
            A = "1"
            "#,
            expect![[r#"
                Manifest {
                    name: None,
                    command: [
                        "./server",
                    ],
                    build: None,
                    health_path: "/health",
                    env: {
                        "A": "1",
                    },
                    scaling: Scaling {
                        keep_alive: 5,
                        min_concurrency: 0,
                        max_concurrency: 10,
                        concurrency_buffer: 0,
                        concurrency_buffer_perc: 0,
                        scaling_delay: 0,
                        request_timeout: 3600,
                    },
                    runner: RunnerSpec {
                        max_multiplexing: 1,
                        startup_timeout: 600,
                        machine_type: "cpu",
                        num_gpus: None,
                        termination_grace_period: 10,
                    },
                    secrets: None,
                    health: HealthSettings {
                        interval: None,
                        timeout: None,
                        failure_threshold: None,
                        start_period: None,
                    },
                }"#]],
        );
    }

    #[test]
    fn machine_type_not_checked_without_a_list() {
        check_without_machine_types(
            r#"
            command = ["./server"]
            runner.machine_type = "gpu-h100"
            "#,
            expect![[r#"
                Manifest {
                    name: None,
                    command: [
                        "./server",
                    ],
                    build: None,
                    health_path: "/health",
                    env: {},
                    scaling: Scaling {
                        keep_alive: 60,
                        min_concurrency: 0,
                        max_concurrency: 10,
                        concurrency_buffer: 0,
                        concurrency_buffer_perc: 0,
                        scaling_delay: 0,
                        request_timeout: 3600,
                    },
                    runner: RunnerSpec {
                        max_multiplexing: 1,
                        startup_timeout: 600,
                        machine_type: "gpu-h100",
                        num_gpus: None,
                        termination_grace_period: 10,
                    },
                    secrets: None,
                    health: HealthSettings {
                        interval: None,
                        timeout: None,
                        failure_threshold: None,
                        start_period: None,
                    },
                }"#]],
        );
    }

    #[test]
    fn syntax_error() {
        check(
            r#"
            command = ["./server"]
            [scaling]
            keep_alive = = 5
            "#,
            expect!["hangar.toml:3: invalid TOML: extra `=`, expected nothing"],
        );
    }

    #[test]
    fn unterminated_string() {
        check(
            r#"
            name = "echo
            command = ["./server"]
            "#,
            expect![[r#"hangar.toml:1: invalid TOML: invalid basic string, expected `"`"#]],
        );
    }

    #[test]
    fn duplicate_key() {
        check(
            r#"
            command = ["./server"]
            command = ["./other"]
            "#,
            expect!["hangar.toml:2: invalid TOML: duplicate key"],
        );
    }

    #[test]
    fn empty_file() {
        check("", expect![[r#"hangar.toml: command: is required, e.g. command = ["python3", "server.py"]"#]]);
    }

    #[test]
    fn unknown_keys() {
        check(
            r#"
            command = ["./server"]
            colour = "blue"
            [scaling]
            colour = "red"
            [runner]
            colour = "green"
            [extra]
            x = 1
            "#,
            expect![[r#"
                hangar.toml:2: colour: unknown key
                hangar.toml:4: scaling.colour: unknown key
                hangar.toml:6: runner.colour: unknown key
                hangar.toml:7: extra: unknown key"#]],
        );
    }

    #[test]
    fn nested_tables_are_unknown_keys() {
        check(
            r#"
            command = ["./server"]
            [scaling.extra]
            x = 1
            [runner]
            machine_type = { name = "cpu" }
            "#,
            expect![[r#"
                hangar.toml:2: scaling.extra: unknown key
                hangar.toml:5: runner.machine_type: expected a string or an array of strings, got a table"#]],
        );
    }

    #[test]
    fn three_bad_keys_are_all_reported() {
        check(
            r#"
            command = ["./server"]

            [scaling]
            keep_alive = "60"
            max_concurrency = 2

            [runner]
            max_multiplexing = 0
            machine_type = "gpu-h100"
            "#,
            expect![[r#"
                hangar.toml:4: scaling.keep_alive: expected an integer, got a string
                hangar.toml:8: runner.max_multiplexing: must be at least 1, got 0
                hangar.toml:9: runner.machine_type: unknown machine type "gpu-h100" (this server defines: cpu, gpu-a10)"#]],
        );
    }

    #[test]
    fn wrong_types() {
        check(
            r#"
            name = 5
            command = "python3 server.py"
            build = ["make", 1, true]
            health_path = ["/health"]
            env = "MODEL=tiny"
            [scaling]
            keep_alive = "60"
            min_concurrency = 1.5
            max_concurrency = true
            scaling_delay = 1979-05-27
            request_timeout = [1]
            [runner]
            machine_type = 1
            startup_timeout = { seconds = 5 }
            "#,
            expect![[r#"
                hangar.toml:1: name: expected a string, got an integer
                hangar.toml:2: command: expected an array of strings, got a string
                hangar.toml:3: build[1]: expected a string, got an integer
                hangar.toml:3: build[2]: expected a string, got a boolean
                hangar.toml:4: health_path: expected a string, got an array
                hangar.toml:5: env: expected a table, got a string
                hangar.toml:7: scaling.keep_alive: expected an integer, got a string
                hangar.toml:8: scaling.min_concurrency: expected an integer, got a float
                hangar.toml:9: scaling.max_concurrency: expected an integer, got a boolean
                hangar.toml:10: scaling.scaling_delay: expected an integer, got a datetime
                hangar.toml:11: scaling.request_timeout: expected an integer, got an array
                hangar.toml:13: runner.machine_type: expected a string or an array of strings, got an integer
                hangar.toml:14: runner.startup_timeout: expected an integer, got a table"#]],
        );
    }

    #[test]
    fn sections_must_be_tables() {
        check(
            r#"
            command = ["./server"]
            scaling = 5
            runner = "big"

            [[env]]
            A = "1"
            "#,
            expect![[r#"
                hangar.toml:2: scaling: expected a table, got an integer
                hangar.toml:3: runner: expected a table, got a string
                hangar.toml:5: env: expected a table, got an array of tables"#]],
        );
    }

    #[test]
    fn negative_and_out_of_range_numbers() {
        check(
            r#"
            command = ["./server"]
            [scaling]
            keep_alive = -1
            min_concurrency = -3
            max_concurrency = 5000000000
            concurrency_buffer_perc = 1001
            request_timeout = 0
            [runner]
            max_multiplexing = -2
            startup_timeout = 0
            "#,
            expect![[r#"
                hangar.toml:3: scaling.keep_alive: must be a non-negative integer, got -1
                hangar.toml:4: scaling.min_concurrency: must be a non-negative integer, got -3
                hangar.toml:5: scaling.max_concurrency: must be at most 4294967295, got 5000000000
                hangar.toml:6: scaling.concurrency_buffer_perc: must be at most 1000, got 1001
                hangar.toml:7: scaling.request_timeout: must be at least 1, got 0
                hangar.toml:9: runner.max_multiplexing: must be at least 1, got -2
                hangar.toml:10: runner.startup_timeout: must be at least 1, got 0"#]],
        );
    }

    #[test]
    fn min_exceeds_max() {
        check(
            r#"
            command = ["./server"]
            [scaling]
            max_concurrency = 2

            min_concurrency = 5
            "#,
            expect!["hangar.toml:5: scaling.min_concurrency: min_concurrency (5) must not exceed max_concurrency (2)"],
        );
    }

    #[test]
    fn min_exceeds_default_max() {
        check(
            r#"
            command = ["./server"]
            scaling.min_concurrency = 11
            "#,
            expect![
                "hangar.toml:2: scaling.min_concurrency: min_concurrency (11) must not exceed max_concurrency (10)"
            ],
        );
    }

    #[test]
    fn min_max_conflict_not_reported_when_max_is_bad() {
        check(
            r#"
            command = ["./server"]
            scaling = { min_concurrency = 5, max_concurrency = -1 }
            "#,
            expect!["hangar.toml:2: scaling.max_concurrency: must be a non-negative integer, got -1"],
        );
    }

    #[test]
    fn empty_commands() {
        check(
            r#"
            name = "echo"
            command = []
            build = []
            "#,
            expect![[r#"
                hangar.toml:2: command: must not be empty
                hangar.toml:3: build: must not be empty"#]],
        );
        check(
            r#"
            command = ["", "server.py"]
            build = ["make", ""]
            "#,
            expect!["hangar.toml:1: command[0]: the program name must not be empty"],
        );
    }

    #[test]
    fn non_string_in_multiline_command() {
        check(
            r#"
            command = [
                "python3",
                8080,
            ]
            "#,
            expect!["hangar.toml:3: command[1]: expected a string, got an integer"],
        );
    }

    #[test]
    fn missing_command() {
        check(
            r#"
            name = "echo"
            [scaling]
            keep_alive = -1
            "#,
            expect![[r#"
                hangar.toml:3: scaling.keep_alive: must be a non-negative integer, got -1
                hangar.toml: command: is required, e.g. command = ["python3", "server.py"]"#]],
        );
    }

    #[test]
    fn unknown_machine_type() {
        check(
            r#"
            command = ["./server"]

            [runner]
            machine_type = "gpu-h100"
            "#,
            expect![[
                r#"hangar.toml:4: runner.machine_type: unknown machine type "gpu-h100" (this server defines: cpu, gpu-a10)"#
            ]],
        );
        check(
            r#"
            command = ["./server"]
            runner.machine_type = ""
            "#,
            expect!["hangar.toml:2: runner.machine_type: must not be empty"],
        );
    }

    #[test]
    fn machine_types_in_order_of_preference_and_a_gpu_count() {
        let manifest = Manifest::parse(
            &dedent(
                r#"
                command = ["./server"]
                [runner]
                machine_type = ["gpu-a10", "cpu"]
                num_gpus = 2
                "#,
            ),
            Some(&["cpu", "gpu-a10"]),
        )
        .unwrap();
        assert_eq!(manifest.runner.machine_types().collect::<Vec<_>>(), ["gpu-a10", "cpu"]);
        assert_eq!(manifest.runner.num_gpus, Some(2));
        let cases = [
            ("machine_type = []", "expected a string or a non-empty array of strings"),
            ("machine_type = [\"cpu\", 1]", "expected a string or a non-empty array of strings"),
            ("machine_type = [\"cpu\", \"cpu\"]", "machine type \"cpu\" is listed twice"),
            ("machine_type = [\"cpu\", \"gpu-h100\"]", "unknown machine type \"gpu-h100\""),
            ("num_gpus = -1", "runner.num_gpus"),
            ("num_gpus = \"one\"", "expected an integer, got a string"),
        ];
        for (line, want) in cases {
            let err =
                Manifest::parse(&format!("command = [\"./server\"]\n[runner]\n{line}\n"), Some(&["cpu", "gpu-a10"]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn bad_health_path() {
        check(
            r#"
            command = ["./server"]
            health_path = "health"
            "#,
            expect![[r#"hangar.toml:2: health_path: must start with '/', got "health""#]],
        );
        check(
            r#"
            command = ["./server"]
            health_path = "/health check"
            "#,
            expect![[
                r#"hangar.toml:2: health_path: must not contain whitespace or control characters, got "/health check""#
            ]],
        );
    }

    #[test]
    fn bad_env() {
        check(
            r#"
            command = ["./server"]
            [env]
            GOOD = "1"
            1BAD = "2"
            "MY-VAR" = 3
            "MY VAR" = "4"
            "" = "5"
            "#,
            expect![[r#"
                hangar.toml:4: env.1BAD: environment variable name "1BAD" must not start with a digit
                hangar.toml:5: env.MY-VAR: environment variable name "MY-VAR" may only contain letters, digits and '_'
                hangar.toml:5: env.MY-VAR: expected a string, got an integer
                hangar.toml:6: env."MY VAR": environment variable name "MY VAR" may only contain letters, digits and '_'
                hangar.toml:7: env."": environment variable name must not be empty"#]],
        );
    }

    #[test]
    fn bad_app_name() {
        check(
            r#"
            name = "Foo_bar"
            command = ["./server"]
            "#,
            expect![[r#"hangar.toml:1: name: app name "Foo_bar" may only contain lowercase letters, digits and '-'"#]],
        );
    }

    #[test]
    fn app_names() {
        let long = "a".repeat(64);
        let max = "a".repeat(63);
        let results: Vec<String> =
            ["echo", "a", "0day", "my-app-2", &max, "", &long, "Foo_bar", "my app", "-echo", "echo-", "ünï"]
                .iter()
                .map(|name| match validate_app_name(name) {
                    Ok(()) => format!("ok: {name}"),
                    Err(message) => message,
                })
                .collect();
        expect![[r#"
            [
                "ok: echo",
                "ok: a",
                "ok: 0day",
                "ok: my-app-2",
                "ok: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "app name must not be empty",
                "app name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" is too long (64 characters, at most 63)",
                "app name \"Foo_bar\" may only contain lowercase letters, digits and '-'",
                "app name \"my app\" may only contain lowercase letters, digits and '-'",
                "app name \"-echo\" must start with a lowercase letter or digit",
                "app name \"echo-\" must not end with '-'",
                "app name \"ünï\" may only contain lowercase letters, digits and '-'",
            ]
        "#]].assert_debug_eq(&results);
    }

    #[test]
    fn env_names() {
        let results: Vec<String> = ["PATH", "_x", "a1_B2", "", "1X", "A-B", "A=B", "É"]
            .iter()
            .map(|name| match validate_env_name(name) {
                Ok(()) => format!("ok: {name}"),
                Err(message) => message,
            })
            .collect();
        expect![[r#"
            [
                "ok: PATH",
                "ok: _x",
                "ok: a1_B2",
                "environment variable name must not be empty",
                "environment variable name \"1X\" must not start with a digit",
                "environment variable name \"A-B\" may only contain letters, digits and '_'",
                "environment variable name \"A=B\" may only contain letters, digits and '_'",
                "environment variable name \"É\" may only contain letters, digits and '_'",
            ]
        "#]]
        .assert_debug_eq(&results);
    }

    #[test]
    fn error_display_without_line() {
        let errors = ManifestErrors(vec![
            ManifestError { key: "command".to_owned(), line: None, message: "is required".to_owned() },
            ManifestError { key: String::new(), line: Some(3), message: "invalid TOML: oops".to_owned() },
        ]);
        expect![[r#"
            hangar.toml: command: is required
            hangar.toml:3: invalid TOML: oops"#]]
        .assert_eq(&errors.to_string());
    }

    /// Renders what [`Manifest::parse`] says about each source, one per
    /// line, without the dedenting that [`check`] does (trailing spaces
    /// matter to some of these inputs).
    fn render_raw(sources: &[&str]) -> String {
        sources
            .iter()
            .map(|source| match Manifest::parse(source, None) {
                Ok(_) => format!("{source:?} => ok"),
                Err(errors) => format!("{source:?} => {errors}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn malformed_keys_are_errors_not_panics() {
        // toml_edit 0.23 panicked ("descend_path") on these, found by the
        // manifest fuzz target; each must be an ordinary syntax error.
        expect![[r#"
            "==v\n.= " => hangar.toml:1: invalid TOML: extra `=`, expected nothing
            "==v\n.=" => hangar.toml:1: invalid TOML: extra `=`, expected nothing
            "==v\n.=1" => hangar.toml:1: invalid TOML: extra `=`, expected nothing
            "[a]\n==v\n.= " => hangar.toml:2: invalid TOML: extra `=`, expected nothing
            "==\n.b.c=1" => hangar.toml:1: invalid TOML: extra `=`, expected nothing"#]]
        .assert_eq(&render_raw(&["==v\n.= ", "==v\n.=", "==v\n.=1", "[a]\n==v\n.= ", "==\n.b.c=1"]));
    }

    #[test]
    fn runner_secrets_name_which_team_secrets_runners_get() {
        let parse = |runner: &str| Manifest::parse(&format!("command = [\"x\"]\n[runner]\n{runner}\n"), None);
        assert_eq!(parse("").unwrap().secrets, None, "all of them, by default");
        assert_eq!(parse("secrets = []").unwrap().secrets, Some(vec![]));
        assert_eq!(
            parse("secrets = [\"HF_TOKEN\", \"DB_URL\"]").unwrap().secrets,
            Some(vec!["HF_TOKEN".to_owned(), "DB_URL".to_owned()])
        );
        for (bad, why) in [
            ("secrets = \"HF_TOKEN\"", "expected an array of secret names"),
            ("secrets = [1]", "expected an array of secret names"),
            ("secrets = [\"bad name\"]", "may only contain"),
            ("secrets = [\"A\", \"A\"]", "listed twice"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("runner.secrets") && err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn runner_health_settings_are_whole_seconds_and_default_to_the_servers() {
        let parse = |runner: &str| Manifest::parse(&format!("command = [\"x\"]\n[runner]\n{runner}\n"), None);
        assert_eq!(parse("").unwrap().health, HealthSettings::default());
        let set = "health_interval = 5\nhealth_timeout = 2\nhealth_failure_threshold = 4\nhealth_start_period = 30";
        let want =
            HealthSettings { interval: Some(5), timeout: Some(2), failure_threshold: Some(4), start_period: Some(30) };
        assert_eq!(parse(set).unwrap().health, want);
        assert_eq!(parse("health_start_period = 0").unwrap().health.start_period, Some(0));
        for bad in
            ["health_interval = 0", "health_timeout = -1", "health_failure_threshold = 0", "health_interval = \"5s\""]
        {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("runner.health_"), "{bad}: {err}");
        }
    }
}

//! Printing for people (tables, colours on a terminal) and for scripts (stable JSON).
//!
//! Everything goes to stdout through [`out!`] and [`write_stdout`], which end the
//! command quietly when the reader has gone (`hangar keys list | head -1`), as Unix
//! tools do, instead of panicking the way `println!` does.

use std::io::{IsTerminal, Write};

use comfy_table::{Table, presets};
use console::Style;
use serde::Serialize;

/// Prints a line to stdout, like `println!`, through [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}
pub(crate) use out;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Pretty,
    Json,
}

pub(crate) struct Printer {
    pub(crate) format: Format,
}

impl Printer {
    pub(crate) fn new(format: Format) -> Printer {
        // Colours only on a terminal, and never when NO_COLOR is set (no-color.org).
        let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        console::set_colors_enabled(colour && std::io::stdout().is_terminal());
        console::set_colors_enabled_stderr(colour && std::io::stderr().is_terminal());
        Printer { format }
    }

    pub(crate) fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    pub(crate) fn json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        out!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }

    /// Prints rows under a header, columns aligned.
    pub(crate) fn table(&self, header: &[&str], rows: Vec<Vec<String>>) {
        if rows.is_empty() {
            return;
        }
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_header(header.iter().map(|h| Style::new().bold().apply_to(h).to_string()));
        for row in rows {
            table.add_row(row);
        }
        for line in table.to_string().lines() {
            out!("{}", line.trim_end());
        }
    }

    /// A line for people; in JSON mode it goes to stderr so stdout stays parseable.
    pub(crate) fn say(&self, line: impl std::fmt::Display) {
        if self.is_json() {
            eprintln!("{line}");
        } else {
            out!("{line}");
        }
    }
}

/// Writes `bytes` to stdout. When the reader has gone (a closed pipe), the command has
/// no one left to answer: it exits at once with success and says nothing, so that
/// `hangar apps list --json | head -c1` neither panics nor prints an error. Any other
/// failure to write ends the command with an error message.
pub(crate) fn write_stdout(bytes: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// A revision status as a coloured badge: "Deployed", "Failed", …
pub(crate) fn status_badge(status: &str) -> String {
    let (label, style) = match status {
        "deployed" => ("Deployed", Style::new().green()),
        "failed" => ("Failed", Style::new().red()),
        "deploying" => ("Deploying", Style::new().yellow()),
        "suspended" => ("Suspended", Style::new().magenta()),
        other => (other, Style::new()),
    };
    style.apply_to(label).to_string()
}

pub(crate) fn current_badge(current: bool) -> String {
    if current { Style::new().cyan().bold().apply_to("Current").to_string() } else { String::new() }
}

/// The first 8 characters of an id, as tables show it.
pub(crate) fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// An RFC 3339 time as `2026-11-21 23:40:12 UTC`.
pub(crate) fn when(rfc3339: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let Ok(t) = time::OffsetDateTime::parse(rfc3339, &Rfc3339) else { return rfc3339.to_owned() };
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.to_offset(time::UtcOffset::UTC).format(&format).unwrap_or_else(|_| rfc3339.to_owned())
}

pub(crate) fn success(text: impl std::fmt::Display) -> String {
    format!("{} {text}", Style::new().green().apply_to("✓"))
}

pub(crate) fn failure(text: impl std::fmt::Display) -> String {
    format!("{} {text}", Style::new().red().apply_to("✗"))
}

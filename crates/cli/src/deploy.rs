//! `hangar deploy`: validate, pack, upload, then follow the build until the revision is
//! Deployed or Failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use api::wire::{DeployJson, DeployParams};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use model::manifest::{MANIFEST_FILE, Manifest, validate_app_name};

use crate::context::Context;
use crate::output::{failure, success};

#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The app's directory (with a hangar.toml at its root)
    #[arg(default_value = ".")]
    path: PathBuf,
    /// App name; overrides the manifest's `name`
    #[arg(long)]
    app_name: Option<String>,
    /// Who may call the app
    #[arg(long, value_parser = ["private", "public", "shared"])]
    auth: Option<String>,
    /// How traffic moves to the new revision
    #[arg(long, value_parser = ["rolling", "recreate"])]
    strategy: Option<String>,
    /// Take runtime-tunable scaling values from the manifest instead of keeping the app's
    #[arg(long)]
    reset_scale: bool,
    /// Watch the new revision after the switch and go back by itself if it answers
    /// clearly worse than the one before (see `apps guard`)
    #[arg(long)]
    guard: bool,
    /// A note kept with the revision, KEY=VALUE (repeatable), shown by list-rev
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// A note stored with the revision
    #[arg(long)]
    message: Option<String>,
    /// Return once the revision exists instead of waiting for it
    #[arg(long)]
    detach: bool,
}

/// Uploads go out in pieces of this size, so the progress bar moves.
const UPLOAD_CHUNK: usize = 64 * 1024;

pub(crate) async fn run(cx: &Context, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let manifest_path = args.path.join(MANIFEST_FILE);
    let source =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?;
    // Checked here too, so that a mistake is reported before anything is uploaded.
    // The server checks again (it also knows which machine types exist).
    let manifest = Manifest::parse(&source, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = match args.app_name.clone().or(manifest.name.clone()) {
        Some(app) => app,
        None => bail!("{MANIFEST_FILE}: name: the app has no name; set `name` or pass --app-name"),
    };
    validate_app_name(&app).map_err(|e| anyhow::anyhow!("{e}"))?;

    let dir = args.path.clone();
    let packed = tokio::task::spawn_blocking(move || archive::pack(&dir))
        .await?
        .with_context(|| format!("cannot pack {}", args.path.display()))?;
    cx.out.say(format!(
        "Packed {} files ({} bytes, {} compressed) from {}",
        packed.files,
        packed.unpacked_bytes,
        packed.bytes.len(),
        args.path.display()
    ));

    let params = DeployParams {
        app_name: Some(app.clone()),
        auth: args.auth.clone(),
        strategy: args.strategy.clone(),
        reset_scale: args.reset_scale,
        message: args.message.clone(),
        guard: args.guard,
        annotations: (!args.annotations.is_empty()).then(|| args.annotations.join("\n")),
    };
    let deployed = upload(cx, &params, packed.bytes).await?;
    for note in &deployed.notes {
        cx.out.say(format!("note: {note}"));
    }
    if args.detach {
        cx.out.say(format!(
            "Revision {} of {app} is deploying; follow it with `hangar apps list-rev {app}`",
            deployed.revision
        ));
        if cx.out.is_json() {
            cx.out.json(&deployed)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(cx, &app, deployed).await
}

async fn upload(cx: &Context, params: &DeployParams, bytes: Vec<u8>) -> anyhow::Result<DeployJson> {
    let bar = if cx.out.is_json() { ProgressBar::hidden() } else { ProgressBar::new(bytes.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("Uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("the template is valid"),
    );
    let bytes = Bytes::from(bytes);
    let chunks: Vec<Bytes> =
        (0..bytes.len()).step_by(UPLOAD_CHUNK).map(|i| bytes.slice(i..(i + UPLOAD_CHUNK).min(bytes.len()))).collect();
    let progress = bar.clone();
    let stream = futures_util::stream::iter(chunks.into_iter().map(move |chunk| {
        progress.inc(chunk.len() as u64);
        Ok::<_, std::io::Error>(chunk)
    }));
    let result = cx.client.deploy(params, reqwest::Body::wrap_stream(stream)).await;
    bar.finish_and_clear();
    Ok(result?)
}

/// Streams the build log and waits until the revision leaves Deploying.
async fn follow(cx: &Context, app: &str, deployed: DeployJson) -> anyhow::Result<ExitCode> {
    let revision = deployed.revision.clone();
    cx.out.say(format!("Revision {revision} is deploying; build output follows"));
    let mut offset = 0;
    let status = loop {
        let rev = cx.client.get_revision(app, &revision).await?;
        // Read the log after the status, so a finished revision's log is read whole.
        loop {
            let chunk = cx.client.revision_log(app, &revision, offset).await?;
            if chunk.data.is_empty() {
                break;
            }
            eprint!("{}", chunk.data);
            offset = chunk.next_offset;
        }
        if rev.status != "deploying" {
            break rev;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let result = DeployJson {
        app: app.to_owned(),
        revision,
        status: status.status.clone(),
        notes: deployed.notes,
        failure: status.failure.clone(),
    };
    if cx.out.is_json() {
        cx.out.json(&result)?;
    }
    if status.status == "deployed" {
        let current = if status.current { " and is now current" } else { "" };
        cx.out.say(success(format!("Revision {} of {app} is deployed{current}", result.revision)));
        Ok(ExitCode::SUCCESS)
    } else {
        let reason = status.failure.unwrap_or_else(|| status.status.clone());
        eprintln!("{}", failure(format!("Revision {} of {app} failed: {reason}", result.revision)));
        Ok(ExitCode::FAILURE)
    }
}

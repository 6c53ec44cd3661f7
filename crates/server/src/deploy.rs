//! Deploy: from an uploaded archive to a Deployed (or Failed) revision.
//!
//! The request handler receives the upload, stores it by content digest, unpacks it
//! into a new revision directory and validates the manifest. Anything wrong up to here
//! is the client's mistake: it is answered with a 4xx and leaves nothing behind. Then
//! the revision is recorded as Deploying and a background job runs the build and makes
//! the revision Deployed and current, or Failed with its reason, while the client
//! follows the log. The app's lock is held from before the revision is recorded until
//! the job ends, so deploys and other changes to one app take turns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::error::{ApiError, ErrorCode};
use api::router::Caller;
use api::wire::{DeployJson, DeployParams};
use axum::body::Body;
use futures_util::StreamExt;
use model::ids::RevisionId;
use model::manifest::{MANIFEST_FILE, Manifest, validate_app_name};
use model::records::{App, Revision};
use model::revision::{AuthMode, RevisionStatus, Strategy};
use sha2::{Digest, Sha256};
use store::{NewApp, NewHistory, Store};
use supervisor::{BuildOutcome, BuildSpec};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedMutexGuard, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Control, internal, remove_dir_logged};
use crate::controller::{Activate, Command};
use crate::fleet::Fleet;
use crate::layout::Layout;
use crate::operate::parse_choice;
use crate::placement::Need;

/// A manifest larger than this is refused before it is parsed.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

impl Control {
    pub(crate) async fn start_deploy(
        &self,
        caller: &Caller,
        params: DeployParams,
        body: Body,
    ) -> Result<DeployJson, ApiError> {
        let strategy = parse_choice("strategy", params.strategy.as_deref(), Strategy::parse, "rolling, recreate")?
            .unwrap_or_default();
        let auth = parse_choice("auth", params.auth.as_deref(), AuthMode::parse, "private, public, shared")?;
        if let Some(name) = &params.app_name {
            validate_app_name(name).map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))?;
        }
        let annotations = model::records::parse_annotations(params.annotations.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))?;

        let upload = self.receive_upload(body).await?;
        let revision_id = RevisionId::new();
        let code_dir = self.layout.revision_code(revision_id);
        let prepared = self.store_and_unpack(upload, revision_id, &code_dir).await;
        let (artifact, manifest_source, manifest) = match prepared {
            Ok(p) => p,
            Err(e) => {
                remove_dir_logged(&self.layout.revision(revision_id)).await;
                return Err(e);
            }
        };
        let name = match params.app_name.clone().or_else(|| manifest.name.clone()) {
            Some(name) => name,
            None => {
                remove_dir_logged(&self.layout.revision(revision_id)).await;
                self.drop_artifact_if_unused(&artifact).await;
                return Err(ApiError::new(
                    ErrorCode::InvalidManifest,
                    format!("{MANIFEST_FILE}: name: the app has no name; set `name` or pass --app-name"),
                ));
            }
        };

        if let Some(missing) = self.missing_secret(caller, &manifest).await? {
            remove_dir_logged(&self.layout.revision(revision_id)).await;
            self.drop_artifact_if_unused(&artifact).await;
            return Err(ApiError::new(
                ErrorCode::InvalidManifest,
                format!(
                    "{MANIFEST_FILE}: runner.secrets: team {:?} has no secret named {missing:?}; \
                     set it first (hangar secrets set {missing}=…)",
                    caller.team
                ),
            ));
        }

        let guard = self.lock_app(caller.team_id, &name).await;
        let recorded = self
            .record_revision(
                caller,
                &name,
                auth,
                &manifest,
                &manifest_source,
                revision_id,
                &artifact,
                &params,
                annotations,
            )
            .await;
        let (app, revision) = match recorded {
            Ok(r) => r,
            Err(e) => {
                remove_dir_logged(&self.layout.revision(revision_id)).await;
                self.drop_artifact_if_unused(&artifact).await;
                return Err(e);
            }
        };
        tracing::info!(app = %name, team = %caller.team, revision = %revision_id, "deploy started");

        let job = DeployJob {
            store: self.store.clone(),
            fleet: self.fleet.clone(),
            team: caller.team.clone(),
            config: self.config.clone(),
            layout: self.layout.clone(),
            cancel: self.shutdown.clone(),
            key_id: caller.key_id.clone(),
            app,
            revision,
            manifest,
            strategy,
            auth,
            reset_scale: params.reset_scale,
            guarded: params.guard,
            _guard: guard,
        };
        self.tasks.spawn(job.run());

        let mut notes = Vec::new();
        if strategy == Strategy::Recreate {
            notes.push(
                "recreate: the alias switches as soon as the build succeeds; the next call starts a runner".to_owned(),
            );
        }
        Ok(DeployJson {
            app: name,
            revision: revision_id.to_string(),
            status: RevisionStatus::Deploying.as_str().to_owned(),
            notes,
            failure: None,
        })
    }

    /// Streams the request body into a temporary file, hashing it on the way and
    /// refusing it as soon as it passes the upload limit.
    async fn receive_upload(&self, body: Body) -> Result<Upload, ApiError> {
        let limit = self.config.max_upload_bytes;
        let path = self.layout.tmp().join(format!("upload-{}", uuid::Uuid::new_v4()));
        let result = async {
            let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::new(ErrorCode::InvalidRequest, format!("the upload was interrupted: {e}"))
                })?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ApiError::new(
                        ErrorCode::ArchiveTooLarge,
                        format!("the upload is larger than this server's limit of {limit} bytes"),
                    ));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(ApiError::internal)?;
            }
            if size == 0 {
                return Err(ApiError::new(
                    ErrorCode::InvalidArchive,
                    "the upload is empty; send the app as a gzip'd tar",
                ));
            }
            file.sync_all().await.map_err(ApiError::internal)?;
            Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
        }
        .await;
        match result {
            Ok(digest) => Ok(Upload { path, digest }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(e)
            }
        }
    }

    /// Moves the upload into the artifact store (keeping the existing copy if the same
    /// code was stored before), unpacks it into the revision's directory and parses its
    /// manifest.
    async fn store_and_unpack(
        &self,
        upload: Upload,
        revision: RevisionId,
        code_dir: &Path,
    ) -> Result<(String, String, Manifest), ApiError> {
        let artifact_path = self.layout.artifact(&upload.digest).ok_or_else(|| ApiError::internal("bad digest"))?;
        {
            let _artifacts = self.artifact_lock.lock().await;
            if tokio::fs::try_exists(&artifact_path).await.map_err(ApiError::internal)? {
                let _ = tokio::fs::remove_file(&upload.path).await;
            } else {
                tokio::fs::rename(&upload.path, &artifact_path).await.map_err(ApiError::internal)?;
            }
        }
        let unpacked = self.unpack(&artifact_path, code_dir).await;
        let manifest = match unpacked {
            Ok(()) => self.read_manifest(code_dir).await,
            Err(e) => Err(e),
        };
        match manifest {
            Ok((source, manifest)) => Ok((upload.digest, source, manifest)),
            Err(e) => {
                tracing::info!(revision = %revision, error = %e, "upload refused");
                self.drop_artifact_if_unused(&upload.digest).await;
                Err(e)
            }
        }
    }

    async fn unpack(&self, artifact: &Path, code_dir: &Path) -> Result<(), ApiError> {
        tokio::fs::create_dir_all(code_dir).await.map_err(ApiError::internal)?;
        let limits = archive::Limits { max_unpacked_bytes: self.config.max_unpacked_bytes, max_entries: 1_000_000 };
        let (artifact, code_dir) = (artifact.to_owned(), code_dir.to_owned());
        let result = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&artifact)?;
            Ok::<_, std::io::Error>(archive::unpack(std::io::BufReader::new(file), &code_dir, &limits))
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
        result.map(drop).map_err(|e| match e {
            archive::UnpackError::TooLarge { .. } => ApiError::new(ErrorCode::ArchiveTooLarge, e.to_string()),
            archive::UnpackError::Io { .. } => ApiError::internal(e),
            _ => ApiError::new(ErrorCode::InvalidArchive, e.to_string()),
        })
    }

    async fn read_manifest(&self, code_dir: &Path) -> Result<(String, Manifest), ApiError> {
        let path = code_dir.join(MANIFEST_FILE);
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidManifest, m);
        let meta = match tokio::fs::symlink_metadata(&path).await {
            Ok(meta) => meta,
            Err(_) => return Err(invalid(format!("the upload has no {MANIFEST_FILE} at its root"))),
        };
        if !meta.is_file() {
            return Err(invalid(format!("{MANIFEST_FILE} must be a regular file")));
        }
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let source = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| invalid(format!("{MANIFEST_FILE} is not readable text: {e}")))?;
        let machine_types: Vec<&str> = self.config.machine_types.keys().map(String::as_str).collect();
        let manifest = Manifest::parse(&source, Some(&machine_types)).map_err(|e| invalid(e.to_string()))?;
        if let Some(why) = self.fleet.shared.capacity.never_fits(Need::of(&manifest.runner)) {
            return Err(invalid(format!("{MANIFEST_FILE}: this server cannot run it: {why}")));
        }
        Ok((source, manifest))
    }

    /// Frees an artifact that an abandoned deploy stored, unless a revision uses it.
    async fn drop_artifact_if_unused(&self, artifact: &str) {
        let _artifacts = self.artifact_lock.lock().await;
        match self.store.artifacts_in_use().await {
            Ok(in_use) if !in_use.iter().any(|a| a == artifact) => self.free_artifact(artifact).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check artifact use"),
        }
    }

    /// The first secret the manifest's `[runner] secrets` names that the team does not have.
    async fn missing_secret(&self, caller: &Caller, manifest: &Manifest) -> Result<Option<String>, ApiError> {
        let Some(wanted) = &manifest.secrets else { return Ok(None) };
        let have = self.store.secrets(caller.team_id).await.map_err(internal)?;
        Ok(wanted.iter().find(|name| !have.iter().any(|s| &s.name == *name)).cloned())
    }

    /// Creates the app if this is its first deploy, and records the new revision as
    /// Deploying.
    #[allow(clippy::too_many_arguments)]
    async fn record_revision(
        &self,
        caller: &Caller,
        name: &str,
        auth: Option<AuthMode>,
        manifest: &Manifest,
        manifest_source: &str,
        id: RevisionId,
        artifact: &str,
        params: &DeployParams,
        annotations: Vec<(String, String)>,
    ) -> Result<(App, Revision), ApiError> {
        let app = match self.store.app_by_name(caller.team_id, name).await.map_err(internal)? {
            Some(app) if app.suspended => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("app {name:?} is suspended; resume it before deploying (hangar apps resume {name})"),
                ));
            }
            Some(app) => app,
            None => self
                .store
                .create_app(NewApp {
                    team_id: caller.team_id,
                    name: name.to_owned(),
                    auth: auth.unwrap_or_default(),
                    scaling: manifest.scaling.clone(),
                    runner: manifest.runner.clone(),
                })
                .await
                .map_err(internal)?,
        };
        // Where servers share the store, the deploy is this server's from here on: it
        // builds the revision and runs the app (the API sends an app's deploys to the
        // server that runs it; a new app is run by the server that made it).
        self.fleet.claim(app.id).await.map_err(|e| {
            ApiError::new(ErrorCode::Conflict, format!("app {name:?} is run by another server right now: {e:#}"))
        })?;
        let revision = Revision {
            id,
            app_id: app.id,
            status: RevisionStatus::Deploying,
            artifact: artifact.to_owned(),
            manifest: manifest_source.to_owned(),
            runner: manifest.runner.clone(),
            message: params.message.clone().filter(|m| !m.is_empty()),
            failure: None,
            created_at: time::OffsetDateTime::now_utc(),
            annotations,
        };
        self.store.insert_revision(revision.clone()).await.map_err(internal)?;
        Ok((app, revision))
    }
}

struct Upload {
    path: PathBuf,
    digest: String,
}

/// The background half of a deploy: build, then switch the alias or record the
/// failure. Owns the app's lock until it ends.
struct DeployJob {
    store: Store,
    fleet: Arc<Fleet>,
    team: String,
    config: Arc<Config>,
    layout: Layout,
    cancel: CancellationToken,
    key_id: String,
    app: App,
    revision: Revision,
    manifest: Manifest,
    strategy: Strategy,
    auth: Option<AuthMode>,
    reset_scale: bool,
    /// The deploy asked for the guard.
    guarded: bool,
    _guard: OwnedMutexGuard<()>,
}

impl DeployJob {
    async fn run(self) {
        let id = self.revision.id;
        let outcome = self.build().await;
        let result = match outcome {
            Ok(BuildOutcome::Succeeded { .. }) => {
                match crate::code::publish(&self.fleet.shared, id, &self.revision.artifact).await {
                    Err(e) => {
                        self.fail(&format!("the built code could not be stored for the other servers: {e:#}")).await
                    }
                    Ok(()) => match self.activate().await {
                        Ok(()) => Ok(()),
                        Err(reason) => self.fail(&reason).await,
                    },
                }
            }
            Ok(BuildOutcome::Failed { reason }) => self.fail(&reason).await,
            Ok(BuildOutcome::Cancelled) => self.fail("interrupted").await,
            Err(e) => self.fail(&format!("the build could not be run: {e}")).await,
        };
        if let Err(e) = result {
            // The revision stays Deploying in the store; the next start of the server
            // marks it Failed ("interrupted"), so it cannot stay Deploying forever.
            tracing::error!(revision = %id, error = %e, "cannot record the end of a deploy");
        }
    }

    async fn build(&self) -> std::io::Result<BuildOutcome> {
        let id = self.revision.id;
        let log_path = self.layout.build_log(id);
        let Some(command) = &self.manifest.build else {
            tokio::fs::write(&log_path, "no build step\n").await?;
            return Ok(BuildOutcome::Succeeded { elapsed: std::time::Duration::ZERO });
        };
        tokio::fs::write(&log_path, format!("$ {}\n", command.join(" "))).await?;
        let sandbox = &*self.fleet.shared.sandbox;
        let confinement = supervisor::Confinement {
            uid: supervisor::team_uid(self.app.team_id.as_bytes()),
            code: self.layout.revision_code(id),
            code_writable: true,
            cache: None,
            home_cache: Some(self.layout.build_cache(self.app.team_id)),
            devices: Vec::new(),
        };
        if let Some(cache) = &confinement.home_cache {
            sandbox.prepare_dir(cache, confinement.uid)?;
        }
        sandbox.hand_over(&confinement.code, confinement.uid)?;
        let spec = BuildSpec {
            command,
            sandbox,
            confinement,
            env: self.build_env(),
            log: &log_path,
            log_limit: self.config.build_log_limit,
            name: id.to_string(),
            pid_file: &self.layout.build_pid(id),
            timeout: self.config.build_timeout,
        };
        let outcome = supervisor::run_build(spec, self.cancel.clone()).await?;
        let summary = match &outcome {
            BuildOutcome::Succeeded { elapsed } => format!("build succeeded in {:.1}s\n", elapsed.as_secs_f64()),
            BuildOutcome::Failed { reason } => format!("{reason}\n"),
            BuildOutcome::Cancelled => "build stopped: the server is shutting down\n".to_owned(),
        };
        let mut log = tokio::fs::OpenOptions::new().append(true).open(&log_path).await?;
        log.write_all(summary.as_bytes()).await?;
        Ok(outcome)
    }

    /// The build sees the manifest's env, the revision's identity and the few host
    /// variables tools need to run; nothing else of the server's environment.
    fn build_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        env.extend(self.manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.push(("HANGAR_APP".to_owned(), self.app.name.clone()));
        env.push((supervisor::REVISION_VAR.to_owned(), self.revision.id.to_string()));
        env
    }

    /// Hands the built revision to the app's controller, which makes it current (for a
    /// rolling deploy once its first runner is set up) and records the change.
    async fn activate(&self) -> Result<(), String> {
        // Runtime-tunable values come from the manifest only on the app's first deploy
        // or when asked to reset; otherwise the app keeps the ones it has.
        let first = self.app.current_revision.is_none();
        let scaling = (first || self.reset_scale).then(|| self.manifest.scaling.clone());
        let mut details = format!("revision {} deployed ({})", self.revision.id, self.strategy.as_str());
        if scaling.is_some() && !first {
            details.push_str("; scaling reset to the manifest's values");
        }
        if let Some(auth) = self.auth {
            details.push_str(&format!("; auth {}", auth.as_str()));
        }
        if let Some(message) = &self.revision.message {
            details.push_str(&format!("; message: {message}"));
        }
        let controller = self.fleet.controller(&self.app, &self.team).await.map_err(|e| {
            tracing::warn!(app = %self.app.name, error = %e, "no controller for the deploy");
            "interrupted".to_owned()
        })?;
        let (reply, answer) = oneshot::channel();
        let sent = controller.send(Command::Activate(Box::new(Activate {
            revision: self.revision.clone(),
            manifest: self.manifest.clone(),
            strategy: self.strategy,
            scaling,
            auth: self.auth,
            guard: self.guarded,
            history: NewHistory {
                app_id: self.app.id,
                action: "deploy".to_owned(),
                key_id: Some(self.key_id.clone()),
                details,
            },
            reply,
        })));
        if !sent {
            return Err("interrupted".to_owned());
        }
        answer.await.unwrap_or_else(|_| Err("interrupted".to_owned()))
    }

    async fn fail(&self, reason: &str) -> store::Result<()> {
        tracing::info!(app = %self.app.name, revision = %self.revision.id, reason, "deploy failed");
        self.store.fail_revision(self.revision.id, reason).await?;
        self.store
            .add_history(NewHistory {
                app_id: self.app.id,
                action: "deploy_failed".to_owned(),
                key_id: Some(self.key_id.clone()),
                details: format!("revision {} failed: {reason}", self.revision.id),
            })
            .await
    }
}

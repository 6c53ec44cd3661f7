//! Revisions' files where servers share the store: the server that built a revision
//! puts its built code (packed) and its upload into the store, and any server that runs
//! it later unpacks the code from there once, and keeps the upload among its artifacts.
//! The store keeps each in parts with its digest, and they go with the revision.

use model::ids::RevisionId;

use store::RevisionFile;

use crate::fleet::Shared;

/// Stores the revision's built code, where servers share the store.
pub(crate) async fn publish(shared: &Shared, id: RevisionId, artifact: &str) -> anyhow::Result<()> {
    if !shared.owners.is_shared() {
        return Ok(());
    }
    let code = shared.layout.revision_code(id);
    let archive = shared.layout.revision(id).join("code.tar.gz");
    let packed = archive.clone();
    let digest = tokio::task::spawn_blocking(move || supervisor::remote::pack_code(&code, &packed)).await??;
    shared.store.put_revision_file(id, RevisionFile::Code, &digest, &archive).await?;
    if let Some(upload) = shared.layout.artifact(artifact).filter(|path| path.exists()) {
        shared.store.put_revision_file(id, RevisionFile::Upload, artifact, &upload).await?;
    }
    Ok(())
}

/// Makes sure the revision's built code is here, fetching it from the store if another
/// server built it.
pub(crate) async fn ensure(shared: &Shared, id: RevisionId) -> anyhow::Result<()> {
    let dest = shared.layout.revision_code(id);
    if !shared.owners.is_shared() || dest.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(shared.layout.revision(id))?;
    let download = shared.layout.tmp().join(format!("code-{id}-{}.tar.gz", uuid::Uuid::new_v4().simple()));
    let fetched = fetch(shared, id, &download, &dest).await;
    let _ = std::fs::remove_file(&download);
    fetched?;
    keep_upload(shared, id).await
}

/// Puts the revision's upload among this server's artifacts, if the store has it and
/// this server does not.
async fn keep_upload(shared: &Shared, id: RevisionId) -> anyhow::Result<()> {
    let Some(revision) = shared.store.revision(id).await? else { return Ok(()) };
    let Some(dest) = shared.layout.artifact(&revision.artifact).filter(|path| !path.exists()) else { return Ok(()) };
    let download = shared.layout.tmp().join(format!("upload-{id}-{}.tar.gz", uuid::Uuid::new_v4().simple()));
    let fetched = match shared.store.revision_file(id, RevisionFile::Upload, &download).await? {
        Some(digest) if digest == revision.artifact => {
            let got = supervisor::remote::file_digest(&download)?;
            if got != digest {
                anyhow::bail!("revision {id}'s upload from the store has digest {got}, not {digest}");
            }
            std::fs::rename(&download, &dest).map_err(anyhow::Error::from)
        }
        _ => Ok(()),
    };
    let _ = std::fs::remove_file(&download);
    fetched
}

async fn fetch(
    shared: &Shared,
    id: RevisionId,
    download: &std::path::Path,
    dest: &std::path::Path,
) -> anyhow::Result<()> {
    let Some(digest) = shared.store.revision_file(id, RevisionFile::Code, download).await? else {
        anyhow::bail!("revision {id}'s built code is not in the store (the server that built it kept it to itself)");
    };
    let (download, dest) = (download.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || {
        let got = supervisor::remote::file_digest(&download)?;
        if got != digest {
            anyhow::bail!("revision {id}'s code from the store has digest {got}, not {digest}");
        }
        supervisor::remote::unpack_code(&download, &dest)?;
        Ok(())
    })
    .await?
}

//! Revisions' built code where servers share the store: the server that built a
//! revision packs its code into the store, and any server that runs it later unpacks it
//! from there once. The store keeps it in parts with its digest, and it goes with the
//! revision. Only the built code travels: the uploaded archive is the build's input,
//! and the build runs where the upload arrived.

use model::ids::RevisionId;

use crate::fleet::Shared;

/// Stores the revision's built code, where servers share the store.
pub(crate) async fn publish(shared: &Shared, id: RevisionId) -> anyhow::Result<()> {
    if !shared.owners.is_shared() {
        return Ok(());
    }
    let code = shared.layout.revision_code(id);
    let archive = shared.layout.revision(id).join("code.tar.gz");
    let packed = archive.clone();
    let digest = tokio::task::spawn_blocking(move || supervisor::remote::pack_code(&code, &packed)).await??;
    shared.store.put_revision_code(id, &digest, &archive).await?;
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
    fetched
}

async fn fetch(
    shared: &Shared,
    id: RevisionId,
    download: &std::path::Path,
    dest: &std::path::Path,
) -> anyhow::Result<()> {
    let Some(digest) = shared.store.revision_code(id, download).await? else {
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

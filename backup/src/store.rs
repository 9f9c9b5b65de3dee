//! The store stage: where parts and manifests go. A local directory today; another output
//! (S3) is another implementation of [`Store`].

use std::future::Future;
use std::io;
use std::path::PathBuf;

/// Objects by path (`<backup id>/<name>`).
pub trait Store: Clone + Send + Sync + 'static {
    /// Stores `bytes` at `path`, replacing what was there; atomic (readers see all or nothing).
    fn put(&self, path: &str, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
    fn get(&self, path: &str) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// The backups that have a manifest, i.e. are complete.
    fn complete_backups(&self) -> impl Future<Output = io::Result<Vec<String>>> + Send;
    /// Removes a backup, complete or not.
    fn delete_backup(&self, id: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Where a backup is, for people.
    fn describe(&self, id: &str) -> String;
}

/// A directory of backups, one subdirectory each.
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    root: PathBuf,
}

impl LocalDirectory {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Store for LocalDirectory {
    async fn put(&self, path: &str, bytes: Vec<u8>) -> io::Result<()> {
        let target = self.root.join(path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let partial = target.with_extension("partial");
        // Moved to the blocking thread, not copied (tokio::fs::write would copy the part).
        let written = partial.clone();
        tokio::task::spawn_blocking(move || std::fs::write(written, bytes))
            .await
            .map_err(io::Error::other)??;
        tokio::fs::rename(&partial, &target).await
    }

    async fn get(&self, path: &str) -> io::Result<Vec<u8>> {
        tokio::fs::read(self.root.join(path)).await
    }

    async fn complete_backups(&self) -> io::Result<Vec<String>> {
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut ids = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            // Other files may live beside the backups.
            if !entry.file_type().await?.is_dir() {
                continue;
            }
            let manifest = entry.path().join(crate::manifest::MANIFEST);
            if tokio::fs::try_exists(&manifest).await? {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    async fn delete_backup(&self, id: &str) -> io::Result<()> {
        match tokio::fs::remove_dir_all(self.root.join(id)).await {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn describe(&self, id: &str) -> String {
        self.root.join(id).display().to_string()
    }
}
